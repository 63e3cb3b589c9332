"""``python -m egps_ppl.cli``: the ``egps`` command."""

from __future__ import annotations

if __name__ == "__main__":
    from egps_ppl.cli import main

    raise SystemExit(main())
