"""The decisive study's verdict table, from what the sweep committed (sweeps/study/comparison.csv).

Each claim compares two points of the study at equal budget (1500 steps, 2000 samples) by FID in
both feature spaces. The seed sets the training, the sampling noise *and* the two evaluation
networks, so the points are compared seed by seed: the paired differences d_s = FID_a(s) - FID_b(s)
over the seeds both finished ("slightly worse" claims: d_s = FID_a(s) - r · FID_b(s) with the paper's
own ratio r as the slack). A claim *holds* when their mean goes its way beyond the two-sided 95 %
bound of a paired t-test (|mean| > t_{0.975, n-1} · std/√n) in both spaces, *does not hold* when it
goes the other way as far, is *not significant* within it (at 3 seeds the bound is 4.30 SE: a
gap that every seed shows can still fall inside it), and is *not resolved* under 3 paired seeds.
The label head is read against the FashionCNN's test accuracy and the 0.91 target, the budget
against the baseline's own curve (750 / 1500 / 3000 steps).

    python -m mtdiff.study [sweeps/study/comparison.csv]   # prints the markdown table
    python -m mtdiff.study --write                         # ... into docs/study.md (its verdict and points tables),
                                                           # the plots into sweeps/study/ (fid_per_seed.png,
                                                           # baseline_curve.png)
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mtdiff.pipeline.report import SEED_SUFFIX, base_points, seed_summary

SPACES = ("fmnist_cnn", "fmnist_eval")
MIN_SEEDS = 3
CONFIDENCE = 0.95  # two-sided, of the paired t-test over seeds
LABEL_TARGET = 0.91
# the label head's own trainings (joint_label's sampling-only points share its head)
LABEL_LEVERS = ("joint_label_drop03", "joint_label_drop05", "joint_label_w05", "joint_label_maxt100",
                "joint_label_nofeedback")
PLOT = "fid_per_seed.png"  # written by --write beside comparison.csv
# the baseline's curve: is it still improving fast at the study's budget (the "or more steps")?
CURVE = ("classcond_cfg1_steps750", "classcond_cfg1", "classcond_cfg1_steps3000")  # shorter, the budget, longer
CURVE_PLOT = "baseline_curve.png"


@dataclass(frozen=True)
class Claim:
    text: str
    paper: str
    better: str   # the point the claim says has the lower FID (lower than ``ratio`` times worse's)
    worse: str | tuple[str, ...]  # several: the one of them with the lowest mean FID (the best baseline)
    ratio: float = 1.0  # "slightly worse" claims: the paper's FID ratio is the claim's slack


UNCOND_RATIO = 26.00 / 23.22  # the paper: unconditional MT 26.00 vs unconditional ADM 23.22


BASELINES = ("classcond_cfg1", "classcond_cfg2")  # the class-conditional model at CFG 1 and 2

CLAIMS = (
    Claim("MT-X (class-conditional + masked task) beats the class-conditional model, CFG 1",
          "9.85 vs 16.35 (one reading)", "classcond_masked", "classcond_cfg1"),
    Claim("... at CFG 2", "", "classcond_masked_cfg2", "classcond_cfg2"),
    Claim("... its predicted masked input in training's form (head's image x a drawn patch mask), CFG 1", "",
          "classcond_masked_drawnmask", "classcond_cfg1"),
    Claim("... trained with the masked image absent 30 % of the time, sampled without it, CFG 1", "",
          "classcond_masked_drop03_absent", "classcond_cfg1"),
    Claim("joint image-label beats the class-conditional model, both unguided",
          "9.85 vs 16.35 (other reading)", "joint_label_tg1", "classcond_cfg1"),
    Claim("joint image-label (task guidance 1.5) beats the best class-conditional setting",
          "", "joint_label", BASELINES),
    Claim("joint image-label fine-tuned (last 20 %) beats the best class-conditional setting",
          "3.5–13.5 after fine-tune", "joint_label_ft", BASELINES),
    Claim("the fine-tune lifts joint image-label", "34–41 → 3.5–13.5", "joint_label_ft", "joint_label"),
    Claim("the fine-tune lifts MT-X", "34–41 → 3.5–13.5", "classcond_masked_ft", "classcond_masked"),
    Claim("MT-X fine-tuned (last 20 % without the masked task) beats the best class-conditional setting",
          "3.5–13.5 after fine-tune", "classcond_masked_ft", BASELINES),
    Claim("the fine-tune lifts joint image-representation", "34–41 → 3.5–13.5",
          "joint_representation_ft", "joint_representation"),
    Claim("unconditional MT (label predicted) is at most slightly worse than single-task "
          f"(FID within the paper's ratio, {UNCOND_RATIO:.2f}x)", "26.00 vs 23.22",
          "joint_label_uncond", "single_task", UNCOND_RATIO),
    Claim("... the predicted label entering as one class's code (the head's argmax)", "",
          "joint_label_uncond_hard", "single_task", UNCOND_RATIO),
    Claim("... the label absent from the forward process (code 0, as label dropout trains)", "",
          "joint_label_uncond_absent", "single_task", UNCOND_RATIO),
    Claim("... one class drawn from the head's softmax at z_T and held for the chain (y, then x given y)", "",
          "joint_label_uncond_drawn", "single_task", UNCOND_RATIO),
)


def _stat(summary: pd.DataFrame, point: str, metric: str) -> tuple[float, float, int]:
    rows = summary[summary["point"] == point]
    return (math.nan, math.nan, 0) if rows.empty else _row_stat(rows.iloc[0], metric)


def _row_stat(row: pd.Series, metric: str) -> tuple[float, float, int]:
    """(mean, std, seeds) of ``metric`` in one row of the seed summary; (nan, nan, 0) when not run."""
    if metric not in row or pd.isna(row[metric]):
        return math.nan, math.nan, 0
    std = row[f"{metric} std"]
    return float(row[metric]), float(std) if not pd.isna(std) else math.nan, int(row["seeds"])


def _fmt(mean: float, std: float, n: int, digits: int = 1, count: bool = True) -> str:
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
        out[_run_seed(row)] = float(row[metric])
    return out


def _run_seed(row: pd.Series) -> int:
    """A run's seed: its ``__seed-<v>`` suffix, else its seed column, else 0 (a point outside the
    seeds block runs at the default seed and has no seed of its own)."""
    suffix = str(row["point"]).partition(SEED_SUFFIX)[2]
    return int(suffix) if suffix else int(row["seed"]) if "seed" in row and not pd.isna(row["seed"]) else 0


def verdict(diffs: list[float]) -> str:
    """'holds' when the paired differences (a - b) are below 0 beyond the t bound, 'does not hold'
    when above it, 'not significant' within it; 'not resolved' under MIN_SEEDS pairs."""
    n = len(diffs)
    if n == 0:
        return "not run"
    if n < MIN_SEEDS:
        return "not resolved"
    from scipy.stats import t as student_t

    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n)
    bound = float(student_t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * se
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


def _best(summary: pd.DataFrame, points: str | tuple[str, ...]) -> str:
    """``points`` itself, or of several the one with the lowest mean FID in the evaluation network's space."""
    if isinstance(points, str):
        return points
    run = [(m, p) for p in points if not math.isnan(m := _stat(summary, p, "evaluate/fid_fmnist_eval")[0])]
    return min(run)[1] if run else points[0]


