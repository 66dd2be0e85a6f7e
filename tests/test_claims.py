"""A sweep's claims table (mtdiff.pipeline.claims): claims declared as data, checked against the
sweep's points, their verdicts paired by seed, the tables written between a doc's markers."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from mtdiff.config import ConfigError
from mtdiff.pipeline.claims import load_claims, main, paired, plot_curves, points_table, verdict, verdict_table

REPO = Path(__file__).resolve().parent.parent
POINTS = ("base", "base_cfg2", "masked", "joint", "repr", "repr_ft", "uncond", "uncond_drawn", "single",
          "base_short", "base_long", "joint_w05", "joint_drop05")


def claims_file(tmp_path: Path, claims: list[dict], points: tuple[str, ...] = POINTS) -> Path:
    """A claims file over a sweep of ``points`` (all in tmp_path), with the study's reading settings."""
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "s", "points": {p: {} for p in points}}))
    path = tmp_path / "s.claims.yaml"
    path.write_text(yaml.safe_dump({
        "sweep": "s.yaml", "docs": ["doc.md"], "blocks": {"verdicts": "v", "points": "p"},
        "spaces": ["fmnist_cnn", "fmnist_eval"], "best_in": "fmnist_eval", "min_seeds": 3, "confidence": 0.95,
        "plot": "fid_per_seed.png", "header": "| claim | paper | ours | verdict |",
        "columns": [["FID cnn", "evaluate/fid_fmnist_cnn", 1]], "claims": claims}, allow_unicode=True))
    return path


def run(point: str, seed: int, cnn: float, eval_: float | None = None, **more) -> dict:
    """One finished run of ``point`` at ``seed`` (``<point>__seed-<s>`` past seed 0)."""
    return {"point": point + (f"__seed-{seed}" if seed else ""), "status": "ok", "seed": seed,
            "evaluate/fid_fmnist_cnn": cnn, "evaluate/fid_fmnist_eval": cnn if eval_ is None else eval_, **more}


def lower(a: str, b: str | list[str], **more) -> dict:
    return {"kind": "paired_lower", "text": f"{a} beats {b}", "lower": a, "than": b, **more}


def test_verdicts_pair_seeds_and_need_three(tmp_path):
    assert verdict([-5.0, -4.0, -6.0]) == "holds"          # mean -5, bound t(.975, 2) * 0.58 = 2.5
    assert verdict([5.0, 4.0, 6.0]) == "does not hold"
    assert verdict([-1.0, 1.0, -2.0]) == "not significant"   # |-0.67| < 4.30 * 0.88
    assert verdict([-5.0, -5.1]) == "not resolved"         # too few pairs to judge
    assert verdict([]) == "not run"
    # a seed's shared offset (its evaluation networks, its data order) of +-5 FID, a steady gap of 5:
    # unpaired the spreads overlap, paired seed by seed the gap is plain
    rows = [run(point, seed, fid + offset, fid + 1 + offset + 0.1 * seed)
            for point, fid in (("base", 20.0), ("masked", 15.0)) for seed, offset in enumerate((0.0, 5.0, -5.0))]
    rows.append(run("masked", 3, 1.0))  # no partner at seed 3: left out of the pairs
    rows += [run("repr", 0, 12.0), run("repr_ft", 0, 10.0)]  # one seed each
    pd.DataFrame(rows).to_csv(tmp_path / "comparison.csv", index=False)
    frame = pd.read_csv(tmp_path / "comparison.csv")
    assert paired(frame, "masked", "base", "evaluate/fid_fmnist_cnn") == [-5.0, -5.0, -5.0]
    claims = load_claims(claims_file(tmp_path, [lower("masked", "base"), lower("joint", ["base", "base_cfg2"]),
                                                lower("repr_ft", "repr")]))
    table = verdict_table(claims, tmp_path / "comparison.csv").splitlines()
    assert table[:2] == ["| claim | paper | ours | verdict |", "|---|---|---|---|"]
    assert table[2].endswith("| holds |") and "(`masked` vs `base`)" in table[2] and "vs 20.0 ± 5.0 (3), Δ -5.0 ± 0.0" in table[2]
    assert table[3].endswith("| not run |")
    assert "(`repr_ft` vs `repr`)" in table[4] and "10.0 (1) vs 12.0 (1), Δ -2.0 / " in table[4]
    assert table[4].endswith("| not resolved |")


