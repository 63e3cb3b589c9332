"""``egps report DIR...``: several evaluation runs side by side, as a Markdown table and a PNG."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from egps_ppl.errors import EGPSError
from egps_ppl.evals.store import (
    CONFIG_FILE,
    RESULTS_FILE,
    SUMMARY_FILE,
    plot_accuracy_vs_compute,
    read_results,
    run_label,
    summarize_results,
)

__all__ = ["load_run_summary", "render_table", "write_report"]

COLUMNS = (
    "method",
    "task",
    "model",
    "problems",
    "seeds",
    "accuracy ± SE",
    "pass@k",
    "decode tok/problem",
    "scored tok/problem",
    "wall s/problem",
)


SUMMARY_TYPES: dict[str, tuple[type, ...]] = {
    "accuracy": (int, float, type(None)),
    "accuracy_se": (int, float, type(None)),
    "n_problems": (int,),
    "seeds": (list,),
    "pass_at_k": (dict,),
    "mean_decode_tokens": (int, float, type(None)),
    "mean_scored_tokens": (int, float, type(None)),
    "mean_wall_s": (int, float, type(None)),
    "method_config": (dict,),
}
"""The types a ``summary.json`` read on its own (a run directory without ``results.jsonl``) must have."""


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or an :class:`EGPSError` naming the file and what is wrong."""
    from egps_ppl.errors import read_text

    try:
        value = json.loads(read_text(path, "run file"))
    except json.JSONDecodeError as exc:
        raise EGPSError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}); remove it (egps eval --resume "
            f"writes it again)"
        ) from None
    if not isinstance(value, dict):
        raise EGPSError(f"{path} must hold a JSON object, got {type(value).__name__}; remove it")
    return value


def load_run_summary(run_dir: str | Path) -> dict[str, Any]:
    """The summary of one run directory, recomputed from ``results.jsonl`` whenever there is one.

    ``summary.json`` is written only when a run finishes, so after an interrupted ``--resume`` it describes the
    results of an earlier invocation; the accuracy, the counts and the costs therefore always come from
    ``results.jsonl`` (restricted to the problems and seeds ``config.json`` selected), and ``summary.json`` adds
    only what cannot be recomputed (the run's wall time, Ray counters). ``stale_summary`` is true when it
    disagreed. Without ``results.jsonl``, a type-checked ``summary.json`` is used as it is.

    Raises
    ------
    EGPSError
        When the directory holds neither file, or one of its files is malformed (not UTF-8, not JSON, wrong
        types); the message names the file.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise EGPSError(f"{run} is not a directory; pass the --out directories of egps eval runs")
    summary_path, results_path, config_path = run / SUMMARY_FILE, run / RESULTS_FILE, run / CONFIG_FILE
    stored = _read_json(summary_path) if summary_path.is_file() else None
    config = _read_json(config_path) if config_path.is_file() else {}
    if results_path.is_file():
        records = read_results(results_path)
        if not records:
            raise EGPSError(f"{results_path} has no finished results yet")
        problems, seeds = config.get("problem_ids"), config.get("seeds")
        if not isinstance(problems, list) and stored is not None and stored.get("complete") is True:
            # A run written before config.json listed its problems: a complete summary names them all.
            problems, seeds = list(stored.get("accuracy_per_problem") or {}), stored.get("seeds")
        if not (isinstance(problems, list) and isinstance(seeds, list)):
            problems, seeds = None, None  # nothing says which units were selected: every record counts
        elif not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise EGPSError(f"{config_path}: 'seeds' must be a list of integers")
        method_config = config.get("method", (stored or {}).get("method_config", {}))
        if not isinstance(method_config, dict):
            raise EGPSError(f"{config_path}: 'method' must be a JSON object, got {json.dumps(method_config)}")
        summary = {**(stored or {}), **summarize_results(records, problems=problems, seeds=seeds)}
        summary.update(
            task=config.get("task", records[0].get("task")),
            method=records[0]["method"],
            model=config.get("model", records[0].get("model")),
            method_config=method_config,
        )
        summary["stale_summary"] = stored is not None and stored.get("n_results") != summary["n_results"]
    elif stored is not None:
        summary = stored
        for name, types in SUMMARY_TYPES.items():
            if name in summary and (not isinstance(summary[name], types) or isinstance(summary[name], bool)):
                raise EGPSError(f"{summary_path}: {name!r} has the wrong type ({json.dumps(summary[name])})")
    else:
        raise EGPSError(f"{run} has no {SUMMARY_FILE} or {RESULTS_FILE}; is it the --out of an egps eval run?")
    summary["run_dir"] = str(run)
    return summary


def _fmt(value: Any, digits: int = 1) -> str:
    return "–" if value is None else f"{float(value):,.{digits}f}"


def _pass_at_k(summary: dict[str, Any]) -> str:
    """``@1 0.625, @2 0.750, ...``: the run's pass@k (seeds as samples); "–" for summaries written before it."""
    values = summary.get("pass_at_k") or {}
    return ", ".join(f"@{k} {v:.3f}" for k, v in sorted(values.items(), key=lambda kv: int(kv[0]))) or "–"


