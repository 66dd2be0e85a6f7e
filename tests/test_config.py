"""Config loading: defaults, typed overrides, cross-checks, one precedence rule; the stage CLI exits 2
with one line. Per-key bad values: test_params_fuzz.py."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mtdiff.config import DEFAULT_PARAMS, ConfigError, load_params


def _error(overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load_params(DEFAULT_PARAMS, overrides=overrides)
    return str(info.value)


def test_defaults_load_and_paths(workdir):
    p = load_params(DEFAULT_PARAMS)
    assert p.data.source == "fashion_mnist" and p.diffusion.mode == "pixel"
    assert str(p.prepared_dir) == "data/prepared" and str(p.latents_dir) == "data/latents"
    assert str(p.representations_dir) == "data/representations"
    assert p.flat()["latents.scale"] == pytest.approx(0.18215)


def test_overrides_are_yaml_typed(workdir):
    p = load_params(DEFAULT_PARAMS, overrides=["data.max_per_split=200", "latents.flip=true", "latents.scale=0.5"])
    assert p.data.max_per_split == 200 and p.latents.flip is True and p.latents.scale == 0.5


# Each key's wrong type, bound, choice and unknown sibling: tests/test_params_fuzz.py (generated from the model).
def test_cross_checks_and_bad_override_syntax():
    assert "needs data.imagenet_dir" in _error({"data.source": "imagenet"})
    assert "expected key.sub=value" in _error(["latents.flip"])
    assert "no profile 'nope'" in _error({"profile": "nope"})


def test_stage_cli_bad_key_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "MTDIFF_MLFLOW": "0"}
    env.pop("MTDIFF_PARAMS", None)
    proc = subprocess.run([sys.executable, "-m", "mtdiff.stages.prepare", "bogus.key=1"], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "bogus" in lines[0] and "unknown key" in lines[0]
    assert not (tmp_path / "data").exists()


def test_typed_defaults_agree_with_params_yaml():
    """One set of defaults: params.yaml and the pydantic models say the same (issue 9)."""
    from mtdiff.config import DEFAULT_PARAMS, flatten, load_params, params_from_dict

    yaml_params = flatten(load_params(DEFAULT_PARAMS).model_dump())
    typed = flatten(params_from_dict({}).model_dump())
    machine = {"data.fashion_mnist_dir"}  # MTDIFF_FMNIST_DIR may point the loaded params elsewhere
    assert {k: v for k, v in yaml_params.items() if k not in machine} == \
        {k: v for k, v in typed.items() if k not in machine}


# -- one precedence rule: overrides > what params.yaml sets > the profile > built-in defaults (issue 30) --
def _dvc_set(tmp_path, *overrides: str):
    """params.yaml as ``dvc exp run -S <overrides>`` leaves it (DVC's own -S code), loaded."""
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    path.write_text(DEFAULT_PARAMS.read_text())
    apply_overrides(path, list(overrides))
    return load_params(path)


def _profile_leaves(name: str) -> dict:
    import yaml

    from mtdiff.config import PROFILES_DIR, flatten

    return flatten(yaml.safe_load((PROFILES_DIR / f"{name}.yaml").read_text()))


def test_params_yaml_beats_the_profile_and_the_profile_fills_the_rest(tmp_path):
    p = _dvc_set(tmp_path, "profile=imagenet256", "train.steps=1000")
    assert p.train.steps == 1000
    assert p.model.backbone == "dit" and p.diffusion.mode == "latent" and p.train.batch_size == 256
    leaves = _profile_leaves("imagenet256")
    assert len(leaves) > 40
    flat = p.flat()
    assert {k: flat[k] for k in leaves if k != "train.steps"} == \
        {k: v for k, v in leaves.items() if k != "train.steps"}
    assert _dvc_set(tmp_path, "train.steps=1000").train.steps == 1000  # the default profile
    assert _dvc_set(tmp_path, "profile=imagenet256").train.steps == leaves["train.steps"]


def test_stage_override_and_params_yaml_agree(tmp_path):
    via_file = _dvc_set(tmp_path, "profile=imagenet256", "train.steps=1000").flat()
    assert load_params(tmp_path / "params.yaml", overrides=["train.steps=1000"]).flat() == via_file
    assert load_params(DEFAULT_PARAMS, overrides=["profile=imagenet256", "train.steps=1000"]).flat() == via_file
    # an override wins over params.yaml too, also back to the built-in default
    assert load_params(tmp_path / "params.yaml", overrides=["train.steps=400"]).train.steps == 400


def test_flows_log_what_the_stages_read_once_written(tmp_path):
    """The flows validate and log ``load_repo_params(root, overrides)`` and write the overrides into
    params.yaml, where the stages read them; an override params.yaml cannot carry is refused."""
    from mtdiff.pipeline.dvc_runner import load_repo_params, write_params_overrides

    _dvc_set(tmp_path, "profile=imagenet256")
    logged = load_repo_params(tmp_path, {"train.steps": 1000, "model.size": "S"})
    write_params_overrides(tmp_path / "params.yaml", {"train.steps": 1000, "model.size": "S"})
    assert load_params(tmp_path / "params.yaml").flat() == logged.flat()
    assert logged.train.steps == 1000 and logged.model.size == "S" and logged.model.backbone == "dit"
    msg = _error_of(lambda: load_repo_params(tmp_path, {"train.warmup_steps": 100}))
    assert "train.warmup_steps=100" in msg and "would read 0" in msg and "configs/imagenet256.yaml" in msg


def _error_of(call) -> str:
    with pytest.raises(ConfigError) as info:
        call()
    return str(info.value)
