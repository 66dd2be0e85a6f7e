"""dvc.yaml against DVC itself: every file that changes a result is a dep or param of the stages it
affects (the imagenet256 profile, mtdiff/config.py), the train stage is run-cacheable (identical
training params train once), and the plots are declared."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fixtures.dvc_repo import DVC, REPO, repo_copy, sh
from fixtures.tiny_run import ALL_TASKS


def _dvc_yaml() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


# -- static: what dvc.yaml declares --------------------------------------------------------------

PROFILE_FILE = "configs/${profile}.yaml"


def test_every_stage_tracks_config_py_and_its_sections_of_the_active_profile():
    """Each stage tracks the active profile's file (``configs/${profile}.yaml``, DVC templating) by the
    sections of every params.yaml key it tracks; every profile file has each such section (DVC fails
    on a missing one), the default profile's are empty, so no other profile's edits reach its runs."""
    profiles = sorted((REPO / "configs").glob("*.yaml"))
    assert {p.stem for p in profiles} >= {"default", "imagenet256"}
    for name, stage in _dvc_yaml()["stages"].items():
        assert "mtdiff/config.py" in stage["deps"], name
        base = [p for p in stage["params"] if isinstance(p, str)]
        files = {k: v for p in stage["params"] if isinstance(p, dict) for k, v in p.items()}
        assert set(files) == {PROFILE_FILE}, f"stage {name} tracks {set(files)}"
        sections = set(files[PROFILE_FILE])
        read = {b.split(".")[0] for b in base} - {"profile", "seed"}  # top-level scalars: no section
        assert read <= sections, f"stage {name}: profile sections {read - sections} not tracked"
        for prof in profiles:
            raw = yaml.safe_load(prof.read_text()) or {}
            missing = sorted(s for s in sections if not isinstance(raw.get(s), dict))
            assert not missing, f"{prof.name} lacks the section(s) {missing} that stage {name} tracks"
    default = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    assert default and all(v == {} for v in default.values())


def test_train_outputs_are_cacheable_and_plots_declared():
    dvc = _dvc_yaml()
    outs = dvc["stages"]["train"]["outs"]
    assert "checkpoints" in outs  # plain: no persist, so the run-cache can restore it
    assert not any(isinstance(o, dict) and any(v.get("persist") for v in o.values()) for o in outs)
    plots = {next(iter(p)) if isinstance(p, dict) else p: p for p in dvc["plots"]}
    assert "samples/grid.png" in plots
    (stage_plot,) = dvc["stages"]["train"]["plots"]
    assert stage_plot["metrics/train_log.csv"]["y"] == "loss"
    assert plots["loss terms"]["loss terms"]["y"] == {"metrics/train_log.csv": ["eps", *ALL_TASKS, "classifier"]}
    from mtdiff.train.meter import TRAIN_LOG_COLUMNS

    for p in plots.values():
        if isinstance(p, dict):
            for cols in next(iter(p.values()))["y"].values():
                assert set([cols] if isinstance(cols, str) else cols) <= set(TRAIN_LOG_COLUMNS)


# -- DVC in a temp git repo ----------------------------------------------------------------------

def _status(root: Path) -> set[str]:
    out = sh(root, *DVC, "status", "--json").stdout
    return set(json.loads(out or "{}"))


def _edit_profile(root: Path, key: str, value) -> None:
    path = root / "configs" / "imagenet256.yaml"
    raw = yaml.safe_load(path.read_text())
    section, leaf = key.split(".")
    raw[section][leaf] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def test_profile_edits_reach_only_its_runs_and_config_py_reaches_every_stage(tmp_path):
    root = repo_copy(tmp_path / "repo")
    # stand-in outputs (nothing is run): `dvc commit` records deps, params and outputs as they are
    for stage in _dvc_yaml()["stages"].values():
        for group in ("outs", "metrics", "plots"):
            for out in stage.get(group, []):
                path = root / (next(iter(out)) if isinstance(out, dict) else out)
                if path.suffix:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text("{}")
                else:
                    path.mkdir(parents=True, exist_ok=True)
                    (path / "stand-in").write_text("x")
    sh(root, *DVC, "commit", "-f", "-q")
    assert _status(root) == set()

    _edit_profile(root, "train.lr", 0.0003)  # another profile's edit: the default run stays as it is
    assert _status(root) == set()
    sh(root, "sed", "-i", "s/^profile: default/profile: imagenet256/", "params.yaml")
    sh(root, *DVC, "commit", "-f", "-q")  # now a run on the imagenet256 profile
    _edit_profile(root, "latents.batch_size", 32)
    assert _status(root) == {"latents", "train", "sample"}  # by section: train and sample track latents
    sh(root, *DVC, "commit", "-f", "-q")
    _edit_profile(root, "evaluate.num_samples", 100)  # representations tracks evaluate.out_dir, so the section
    assert _status(root) == {"representations", "evaluate"}
    sh(root, *DVC, "commit", "-f", "-q")
    _edit_profile(root, "data.channels", 1)
    assert _status(root) == {"prepare", "latents", "representations", "train", "sample", "evaluate"}
    sh(root, *DVC, "commit", "-f", "-q")
    with (root / "mtdiff" / "config.py").open("a") as f:
        f.write("\n# edited\n")
    assert _status(root) == set(_dvc_yaml()["stages"])


@pytest.mark.slow
def test_identical_training_params_train_once_via_the_run_cache(tiny_project, tmp_path):
    """Two experiments that differ only downstream of train (the tasks sweep's joint_label and
    joint_label_uncond) train once: the second restores checkpoints/ from DVC's run-cache.

    Also from a clone whose dvc.lock is current for the upstream stages but whose cache lacks their
    outputs (a `make run` elsewhere): DVC then reruns those stages instead of asking the run-cache,
    so the reruns must write equal bytes, or train's key (its data deps' hashes) changes every time."""
    root = tiny_project.copy(tmp_path / "repo")
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    lock["stages"] = {k: v for k, v in lock["stages"].items() if k in ("prepare", "latents", "representations")}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    sh(root, "git", "commit", "-q", "-am", "dvc.lock current for prepare .. representations")
    cache = root / ".dvc" / "cache"
    sh(root, "rm", "-rf", str(cache), str(root / "data"))  # the lock's outputs: made on another machine

    first = sh(root, *DVC, "exp", "run", "--temp", "-n", "a", "-S", "train.lr=0.002",
                "-S", "sample.condition=label", "train")
    assert "Running stage 'train'" in first.stdout, first.stdout
    second = sh(root, *DVC, "exp", "run", "--temp", "-n", "b", "-S", "train.lr=0.002",
                 "-S", "sample.condition=uncond", "train")
    assert "Stage 'train' is cached - skipping run" in second.stdout, second.stdout
    assert "Running stage 'train'" not in second.stdout
    # both experiments hold the same model
    shown = json.loads(sh(root, *DVC, "exp", "show", "--json").stdout)
    hashes = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                if rev.get("name") in ("a", "b"):
                    hashes[rev["name"]] = rev["data"]["outs"]["checkpoints"]["hash"]
    assert hashes.keys() == {"a", "b"} and hashes["a"] == hashes["b"]
