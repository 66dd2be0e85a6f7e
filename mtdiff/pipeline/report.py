"""Sweep comparison report: one row per sweep point (its overrides and metrics) written as CSV and
Markdown, plus a bar plot per main metric. ``flows.sweep`` calls :func:`write_report`.

A row is ``{"point", "status", "experiment", "params": {dotted key: value}, "metrics": {name: float}}``;
metric names are ``<metrics file stem>/<dotted key>`` (``metrics/evaluate.json`` ``fid`` ->
``evaluate/fid``), so they never collide with the dotted param columns.
"""
from __future__ import annotations

import fnmatch
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from mtdiff.io import atomic_path

log = logging.getLogger(__name__)
ID_COLUMNS = ("point", "status", "experiment")
SEED_SUFFIX = "__seed-"  # mtdiff.pipeline.sweeps names a point's runs at further seeds <point>__seed-<v>
MAX_AUTO_PLOTS = 12


@dataclass
class Report:
    frame: pd.DataFrame
    markdown: str  # the compact table (varying params + main metrics); comparison.md also has all columns
    csv: Path
    md: Path
    plots: list[Path] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)


def flatten_metrics(per_file: dict[str, Any]) -> dict[str, float]:
    """``{"metrics/evaluate.json": {"fid": 9.1, "cls": {"t1": 0.8}}}`` -> ``{"evaluate/fid": 9.1, "evaluate/cls.t1": 0.8}``.

    Values may also be DVC's ``{"data": {...}}`` wrappers; non-numeric leaves are dropped."""
    out: dict[str, float] = {}
    for file, content in per_file.items():
        if isinstance(content, dict) and set(content) <= {"data", "error"}:
            content = content.get("data")
        if not isinstance(content, dict):
            continue
        stem = Path(file).stem
        for key, value in _leaves(content):
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
                out[f"{stem}/{key}"] = float(value)
    return out


def _leaves(d: dict, prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def comparison_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per point: id columns, then the param keys (first-seen order), then metrics (sorted)."""
    if not rows:
        raise ValueError("comparison: no sweep points to compare")
    param_keys: list[str] = []
    metric_keys: set[str] = set()
    for row in rows:
        param_keys += [k for k in (row.get("params") or {}) if k not in param_keys]
        metric_keys |= set(row.get("metrics") or {})
    clash = set(param_keys) & metric_keys
    if clash:
        raise ValueError(f"comparison: names used both as params and metrics: {sorted(clash)}")
    records = []
    for row in rows:
        rec = {c: row.get(c) for c in ID_COLUMNS}
        params = row.get("params") or {}
        rec.update({k: _cell(params.get(k)) for k in param_keys})
        metrics = row.get("metrics") or {}
        rec.update({k: metrics.get(k, math.nan) for k in sorted(metric_keys)})
        records.append(rec)
    frame = pd.DataFrame.from_records(records, columns=[*ID_COLUMNS, *param_keys, *sorted(metric_keys)])
    for key in metric_keys:
        frame[key] = frame[key].astype(float)
    return frame


def _cell(value: Any) -> Any:
    # lists/dicts would make object columns that CSV round-trips badly; show them as text
    return str(value) if isinstance(value, (list, dict, tuple)) else value


def metric_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if "/" in str(c)]


def main_metrics(frame: pd.DataFrame, wanted: Sequence[str] | None = None) -> list[str]:
    """Metric columns matching ``wanted`` glob patterns (against the full name or the part after
    '/'), in pattern order; all metrics (up to 12) when ``wanted`` is empty or matches nothing."""
    columns = metric_columns(frame)
    chosen: list[str] = []
    for pattern in wanted or []:
        hits = [c for c in columns if fnmatch.fnmatchcase(c, pattern)
                or fnmatch.fnmatchcase(c.split("/", 1)[1], pattern)]
        if not hits:
            log.warning("report: no metric matches %r (have: %s)", pattern, ", ".join(columns) or "none")
        chosen += [c for c in hits if c not in chosen]
    return chosen or columns[:MAX_AUTO_PLOTS]


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub-style table; floats with 4 significant digits, missing values as '-'."""
    def fmt(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    header = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if c in metric_columns(frame) else "---" for c in frame.columns) + "|"]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(fmt(row[c]) for c in frame.columns) + " |")
    return "\n".join(lines)


