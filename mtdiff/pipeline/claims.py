"""A sweep's claims table: verdicts on claims declared as data (a ``*.claims.yaml`` beside the sweep
config), read from what the sweep committed (``sweeps/<name>/comparison.csv``). It knows comparison
kinds, not points: every point a claims file names must be one of its sweep's points.

Claims compare FID in feature spaces (``evaluate/fid_<space>``), lower is better, in each of
``spaces``: one verdict per space, the claim's when they agree. The seed sets the training, the
sampling noise *and* the evaluation networks, so points are compared seed by seed. Kinds:

- ``paired_lower``: ``lower`` has a lower FID than ``than`` (several: the one with the lowest mean FID
  in ``best_in``), or than ``ratio`` times it (a "slightly worse" claim, the paper's FID ratio as
  slack; ``[a, b]`` reads a / b). The paired differences d_s = FID_lower(s) - ratio · FID_than(s) over
  the seeds both finished: *holds* when their mean goes its way beyond the two-sided ``confidence``
  bound of a paired t-test (|mean| > t · sd/√n), *does not hold* when it goes the other way as far,
  *not significant* within it, *not resolved* under ``min_seeds`` pairs.
- ``target``: ``point``'s ``metric`` (higher is better), or the best of its ``alternatives``, reaches
  ``target``, the level of the ``reference`` (read at ``point`` as ``reference_metric``).
- ``curve``: ``points`` ascending in ``train.steps`` (a budget's curve); *holds* (the budget
  resolves) when the last one gains less FID over the one before, paired by seed, than that one's
  spread over seeds (the noise every comparison already carries). ``plot`` draws it beside the csv;
  the file's optional ``curves_plot`` draws every curve claim in one plot (each named by its ``label``).

``--write`` puts the verdict table and the points table (every finished point's ``columns``, its grid
linked) between the ``<!-- <block>: ... -->`` and ``<!-- /<block> -->`` markers of ``docs`` (the files
given, else the claims file's), and plots every point's FID per seed as ``plot`` beside the csv.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from scipy.stats import t as student_t

from mtdiff.config import ConfigError, read_yaml
from mtdiff.io import atomic_path
from mtdiff.pipeline.report import SEED_SUFFIX, base_points, metric_columns, seed_summary
from mtdiff.pipeline.sweeps import load_sweep

Stat = tuple[float, float, int]  # mean, sample std, seeds; (nan, nan, 0) when not run


@dataclass(frozen=True)
class PairedLower:
    text: str
    paper: str
    lower: str
    than: str | tuple[str, ...]  # several: the best of them
    ratio: float = 1.0


@dataclass(frozen=True)
class Target:
    text: str
    paper: str
    point: str
    metric: str
    target: float
    reference: str
    reference_metric: str
    alternatives: tuple[str, ...] = ()


@dataclass(frozen=True)
class Curve:
    text: str
    paper: str
    points: tuple[str, ...]
    plot: str
    label: str = ""  # its name in a plot of several curves (default: the budget's point, the one before the last)

    @property
    def name(self) -> str:
        return self.label or self.points[-2]


Claim = PairedLower | Target | Curve
KINDS: dict[str, type] = {"paired_lower": PairedLower, "target": Target, "curve": Curve}
FILE_KEYS = {"sweep", "docs", "blocks", "spaces", "best_in", "min_seeds", "confidence", "plot", "header",
             "columns", "claims"}
OPTIONAL_FILE_KEYS = {"curves_plot": ""}  # every curve claim in one plot, beside the csv (none when empty)


@dataclass(frozen=True)
class Claims:
    """A claims file: its claims and how they are read and written."""
    sweep: str  # the sweep's name: its results under sweeps/<sweep>/
    claims: tuple[Claim, ...]
    spaces: tuple[str, ...]
    best_in: str
    min_seeds: int
    confidence: float
    header: str
    columns: tuple[tuple[str, str, int], ...]  # points table: (heading, metric, digits)
    blocks: dict[str, str]  # {"verdicts": marker name, "points": marker name}
    docs: tuple[str, ...]
    plot: str
    curves_plot: str = OPTIONAL_FILE_KEYS["curves_plot"]
    planned_steps: dict[str, int] = field(default_factory=dict)  # the sweep config's train.steps per point


def _points_named(claim: Claim) -> list[str]:
    if isinstance(claim, PairedLower):
        return [claim.lower, *([claim.than] if isinstance(claim.than, str) else claim.than)]
    if isinstance(claim, Target):
        return [claim.point, *claim.alternatives]
    return list(claim.points)


def _ratio(value: Any, where: str) -> float:
    """A number, or ``[a, b]`` read as a / b (the paper's two FIDs)."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return value[0] / value[1]
    raise ConfigError(f"{where}: expected a number or [a, b] (a / b), got {value!r}")


def _claim(raw: Any, where: str, points: set[str]) -> Claim:
    """One claim from its mapping; its kind, keys and points checked."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with 'kind'")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown kind {kind!r}; allowed: {', '.join(KINDS)}")
    cls = KINDS[kind]
    keys = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - keys - {"kind"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} for kind {kind}; allowed: {', '.join(sorted(keys))}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k != "kind"}
    if "ratio" in values:
        values["ratio"] = _ratio(values["ratio"], f"{where}: ratio")
    if "target" in values and not isinstance(values["target"], (int, float)):
        raise ConfigError(f"{where}: target: expected a number, got {values['target']!r}")
    try:
        claim = cls(**{"paper": "", **values})
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    for point in _points_named(claim):
        if point not in points:
            raise ConfigError(f"{where}: unknown point {point!r}; allowed (the sweep's points): "
                              f"{', '.join(sorted(points))}")
    return claim


def load_claims(path: str | Path) -> Claims:
    """Parse a claims file; its ``sweep`` (a sweep config, relative to the claims file) names the points."""
    path = Path(path)
    raw = read_yaml(path, "claims file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    unknown = sorted(set(raw) - FILE_KEYS - set(OPTIONAL_FILE_KEYS))
    missing = sorted(FILE_KEYS - set(raw))
    if unknown or missing:
        raise ConfigError(f"{path}: unknown key(s) {unknown}, missing key(s) {missing}; "
                          f"keys: {', '.join(sorted(FILE_KEYS))}; optional: {', '.join(OPTIONAL_FILE_KEYS)}")
    sweep = load_sweep(path.parent / raw["sweep"])
    points = {p.name.partition(SEED_SUFFIX)[0] for p in sweep.points}
    if not isinstance(raw["claims"], list):
        raise ConfigError(f"{path}: claims: expected a list of claims")
    claims = tuple(_claim(c, f"{path}: claims[{i}]", points) for i, c in enumerate(raw["claims"]))
    if set(raw["blocks"]) != {"verdicts", "points"}:
        raise ConfigError(f"{path}: blocks: expected the marker names of 'verdicts' and 'points'")
    return Claims(sweep=sweep.name, claims=claims, spaces=tuple(raw["spaces"]), best_in=str(raw["best_in"]),
                  min_seeds=int(raw["min_seeds"]), confidence=float(raw["confidence"]), header=str(raw["header"]),
                  columns=tuple((str(h), str(m), int(d)) for h, m, d in raw["columns"]), blocks=dict(raw["blocks"]),
                  docs=tuple(raw["docs"]), plot=str(raw["plot"]),
                  curves_plot=str(raw.get("curves_plot", OPTIONAL_FILE_KEYS["curves_plot"])),
                  planned_steps={p.name: int(p.overrides["train.steps"]) for p in sweep.points
                                 if "train.steps" in p.overrides})


def fid(space: str) -> str:
    return f"evaluate/fid_{space}"


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Every point's mean ± std over its seeds (one seed: std NaN) of the numeric metrics."""
    metrics = [c for c in metric_columns(frame) if pd.api.types.is_numeric_dtype(frame[c])]
    return seed_summary(frame, metrics, min_seeds=1)


def stat(summary: pd.DataFrame, point: str, metric: str) -> Stat:
    rows = summary[summary["point"] == point]
    return (math.nan, math.nan, 0) if rows.empty else row_stat(rows.iloc[0], metric)


def row_stat(row: pd.Series, metric: str) -> Stat:
    """(mean, std, seeds) of ``metric`` in one row of the seed summary; (nan, nan, 0) when not run."""
    if metric not in row or pd.isna(row[metric]):
        return math.nan, math.nan, 0
    std = row[f"{metric} std"]
    return float(row[metric]), float(std) if not pd.isna(std) else math.nan, int(row["seeds"])


def fmt(mean: float, std: float, n: int, digits: int = 1, count: bool = True) -> str:
    """``mean ± std (seeds)``: the std only over several seeds, the seed count unless ``count`` is off."""
    if n == 0:
        return "not run"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "") + (f" ({n})" if count else "")


