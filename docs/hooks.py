"""MkDocs hook: relative links from a page to files of the repository outside docs/ keep working on the site.

A page such as ``docs/benchmarks/prefix_reuse.md`` links to ``../../benchmarks/results/prefix_reuse.png`` so that
the link also works when the Markdown is read on a code host. MkDocs only serves files under ``docs/``, and with
``--strict`` such a link fails the build. This hook copies each linked repository file into the site under
``_repo/<path in the repository>`` and points the link there. A link to a file that does not exist is left
alone, so ``--strict`` still reports it. Loaded by mkdocs.yml (``hooks: [docs/hooks.py]``).
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File

LINK = re.compile(r"(\]\()([^)\s#]+)([^)]*\))")
PREFIX = "_repo"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any, **kwargs: Any) -> str:
    docs_dir = Path(config["docs_dir"]).resolve()
    repo = docs_dir.parent
    page_dir = Path(page.file.abs_src_path).parent

    def rewrite(match: re.Match[str]) -> str:
        target = match.group(2)
        if "://" in target or target.startswith(("/", "mailto:")):
            return match.group(0)
        path = (page_dir / target).resolve()
        if path.is_relative_to(docs_dir) or not path.is_relative_to(repo) or not path.is_file():
            return match.group(0)
        uri = f"{PREFIX}/{path.relative_to(repo).as_posix()}"
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, abs_src_path=str(path)))
        relative = posixpath.relpath(uri, posixpath.dirname(page.file.src_uri))
        return f"{match.group(1)}{relative}{match.group(3)}"

    return LINK.sub(rewrite, markdown)