def claim_row(frame: pd.DataFrame, summary: pd.DataFrame, claim: Claim) -> str:
    cells, verdicts = [], []
    worse = _best(summary, claim.worse)
    for space in SPACES:
        metric = f"evaluate/fid_{space}"
        a, b = _stat(summary, claim.better, metric), _stat(summary, worse, metric)
        diffs = paired(frame, claim.better, worse, metric, claim.ratio)
        scaled = "" if claim.ratio == 1.0 else f"{claim.ratio:.2f} × "
        cells.append(f"{_fmt(*a)} vs {scaled}{_fmt(*b)}{_diff_text(diffs)}")
        verdicts.append(verdict(diffs))
    return f"| {claim.text} (`{claim.better}` vs `{worse}`) | {claim.paper} | {' / '.join(cells)} | {_both(verdicts)} |"


def _both(verdicts: list[str]) -> str:
    """One verdict from the two spaces': theirs when they agree."""
    if len(set(verdicts)) == 1:
        return verdicts[0]
    return "not resolved" if "not resolved" in verdicts or "not run" in verdicts else "spaces disagree"


def _steps(frame: pd.DataFrame, point: str) -> str:
    rows = frame[base_points(frame["point"]) == point] if "train.steps" in frame else frame.iloc[:0]
    return str(int(rows["train.steps"].iloc[0])) if len(rows) else "?"