def paired(frame: pd.DataFrame, a: str, b: str, metric: str, ratio: float = 1.0) -> list[float]:
    """``metric`` of point ``a`` minus ``ratio`` times point ``b``'s at every seed both finished (by seed)."""
    va, vb = per_seed(frame, a, metric), per_seed(frame, b, metric)
    return [va[s] - ratio * vb[s] for s in sorted(set(va) & set(vb))]


def per_seed(frame: pd.DataFrame, point: str, metric: str) -> dict[int, float]:
    """``{seed: value}`` of ``point``'s finished runs (``<point>`` at its ``seed`` column, default 0,
    and ``<point>__seed-<v>``)."""
    out = {}
    if metric not in frame:
        return out
    for _, row in frame[frame["status"] == "ok"].iterrows():
        if str(row["point"]).partition(SEED_SUFFIX)[0] != point or pd.isna(row[metric]):
            continue
        out[run_seed(row)] = float(row[metric])
    return out


def run_seed(row: pd.Series) -> int:
    """A run's seed: its ``__seed-<v>`` suffix, else its seed column, else 0 (a point outside the
    seeds block runs at the default seed and has no seed of its own)."""
    suffix = str(row["point"]).partition(SEED_SUFFIX)[2]
    return int(suffix) if suffix else int(row["seed"]) if "seed" in row and not pd.isna(row["seed"]) else 0