def test_ratio_claims_and_the_best_of_several(tmp_path):
    """"Slightly worse" claims carry the paper's ratio as slack: 1.5x single's FID at every seed is not
    "slightly" worse than 26.00 / 23.22 = 1.12x, 1.05x is within it. Against several points the claim
    meets the one with the lowest mean FID in ``best_in``'s space."""
    ratio = 26.00 / 23.22
    rows = [run(point, seed, factor * single) for point, factor in (("single", 1.0), ("uncond", 1.5),
                                                                     ("uncond_drawn", 1.05))
            for seed, single in enumerate((10.0, 12.0, 11.0))]
    rows += [run("base", s, 5.0, 9.0) for s in range(3)] + [run("base_cfg2", s, 9.0, 5.0) for s in range(3)]
    pd.DataFrame(rows).to_csv(tmp_path / "c.csv", index=False)
    frame = pd.read_csv(tmp_path / "c.csv")
    assert paired(frame, "uncond", "single", "evaluate/fid_fmnist_cnn", ratio) == \
        pytest.approx([(1.5 - ratio) * f for f in (10.0, 12.0, 11.0)])
    claims = load_claims(claims_file(tmp_path, [lower("uncond", "single", ratio=[26.00, 23.22]),
                                                lower("uncond_drawn", "single", ratio=[26.00, 23.22]),
                                                lower("single", ["base", "base_cfg2"])]))
    soft, drawn, best = verdict_table(claims, tmp_path / "c.csv").splitlines()[2:]
    assert soft.endswith("| does not hold |") and "16.5 ± 1.5 (3) vs 1.12 × 11.0 ± 1.0 (3)" in soft
    assert drawn.endswith("| holds |")
    assert "(`single` vs `base_cfg2`)" in best  # base_cfg2: FID 5 in fmnist_eval, base 9


def test_write_fills_the_markers_and_plots(tmp_path):
    rows = [run(point, seed, fid + seed) for point, fid in (("base", 20.0), ("masked", 15.0)) for seed in range(3)]
    pd.DataFrame(rows).to_csv(tmp_path / "comparison.csv", index=False)
    path = claims_file(tmp_path, [lower("masked", "base")])
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- v: any command -->\nSTALE TABLE\n<!-- /v -->\n"
                      "<!-- p: any command -->\nSTALE\n<!-- /p -->\nrest\n")
    assert main([str(path), "--comparison", str(tmp_path / "comparison.csv"), "--write", str(readme)]) == 0
    text = readme.read_text()
    assert "STALE" not in text and "| holds |" in text and text.endswith("<!-- /p -->\nrest\n")
    assert "<!-- v: any command -->\n| claim |" in text and "[grid](points/masked.png)" in text  # grids from the doc
    assert (tmp_path / "fid_per_seed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # beside comparison.csv
    (tmp_path / "plain.md").write_text("no block here\n")
    assert main([str(path), "--comparison", str(tmp_path / "comparison.csv"), "--write", str(tmp_path / "plain.md")]) == 2


def target(**more) -> dict:
    return {"kind": "target", "text": "the label head is a competitive classifier", "paper": "no number",
            "point": "joint", "metric": "evaluate/label_acc_ens", "target": 0.91, "reference": "FashionCNN",
            "reference_metric": "representations/test_accuracy", **more}


def test_target_names_the_best_alternative(tmp_path):
    """A target claim: the point's metric at its seeds, the best alternative beside it; points that
    are no alternative do not count."""
    def row(point, seed, acc):
        return run(point, seed, 10.0, **{"evaluate/label_acc_ens": acc, "representations/test_accuracy": 0.914})

    rows = [row("joint", s, 0.77) for s in range(3)] + [row("uncond", 0, 0.95), row("joint_w05", 0, 0.85)]
    pd.DataFrame(rows).to_csv(tmp_path / "c.csv", index=False)
    claims = load_claims(claims_file(tmp_path, [target(alternatives=["joint_w05", "joint_drop05"])]))
    text = verdict_table(claims, tmp_path / "c.csv").splitlines()[2]
    assert text.startswith("| the label head is a competitive classifier (≥ 0.91, the FashionCNN's level) | no number |")
    assert "0.770 ± 0.000 (3); best lever `joint_w05` 0.850 (1) vs FashionCNN 0.914" in text
    assert text.endswith("| does not hold |")
    pd.DataFrame(rows + [row("joint_drop05", 0, 0.92)]).to_csv(tmp_path / "c.csv", index=False)
    assert verdict_table(claims, tmp_path / "c.csv").endswith("`joint_drop05` 0.920 (1) vs FashionCNN 0.914 | holds |")


def test_points_table_links_the_lowest_finished_seeds_grid(tmp_path):
    rows = [run("a", 0, 5.0), run("a", 1, 6.0), run("b", 2, 7.0), run("b", 1, 8.0)]
    pd.DataFrame(rows).to_csv(tmp_path / "c.csv", index=False)
    table = points_table((("FID cnn", "evaluate/fid_fmnist_cnn", 1),), tmp_path / "c.csv", grids_from="g")
    assert "| `a` | 2 | 5.5 ± 0.7 |" in table and "[grid](g/a.png) |" in table
    assert "| `b` | 2 | 7.5 ± 0.7 |" in table and "[grid (seed 1)](g/b__seed-1.png) |" in table


def test_curve_reads_the_last_step_against_the_seed_spread_before_it(tmp_path):
    """The budget resolves ("holds") when the longer run gains less FID over the budget's run, paired
    by seed, than the budget's own spread over seeds; it does not when the longer run gains more."""
    def row(point, seed, steps, fid):
        return run(point, seed, fid, fid + 1, **{"train.steps": steps})

    curve = ["base_short", "base", "base_long"]
    claims = load_claims(claims_file(tmp_path, [{"kind": "curve", "text": "no longer improving fast",
                                                 "points": curve, "plot": "curve.png"}]))
    budget = [row("base", s, 1500, fid) for s, fid in enumerate((10.0, 12.0, 8.0))]  # std 2
    for longer, gain, expect in ((9.5, 0.5, "holds"), (4.0, 6.0, "does not hold")):
        rows = budget + [row("base_short", 0, 750, 20.0), row("base_long", 0, 3000, longer)]
        pd.DataFrame(rows).to_csv(tmp_path / "c.csv", index=False)
        text = verdict_table(claims, tmp_path / "c.csv").splitlines()[2]
        assert "no longer improving fast: FID at 750 → 1500 → 3000 steps" in text and text.endswith(f"| {expect} |")
        assert f"20.0 (1) → 10.0 ± 2.0 (3) → {longer:.1f} (1); 1500 → 3000 gains {gain:.1f} vs seed std 2.0" in text
    png = plot_curves(tmp_path / "c.csv", tmp_path / "curve.png", {"base": tuple(curve)}, claims.spaces)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pd.DataFrame(budget).to_csv(tmp_path / "c.csv", index=False)
    assert verdict_table(claims, tmp_path / "c.csv").endswith("| not run |")
    # points not run yet: their steps as the sweep config plans them ("?" where it does not say)
    sweep = yaml.safe_load((tmp_path / "s.yaml").read_text())
    sweep["points"]["base_long"] = {"train.steps": 3000}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep))
    claims = load_claims(tmp_path / "s.claims.yaml")
    assert "FID at ? → 1500 → 3000 steps" in verdict_table(claims, tmp_path / "c.csv")