def compact_frame(frame: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Point, status, the params that differ between points, and ``metrics``: the table to read first."""
    params = [c for c in frame.columns if c not in ID_COLUMNS and "/" not in str(c)]
    varying = [c for c in params if frame[c].astype(str).nunique(dropna=False) > 1]
    return frame[["point", "status", *varying, *[m for m in metrics if m in frame.columns]]]


def base_points(points: pd.Series) -> pd.Series:
    """Each run's point without its ``__seed-<v>`` suffix."""
    return points.astype(str).str.split(SEED_SUFFIX, n=1, regex=False).str[0]


def seed_summary(frame: pd.DataFrame, metrics: Sequence[str], min_seeds: int = 2) -> pd.DataFrame:
    """Mean and sample std over seeds of ``metrics`` for every point run at ≥ ``min_seeds`` seeds (its
    ``<point>__seed-<v>`` rows with it): columns point, seeds, ``<metric>`` and ``<metric> std``."""
    ok = frame[frame["status"] == "ok"] if "status" in frame else frame
    base = base_points(ok["point"])
    records = []
    for point, group in ok.groupby(base, sort=False):
        if len(group) < min_seeds:
            continue
        rec: dict[str, Any] = {"point": point, "seeds": len(group)}
        for m in metrics:
            values = group[m].dropna() if m in group else pd.Series(dtype=float)
            rec[m] = float(values.mean()) if len(values) else math.nan
            rec[f"{m} std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        records.append(rec)
    return pd.DataFrame.from_records(records, columns=["point", "seeds", *[c for m in metrics
                                                                           for c in (m, f"{m} std")]])


def seed_markdown(summary: pd.DataFrame, metrics: Sequence[str]) -> str:
    """The seed summary as 'mean ± std' cells."""
    shown = pd.DataFrame({"point": summary["point"], "seeds": summary["seeds"]})
    for m in metrics:
        shown[m] = [f"{mu:.4g} ± {sd:.2g}" if not math.isnan(mu) else "-"
                    for mu, sd in zip(summary[m], summary[f"{m} std"])]
    return to_markdown(shown)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "metric"


def bar_plot(frame: pd.DataFrame, metric: str, path: Path, title: str | None = None) -> Path:
    """One bar per point for ``metric`` (points without a value are left out), written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = frame[["point", metric]].dropna()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(data) + 1.5), 3.6))
    try:
        bars = ax.bar(data["point"].astype(str), data[metric].astype(float), color="#4C72B0")
        ax.bar_label(bars, labels=[f"{v:.4g}" for v in data[metric]], fontsize=8)
        ax.set_ylabel(metric)
        ax.set_title(title or metric)
        ax.tick_params(axis="x", labelrotation=20)
        if data.empty:
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
    return path


def write_report(rows: Sequence[dict[str, Any]], out_dir: str | Path, metrics: Sequence[str] | None = None,
                 title: str | None = None) -> Report:
    """Write ``comparison.csv``, ``comparison.md`` and ``<metric>.png`` per main metric into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = comparison_frame(rows)
    chosen = main_metrics(frame, metrics)
    table = to_markdown(compact_frame(frame, chosen))
    csv_path, md_path = out_dir / "comparison.csv", out_dir / "comparison.md"
    with atomic_path(csv_path) as tmp:
        frame.to_csv(tmp, index=False)
    heading = f"# {title}\n\n" if title else ""
    summary = seed_summary(frame, chosen)
    seeds_md = ""
    if len(summary):
        with atomic_path(out_dir / "comparison_seeds.csv") as tmp:
            summary.to_csv(tmp, index=False)
        seeds_md = f"## Over seeds (mean ± sample std)\n\n{seed_markdown(summary, chosen)}\n\n"
    with atomic_path(md_path) as tmp:
        tmp.write_text(f"{heading}## Main metrics\n\n{table}\n\n{seeds_md}"
                       f"## Everything\n\n{to_markdown(frame)}\n")
    plots = [bar_plot(frame, m, out_dir / f"{safe_name(m)}.png", title=f"{title}: {m}" if title else m)
             for m in chosen]
    return Report(frame=frame, markdown=table, csv=csv_path, md=md_path, plots=plots, metrics=chosen)