def verdict(diffs: list[float], min_seeds: int = 3, confidence: float = 0.95) -> str:
    """'holds' when the paired differences (a - b) are below 0 beyond the t bound, 'does not hold'
    when above it, 'not significant' within it; 'not resolved' under ``min_seeds`` pairs."""
    n = len(diffs)
    if n == 0:
        return "not run"
    if n < min_seeds:
        return "not resolved"
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n)
    bound = float(student_t.ppf(0.5 + confidence / 2, n - 1)) * se
    if mean < -bound:
        return "holds"
    if mean > bound:
        return "does not hold"
    return "not significant"


def _diff_text(diffs: list[float]) -> str:
    """``, Δ mean ± SE`` of the paired differences; one seed: the difference alone."""
    if len(diffs) < 2:
        return f", Δ {diffs[0]:+.1f}" if diffs else ""
    n, mean = len(diffs), sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    return f", Δ {mean:+.1f} ± {sd / math.sqrt(n):.1f}"


def _both(verdicts: list[str]) -> str:
    """One verdict from the spaces': theirs when they agree."""
    if len(set(verdicts)) == 1:
        return verdicts[0]
    return "not resolved" if "not resolved" in verdicts or "not run" in verdicts else "spaces disagree"


def _best(summary: pd.DataFrame, points: str | tuple[str, ...], metric: str) -> str:
    """``points`` itself, or of several the one with the lowest mean ``metric``."""
    if isinstance(points, str):
        return points
    run = [(m, p) for p in points if not math.isnan(m := stat(summary, p, metric)[0])]
    return min(run)[1] if run else points[0]