def curve_row(frame: pd.DataFrame, summary: pd.DataFrame) -> str:
    """Is the baseline still improving fast at the budget? Its FID along CURVE; *holds* (the budget
    resolves) when the longer run gains less FID over the budget's, paired by seed, than the budget's
    own spread over seeds (the noise every comparison already carries), in both spaces."""
    steps = [_steps(frame, p) for p in CURVE]
    cells, verdicts = [], []
    for space in SPACES:
        metric = f"evaluate/fid_{space}"
        stats = [_stat(summary, p, metric) for p in CURVE]
        diffs = paired(frame, CURVE[2], CURVE[1], metric)
        cell = " → ".join(_fmt(*s) for s in stats)
        if diffs and not math.isnan(spread := stats[1][1]):
            gain = -sum(diffs) / len(diffs)
            cell += f"; {steps[1]} → {steps[2]} gains {gain:.1f} vs seed std {spread:.1f}"
            verdicts.append("holds" if gain < spread else "does not hold")
        else:
            verdicts.append("not run")
        cells.append(cell)
    return (f"| the class-conditional baseline is no longer improving fast at the budget: FID at "
            f"{' → '.join(steps)} steps (`{'`, `'.join(CURVE)}`) | 1M iterations (ADM's) | {' / '.join(cells)} | "
            f"{_both(verdicts)} |")


def label_row(summary: pd.DataFrame) -> str:
    """The joint model's label head against the FashionCNN, with the best label-head lever beside it."""
    metric = "evaluate/label_acc_ens"
    acc = _stat(summary, "joint_label", metric)
    cnn = _stat(summary, "joint_label", "representations/test_accuracy")
    if acc[2] == 0:
        return "| the label head is a competitive classifier | no number | not run | not run |"
    levers = {p: s for p in LABEL_LEVERS if not math.isnan((s := _stat(summary, p, metric))[0])}
    best = max(levers, key=lambda p: levers[p][0], default=None)
    best_acc = max(acc[0], levers[best][0] if best else -math.inf)
    done = "holds" if best_acc >= LABEL_TARGET else ("not resolved" if acc[2] < MIN_SEEDS else "does not hold")
    ours = _fmt(*acc, digits=3)
    if best is not None:
        ours += f"; best lever `{best}` {_fmt(*levers[best], digits=3)}"
    return (f"| the label head is a competitive classifier (≥ {LABEL_TARGET}, the FashionCNN's level) | no number | "
            f"{ours} vs FashionCNN {cnn[0]:.3f} | {done} |")


def _summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Every point's mean ± std over its seeds (one seed: std NaN) of the numeric metrics."""
    metrics = [c for c in frame.columns if c.startswith(("evaluate/", "representations/test_accuracy"))
               and pd.api.types.is_numeric_dtype(frame[c])]
    return seed_summary(frame, metrics, min_seeds=1)


POINT_COLUMNS = (("FID cnn", "evaluate/fid_fmnist_cnn", 1), ("FID eval", "evaluate/fid_fmnist_eval", 1),
                 ("recall cnn", "evaluate/recall_fmnist_cnn", 2), ("recall eval", "evaluate/recall_fmnist_eval", 2),
                 ("requested class", "evaluate/cond_acc_fmnist_eval", 3), ("label head", "evaluate/label_acc_ens", 3))


def points_table(comparison_csv: str | Path, grids_from: str = "../sweeps/study/points") -> str:
    """Every finished point: the main figures (mean ± std, seeds) and the sample grid of its lowest
    finished seed (``<point>.png`` at seed 0, else ``<point>__seed-<s>.png``)."""
    frame = pd.read_csv(comparison_csv)
    summary = _summary(frame)
    head = "| point | seeds | " + " | ".join(c[0] for c in POINT_COLUMNS) + " | grid |\n|---|---:|" + \
        "---:|" * len(POINT_COLUMNS) + "---|"
    rows = []
    for _, r in summary.iterrows():
        cells = []
        for _, metric, digits in POINT_COLUMNS:
            mean, std, n = _row_stat(r, metric)
            cells.append("" if n == 0 else _fmt(mean, std, n, digits, count=False))
        seed = min(per_seed(frame, r["point"], "evaluate/fid_fmnist_cnn"), default=0)
        grid, text = (r["point"], "grid") if seed == 0 else (f"{r['point']}{SEED_SUFFIX}{seed}", f"grid (seed {seed})")
        rows.append(f"| `{r['point']}` | {r['seeds']} | " + " | ".join(cells) + f" | [{text}]({grids_from}/{grid}.png) |")
    return "\n".join([head, *rows])


def verdict_table(comparison_csv: str | Path) -> str:
    frame = pd.read_csv(comparison_csv)
    summary = _summary(frame)
    head = ("| claim (lower FID first) | paper (ImageNet-64, second-hand: docs/method.md) | ours: FID fmnist_cnn / fmnist_eval, mean ± std "
            "(seeds), Δ: paired difference ± its SE | verdict (paired t, 95 %) |\n|---|---|---|---|")
    return "\n".join([head, *(claim_row(frame, summary, c) for c in CLAIMS), label_row(summary),
                      curve_row(frame, summary)])