def render_table(summaries: Sequence[dict[str, Any]]) -> str:
    """A Markdown table with one row per run (see :data:`COLUMNS`); pass@k treats a problem's seeds as samples."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for s in summaries:
        acc = s.get("accuracy")
        se = s.get("accuracy_se")
        accuracy = "–" if acc is None else f"{acc:.3f}" + (f" ± {se:.3f}" if se is not None else "")
        if not s.get("complete", True):
            accuracy += f" ({s.get('n_results')}/{s.get('expected_results')} done)"
        row = [
            run_label(s),
            str(s.get("task", "?")),
            str(s.get("model", "?")),
            str(s.get("n_problems", "?")),
            ",".join(str(x) for x in s.get("seeds", [])),
            accuracy,
            _pass_at_k(s),
            _fmt(s.get("mean_decode_tokens")),
            _fmt(s.get("mean_scored_tokens")),
            _fmt(s.get("mean_wall_s"), 2),
        ]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines) + "\n"


def write_report(
    run_dirs: Sequence[str | Path],
    out: str | Path | None = None,
    plot: str | Path | None = None,
    summaries: Sequence[dict[str, Any]] | None = None,
) -> tuple[str, Path | None]:
    """Render ``run_dirs`` side by side.

    Parameters
    ----------
    run_dirs : sequence of paths
        ``egps eval --out`` directories.
    out : path or None
        Markdown file to write (the table, then a link to the plot); ``None`` writes no file.
    plot : path or None
        PNG of accuracy vs decode tokens, one point per run; default ``out`` with the suffix ``.png`` when
        ``out`` is given, else no plot.
    summaries : sequence of dict or None
        The runs' :func:`load_run_summary`, when the caller has them already.

    Returns
    -------
    (str, Path or None)
        The Markdown table and the plot's path.
    """
    from egps_ppl.errors import check_writable

    if not run_dirs:
        raise EGPSError("give at least one run directory")
    plot_path = Path(plot) if plot is not None else (Path(out).with_suffix(".png") if out is not None else None)
    for flag, path in (("--out", out), ("--plot", plot_path)):
        if path is not None:
            check_writable(path, flag)
    summaries = [load_run_summary(d) for d in run_dirs] if summaries is None else list(summaries)
    table = render_table(summaries)
    if plot_path is not None:
        plot_path.parent.mkdir(parents=True, exist_ok=True)
        plot_accuracy_vs_compute(summaries, plot_path)
    if out is not None:
        out_path = Path(out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        text = table
        if plot_path is not None:
            try:
                rel = plot_path.resolve().relative_to(out_path.resolve().parent)
            except ValueError:
                rel = plot_path.resolve()
            text += f"\n![accuracy vs compute]({rel.as_posix()})\n"
        out_path.write_text(text, encoding="utf-8")
    return table, plot_path