def paired_lower_row(claims: Claims, claim: PairedLower, frame: pd.DataFrame, summary: pd.DataFrame) -> str:
    cells, verdicts = [], []
    than = _best(summary, claim.than, fid(claims.best_in))
    for space in claims.spaces:
        a, b = stat(summary, claim.lower, fid(space)), stat(summary, than, fid(space))
        diffs = paired(frame, claim.lower, than, fid(space), claim.ratio)
        scaled = "" if claim.ratio == 1.0 else f"{claim.ratio:.2f} × "
        cells.append(f"{fmt(*a)} vs {scaled}{fmt(*b)}{_diff_text(diffs)}")
        verdicts.append(verdict(diffs, claims.min_seeds, claims.confidence))
    return f"| {claim.text} (`{claim.lower}` vs `{than}`) | {claim.paper} | {' / '.join(cells)} | {_both(verdicts)} |"


def target_row(claims: Claims, claim: Target, frame: pd.DataFrame, summary: pd.DataFrame) -> str:
    """``point``'s metric against the target and the reference, the best alternative beside it."""
    text = f"{claim.text} (≥ {claim.target}, the {claim.reference}'s level)"
    value = stat(summary, claim.point, claim.metric)
    if value[2] == 0:
        return f"| {text} | {claim.paper} | not run | not run |"
    reference = stat(summary, claim.point, claim.reference_metric)
    others = {p: s for p in claim.alternatives if not math.isnan((s := stat(summary, p, claim.metric))[0])}
    best = max(others, key=lambda p: others[p][0], default=None)
    best_value = max(value[0], others[best][0] if best else -math.inf)
    reached = "holds" if best_value >= claim.target else (
        "not resolved" if value[2] < claims.min_seeds else "does not hold")
    ours = fmt(*value, digits=3)
    if best is not None:
        ours += f"; best lever `{best}` {fmt(*others[best], digits=3)}"
    return f"| {text} | {claim.paper} | {ours} vs {claim.reference} {reference[0]:.3f} | {reached} |"


def _steps(frame: pd.DataFrame, point: str, planned: dict[str, int]) -> str:
    """``point``'s train.steps as it ran, else as its sweep config plans it."""
    rows = frame[base_points(frame["point"]) == point] if "train.steps" in frame else frame.iloc[:0]
    return str(int(rows["train.steps"].iloc[0])) if len(rows) else str(planned.get(point, "?"))


def curve_row(claims: Claims, claim: Curve, frame: pd.DataFrame, summary: pd.DataFrame) -> str:
    """The last point's FID gain over the one before, paired by seed, against that one's seed spread."""
    steps = [_steps(frame, p, claims.planned_steps) for p in claim.points]
    cells, verdicts = [], []
    for space in claims.spaces:
        stats = [stat(summary, p, fid(space)) for p in claim.points]
        diffs = paired(frame, claim.points[-1], claim.points[-2], fid(space))
        cell = " → ".join(fmt(*s) for s in stats)
        if diffs and not math.isnan(spread := stats[-2][1]):
            gain = -sum(diffs) / len(diffs)
            cell += f"; {steps[-2]} → {steps[-1]} gains {gain:.1f} vs seed std {spread:.1f}"
            verdicts.append("holds" if gain < spread else "does not hold")
        else:
            verdicts.append("not run")
        cells.append(cell)
    return (f"| {claim.text}: FID at {' → '.join(steps)} steps (`{'`, `'.join(claim.points)}`) | {claim.paper} | "
            f"{' / '.join(cells)} | {_both(verdicts)} |")


ROWS: dict[type, Callable[..., str]] = {PairedLower: paired_lower_row, Target: target_row, Curve: curve_row}


def verdict_table(claims: Claims, comparison_csv: str | Path) -> str:
    frame = pd.read_csv(comparison_csv)
    summary = summarize(frame)
    rows = [ROWS[type(c)](claims, c, frame, summary) for c in claims.claims]
    return "\n".join([claims.header, "|---|---|---|---|", *rows])