def plot_points(comparison_csv: str | Path, path: str | Path) -> Path:
    """FID of every finished point in both spaces: one dot per seed, the mean ± std beside them,
    the points in the config's order (written atomically as PNG)."""
    frame = pd.read_csv(comparison_csv)
    frame = frame[frame["status"] == "ok"]
    base = base_points(frame["point"])
    names = list(dict.fromkeys(base))
    plt = _pyplot()
    fig, axes = plt.subplots(len(SPACES), 1, figsize=(max(6.0, 0.7 * len(names) + 2), 6.4), sharex=True)
    try:
        for ax, space in zip(axes, SPACES):
            values = [frame.loc[base == n, f"evaluate/fid_{space}"].dropna().astype(float) for n in names]
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


def plot_curve(comparison_csv: str | Path, path: str | Path) -> Path:
    """The baseline's FID against its training steps (CURVE's points) in both spaces: one dot per run,
    a seed's runs joined by a line (the paired reading), the mean per point as a square (written
    atomically as PNG)."""
    frame = pd.read_csv(comparison_csv)
    frame = frame[(frame["status"] == "ok") & base_points(frame["point"]).isin(CURVE)]
    if "train.steps" not in frame:  # no curve point run (a sweep file without the column): empty axes
        frame = frame.assign(**{"train.steps": pd.Series(dtype=float)})
    frame = frame.assign(seed=[_run_seed(row) for _, row in frame.iterrows()])
    base = base_points(frame["point"])
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(SPACES), figsize=(8.0, 3.4))
    try:
        for ax, space in zip(axes, SPACES):
            metric = f"evaluate/fid_{space}"
            for seed, runs in frame.sort_values("train.steps").groupby("seed"):  # a seed's runs joined: paired
                ax.plot(runs["train.steps"], runs[metric], "-o", color="#4C72B0", alpha=0.6, ms=4, lw=1)
                ax.annotate(f"seed {int(seed)}", (runs["train.steps"].iloc[-1], runs[metric].iloc[-1]),
                            fontsize=7, xytext=(4, 0), textcoords="offset points")
            means = frame.groupby(base)[["train.steps", metric]].mean()
            ax.plot(means["train.steps"], means[metric], "s", color="#C44E52", ms=5)
            ax.set_xlabel("training steps (batch 64)")
            ax.set_ylabel(f"FID {space}")
            ax.grid(alpha=0.3)
        fig.suptitle(f"{CURVE[1]} by training steps: runs (dots, a seed's joined), mean (squares)", fontsize=9)
        return _save(fig, path)
    finally:
        plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    from mtdiff.io import atomic_path

    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return Path(path)


def markers(block: str) -> tuple[str, str]:
    return f"<!-- {block}: python -m mtdiff.study --write -->", f"<!-- /{block} -->"


def write_between_markers(path: Path, table: str, block: str = "study-verdicts") -> bool:
    """Replace what stands between the ``block``'s markers in ``path`` with ``table`` (atomically);
    False when ``path`` has no such block."""
    from mtdiff.io import atomic_path

    text = path.read_text()
    first, last = markers(block)
    start, end = text.find(first), text.find(last)
    if start < 0 or end < start:
        return False
    with atomic_path(path) as tmp:
        tmp.write_text(text[:start + len(first)] + "\n" + table + "\n" + text[end:])
    return True


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mtdiff.study", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("comparison", nargs="?", default="sweeps/study/comparison.csv")
    ap.add_argument("--write", nargs="*", metavar="FILE", default=None,
                    help="put the table between the markers of these files (default: docs/study.md)")
    args = ap.parse_args(argv)
    if not Path(args.comparison).is_file():
        print(f"error: {args.comparison}: no study results yet (python -m flows.sweep configs/sweeps/study.yaml)",
              file=sys.stderr)
        return 2
    table = verdict_table(args.comparison)
    if args.write is None:
        print(table)
    points = points_table(args.comparison)
    for path in args.write or (["docs/study.md"] if args.write is not None else []):
        wrote = [b for b, t in (("study-verdicts", table), ("study-points", points))
                 if write_between_markers(Path(path), t, b)]
        if not wrote:
            print(f"error: {path}: no {markers('study-verdicts')[0]} block", file=sys.stderr)
            return 2
        print(f"{', '.join(wrote)} written into {path}")
    if args.write is not None:
        print(f"plot written: {plot_points(args.comparison, Path(args.comparison).with_name(PLOT))}")
        print(f"plot written: {plot_curve(args.comparison, Path(args.comparison).with_name(CURVE_PLOT))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
