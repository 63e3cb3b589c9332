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


def load_run_summary(run_dir: str | Path) -> dict[str, Any]:
    """The summary of one run directory: ``summary.json``, else computed from ``results.jsonl`` (an unfinished
    run) and ``config.json``.

    Raises
    ------
    EGPSError
        When the directory holds neither file.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise EGPSError(f"{run} is not a directory; pass the --out directories of egps eval runs")
    summary_path = run / SUMMARY_FILE
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise EGPSError(f"{summary_path} is not valid JSON; rerun egps eval --resume to rewrite it") from None
    elif (run / RESULTS_FILE).is_file():
        records = read_results(run / RESULTS_FILE)
        if not records:
            raise EGPSError(f"{run / RESULTS_FILE} has no finished results yet")
        summary = summarize_results(records)
        config: dict[str, Any] = {}
        if (run / CONFIG_FILE).is_file():
            config = json.loads((run / CONFIG_FILE).read_text(encoding="utf-8"))
        summary.update(
            task=config.get("task", records[0].get("task")),
            method=records[0]["method"],
            model=config.get("model", records[0].get("model")),
            method_config=config.get("method", {}),
        )
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
    run_dirs: Sequence[str | Path], out: str | Path | None = None, plot: str | Path | None = None
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

    Returns
    -------
    (str, Path or None)
        The Markdown table and the plot's path.
    """
    if not run_dirs:
        raise EGPSError("give at least one run directory")
    summaries = [load_run_summary(d) for d in run_dirs]
    table = render_table(summaries)
    plot_path = Path(plot) if plot is not None else (Path(out).with_suffix(".png") if out is not None else None)
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