def points_table(columns: tuple[tuple[str, str, int], ...], comparison_csv: str | Path, grids_from: str) -> str:
    """Every finished point: ``columns`` (mean ± std, seeds) and the sample grid of its lowest finished
    seed (``<point>.png`` at seed 0, else ``<point>__seed-<s>.png``, under ``grids_from``)."""
    frame = pd.read_csv(comparison_csv)
    summary = summarize(frame)
    head = "| point | seeds | " + " | ".join(c[0] for c in columns) + " | grid |\n|---|---:|" + \
        "---:|" * len(columns) + "---|"
    rows = []
    for _, r in summary.iterrows():
        cells = []
        for _, metric, digits in columns:
            mean, std, n = row_stat(r, metric)
            cells.append("" if n == 0 else fmt(mean, std, n, digits, count=False))
        seed = min(per_seed(frame, r["point"], columns[0][1]), default=0)
        grid, text = (r["point"], "grid") if seed == 0 else (f"{r['point']}{SEED_SUFFIX}{seed}", f"grid (seed {seed})")
        rows.append(f"| `{r['point']}` | {r['seeds']} | " + " | ".join(cells) + f" | [{text}]({grids_from}/{grid}.png) |")
    return "\n".join([head, *rows])


def plot_points(comparison_csv: str | Path, path: str | Path, spaces: tuple[str, ...]) -> Path:
    """FID of every finished point in each space: one dot per seed, the mean ± std beside them,
    the points in the config's order (written atomically as PNG)."""
    frame = pd.read_csv(comparison_csv)
    frame = frame[frame["status"] == "ok"]
    base = base_points(frame["point"])
    names = list(dict.fromkeys(base))
    plt = _pyplot()
    fig, axes = plt.subplots(len(spaces), 1, figsize=(max(6.0, 0.7 * len(names) + 2), 6.4), sharex=True)
    try:
        for ax, space in zip(axes, spaces):
            values = [frame.loc[base == n, fid(space)].dropna().astype(float) for n in names]
            for x, v in enumerate(values):
                ax.plot([x - 0.12] * len(v), v, "o", color="#4C72B0", alpha=0.6, ms=4)
                ax.errorbar(x + 0.12, v.mean(), yerr=v.std(ddof=1) if len(v) > 1 else 0, fmt="s", color="#C44E52",
                            ms=5, capsize=3)
            ax.set_ylabel(f"FID {space}")
            ax.grid(axis="y", alpha=0.3)
        axes[0].set_title("FID per seed (dots) and mean ± std (squares)")
        axes[-1].set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        return _save(fig, path)
    finally:
        plt.close(fig)


CURVE_COLORS = ("#4C72B0", "#C44E52", "#55A868", "#8172B2", "#CCB974", "#64B5CD")


def plot_curves(comparison_csv: str | Path, path: str | Path, series: dict[str, tuple[str, ...]],
                spaces: tuple[str, ...]) -> Path:
    """FID against training steps in each space, a colour per series (its ``points``): one dot per run,
    a seed's runs joined by a thin line (the paired reading), the mean per point joined by a thick one
    (written atomically as PNG). Steps double along the curve, so the axis is logarithmic."""
    frame = pd.read_csv(comparison_csv)
    frame = frame[frame["status"] == "ok"]
    if "train.steps" not in frame:  # no curve point run (a sweep file without the column): empty axes
        frame = frame.assign(**{"train.steps": pd.Series(dtype=float)})
    frame = frame.assign(seed=[run_seed(row) for _, row in frame.iterrows()], base=base_points(frame["point"]))
    runs_of = {label: frame[frame["base"].isin(points)].sort_values("train.steps") for label, points in series.items()}
    steps = sorted({s for runs in runs_of.values() for s in runs["train.steps"]})
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(spaces), figsize=(8.0 if len(series) == 1 else 10.0, 3.6))
    try:
        for ax, space in zip(axes, spaces):
            for (label, runs), color in zip(runs_of.items(), CURVE_COLORS):
                _draw_series(ax, runs, fid(space), color, label, annotate=len(series) == 1)
            if steps:
                ax.set_xscale("log", base=2)
                ax.set_xticks(steps, [str(int(s)) for s in steps])
            ax.set_xlabel("training steps (batch 64)")
            ax.set_ylabel(f"FID {space}")
            ax.grid(alpha=0.3)
        if len(series) > 1:
            axes[-1].legend(fontsize=7)
        what = next(iter(series)) if len(series) == 1 else ", ".join(series)
        fig.suptitle(f"{what} by training steps: runs (dots, a seed's joined), mean (squares)", fontsize=9)
        return _save(fig, path)
    finally:
        plt.close(fig)