def test_curves_plot_draws_every_curve_claim_in_one_figure(tmp_path):
    """With ``curves_plot`` the file's curve claims (each named by its label) share one plot beside
    the csv, each keeping its own; without the key only their own are drawn."""
    rows = [run(p, s, fid + s, **{"train.steps": steps}) for p, steps, fid in (
        ("base_short", 750, 20.0), ("base", 1500, 12.0), ("base_long", 3000, 9.0),
        ("joint_w05", 750, 22.0), ("joint", 1500, 13.0), ("joint_drop05", 3000, 8.0)) for s in range(2)]
    pd.DataFrame(rows).to_csv(tmp_path / "comparison.csv", index=False)
    curves = [{"kind": "curve", "text": f"{name} resolves", "points": points, "plot": f"{name}.png", "label": name}
              for name, points in (("baseline", ["base_short", "base", "base_long"]),
                                   ("joint", ["joint_w05", "joint", "joint_drop05"]))]
    path = claims_file(tmp_path, curves)
    (tmp_path / "doc.md").write_text("<!-- v: x -->\n<!-- /v -->\n<!-- p: x -->\n<!-- /p -->\n")
    assert main([str(path), "--comparison", str(tmp_path / "comparison.csv"), "--write", str(tmp_path / "doc.md")]) == 0
    assert {p.name for p in tmp_path.glob("*.png")} == {"fid_per_seed.png", "baseline.png", "joint.png"}
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**raw, "curves_plot": "all_curves.png"}))
    assert load_claims(path).claims[0].name == "baseline"
    assert main([str(path), "--comparison", str(tmp_path / "comparison.csv"), "--write", str(tmp_path / "doc.md")]) == 0
    assert (tmp_path / "all_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    path.write_text(yaml.safe_dump({**raw, "curve_plots": "x.png"}))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['curve_plots'\].*optional: curves_plot"):
        load_claims(path)


@pytest.mark.parametrize("claim, named", [
    (lower("masked", "no_such_point"), "unknown point 'no_such_point'; allowed (the sweep's points): base, "),
    (lower("masked", ["base", "nope"]), "unknown point 'nope'"),
    ({**lower("masked", "base"), "kind": "paired_higher"},
     "unknown kind 'paired_higher'; allowed: paired_lower, target, curve"),
    ({**lower("masked", "base"), "metric": "x"}, "unknown key(s) ['metric'] for kind paired_lower; allowed: lower, "),
    (lower("masked", "base", ratio=[1.0]), "ratio: expected a number or [a, b]"),
])
def test_a_claims_file_naming_an_unknown_point_or_kind_fails_naming_it_and_the_allowed(tmp_path, claim, named):
    with pytest.raises(ConfigError) as err:
        load_claims(claims_file(tmp_path, [claim]))
    assert named in str(err.value) and "claims[0]" in str(err.value)


def test_the_studys_claims_name_only_its_points():
    claims = load_claims(REPO / "configs" / "sweeps" / "study.claims.yaml")
    assert claims.sweep == "study" and {type(c).__name__ for c in claims.claims} == {"PairedLower", "Target", "Curve"}


def test_every_committed_claims_file_loads_and_its_docs_carry_its_blocks():
    for path in sorted((REPO / "configs" / "sweeps").glob("*.claims.yaml")):
        claims = load_claims(path)
        for doc in claims.docs:
            text = (REPO / doc).read_text()
            for block in claims.blocks.values():
                assert f"<!-- {block}:" in text and f"<!-- /{block} -->" in text, (path.name, doc, block)