def _draw_series(ax, runs: pd.DataFrame, metric: str, color: str, label: str, annotate: bool) -> None:
    """One series' runs (a seed's joined) and its mean per point (squares, joined)."""
    for seed, seed_runs in runs.groupby("seed"):
        ax.plot(seed_runs["train.steps"], seed_runs[metric], "-o", color=color, alpha=0.45, ms=4, lw=0.8)
        if annotate:
            ax.annotate(f"seed {int(seed)}", (seed_runs["train.steps"].iloc[-1], seed_runs[metric].iloc[-1]),
                        fontsize=7, xytext=(4, 0), textcoords="offset points")
    means = runs.groupby("base")[["train.steps", metric]].mean().sort_values("train.steps")
    ax.plot(means["train.steps"], means[metric], "-s", color=color, ms=5, lw=1.6, label=label)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return Path(path)


def write_between_markers(path: Path, table: str, block: str) -> bool:
    """Replace what stands between ``<!-- block: ... -->`` and ``<!-- /block -->`` in ``path`` with
    ``table`` (atomically); False when ``path`` has no such block."""
    text = path.read_text()
    start, end = text.find(f"<!-- {block}:"), text.find(f"<!-- /{block} -->")
    if start < 0 or end < (opened := text.find("-->", start) + len("-->")):
        return False
    with atomic_path(path) as tmp:
        tmp.write_text(text[:opened] + "\n" + table + "\n" + text[end:])
    return True


def write(claims: Claims, comparison: Path, docs: list[str]) -> int:
    """The verdict and points tables into ``docs``' blocks, the plots beside ``comparison``."""
    table = verdict_table(claims, comparison)
    for doc in map(Path, docs):
        grids = os.path.relpath(comparison.resolve().parent / "points", doc.resolve().parent)
        written = [block for block, text in ((claims.blocks["verdicts"], table),
                                             (claims.blocks["points"], points_table(claims.columns, comparison, grids)))
                   if write_between_markers(doc, text, block)]
        if not written:
            print(f"error: {doc}: no <!-- {claims.blocks['verdicts']}: ... --> block", file=sys.stderr)
            return 2
        print(f"{', '.join(written)} written into {doc}")
    print(f"plot written: {plot_points(comparison, comparison.with_name(claims.plot), claims.spaces)}")
    curves = [c for c in claims.claims if isinstance(c, Curve)]
    for curve in curves:
        series = {curve.name: curve.points}
        print(f"plot written: {plot_curves(comparison, comparison.with_name(curve.plot), series, claims.spaces)}")
    if claims.curves_plot and curves:
        series = {c.name: c.points for c in curves}
        print(f"plot written: {plot_curves(comparison, comparison.with_name(claims.curves_plot), series, claims.spaces)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mtdiff.pipeline.claims", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("claims", help="claims file, e.g. configs/sweeps/study.claims.yaml")
    ap.add_argument("--comparison", type=Path, default=None,
                    help="the sweep's results (default: sweeps/<its name>/comparison.csv)")
    ap.add_argument("--write", nargs="*", metavar="FILE", default=None,
                    help="put the tables between the markers of these files (default: the claims file's docs) "
                         "and write the plots; without it the verdict table is printed")
    args = ap.parse_args(argv)
    try:
        claims = load_claims(args.claims)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    comparison = args.comparison or Path("sweeps") / claims.sweep / "comparison.csv"
    if not comparison.is_file():
        print(f"error: {comparison}: no results yet (python -m flows.sweep <the sweep config>)", file=sys.stderr)
        return 2
    if args.write is None:
        print(verdict_table(claims, comparison))
        return 0
    return write(claims, comparison, args.write or list(claims.docs))


if __name__ == "__main__":
    raise SystemExit(main())
