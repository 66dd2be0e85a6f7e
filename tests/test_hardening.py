"""Issue 11 (hardening): bad params, bad files and dangerous paths fail early with one clear line,
and nothing the pipeline did not make is ever deleted."""
from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mtdiff.config import DEFAULT_PARAMS, ConfigError, load_params

REPO = Path(__file__).resolve().parent.parent


def _load(tmp_path, monkeypatch, **over):
    """Params rooted in a fresh project folder (dvc.yaml present) ``tmp_path/proj`` as the cwd."""
    proj = tmp_path / "proj"
    proj.mkdir(exist_ok=True)
    (proj / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(proj)
    monkeypatch.delenv("MTDIFF_OUTPUT_ROOTS", raising=False)
    return load_params(DEFAULT_PARAMS, overrides=over)


# -- 18: a fresh machine runs the data tests on a generated IDX fixture -------------------------
def test_fixture_idx_is_real_fashion_mnist_format(tmp_path):
    from fixtures import fmnist_idx

    from mtdiff import sources

    folder = fmnist_idx.build(tmp_path / "f", sizes={"train": 30, "test": 20})
    imgs = sources.read_idx(folder / "train-images-idx3-ubyte.gz")
    labels = sources.read_idx(folder / "train-labels-idx1-ubyte.gz")
    assert imgs.shape == (30, 28, 28) and imgs.dtype == np.uint8 and labels.shape == (30,)
    raw = gzip.decompress((folder / "t10k-images-idx3-ubyte.gz").read_bytes())
    assert raw[:4] == bytes([0, 0, 8, 3]) and int.from_bytes(raw[4:8], "big") == 20
    again = fmnist_idx.build(tmp_path / "g", sizes={"train": 30, "test": 20})
    assert (again / "train-images-idx3-ubyte.gz").read_bytes() == (folder / "train-images-idx3-ubyte.gz").read_bytes()


def test_fmnist_dir_env_points_params_at_the_fixture(tmp_path, monkeypatch):
    monkeypatch.setenv("MTDIFF_FMNIST_DIR", str(tmp_path / "idx"))
    assert load_params(DEFAULT_PARAMS).data.fashion_mnist_dir == str(tmp_path / "idx")
    # an explicit key=value override still wins
    assert load_params(DEFAULT_PARAMS, overrides=["data.fashion_mnist_dir=/x"]).data.fashion_mnist_dir == "/x"


# -- 1: output folders -------------------------------------------------------------------------
@pytest.mark.parametrize("over, words", [
    ({"sample.out_dir": "checkpoints"}, "overlap"),
    ({"evaluate.out_dir": "data/metrics"}, "overlap"),
    ({"train.out_dir": "~/ckpt"}, "outside the project"),
    ({"sample.out_dir": "../elsewhere"}, "outside the project"),
    ({"sample.out_dir": "/tmp/../etc"}, "outside the project"),
    ({"evaluate.out_dir": "."}, "project folder"),
    ({"evaluate.out_dir": "mtdiff"}, "part of the project"),
    ({"data.out_dir": "in", "data.fashion_mnist_dir": "in/fmnist"}, "input"),
])
def test_dangerous_out_dirs_are_refused_at_load(tmp_path, monkeypatch, over, words):
    with pytest.raises(ConfigError, match=words):
        _load(tmp_path, monkeypatch, **over)


def test_out_dir_symlinked_onto_another_output_is_refused(tmp_path, monkeypatch):
    proj = tmp_path / "proj"
    (proj / "checkpoints").mkdir(parents=True)
    (proj / "samples").symlink_to(proj / "checkpoints", target_is_directory=True)
    with pytest.raises(ConfigError, match="overlap"):
        _load(tmp_path, monkeypatch)


def test_sample_out_dir_checkpoints_cannot_delete_last_pt(tmp_path, monkeypatch):
    """Even past the params check, atomic_dir never replaces a folder it did not make."""
    from mtdiff.io import OutputError, atomic_dir

    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    (ckpt / "last.pt").write_bytes(b"weights")
    with pytest.raises(OutputError, match="not written by an mtdiff stage"):
        with atomic_dir(ckpt) as tmp:
            (tmp / "samples.npz").write_bytes(b"x")
    assert (ckpt / "last.pt").read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]


def test_outputs_inside_the_project_or_allowed_roots_load(tmp_path, monkeypatch):
    params = _load(tmp_path, monkeypatch)
    assert params.samples_dir == Path("samples")
    monkeypatch.setenv("MTDIFF_OUTPUT_ROOTS", str(tmp_path / "scratch"))
    load_params(DEFAULT_PARAMS, overrides={"data.out_dir": str(tmp_path / "scratch" / "data")})


# -- 7: malformed params.yaml ------------------------------------------------------------------
@pytest.mark.parametrize("content, words", [
    (b"train:\n  steps: [1, 2\n", "malformed YAML"),
    (b"train:\n\tsteps: 3\n", "malformed YAML"),
    (b"seed: 0\ndata:\n  out_dir: d\xe9j\xe0\n", "not UTF-8"),
])
def test_malformed_params_yaml_is_one_line_exit_2(tmp_path, content, words):
    bad = tmp_path / "params.yaml"
    bad.write_bytes(content)
    with pytest.raises(ConfigError, match=words):
        load_params(bad)
    env = {**os.environ, "MTDIFF_PARAMS": str(bad), "MTDIFF_MLFLOW": "0"}
    proc = subprocess.run([sys.executable, "-m", "mtdiff.stages.prepare"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and str(bad) in lines[0] and "Traceback" not in proc.stderr


def test_config_failure_is_not_retried_by_the_flow():
    from mtdiff.pipeline.dvc_runner import StageConfigError, failure_for

    lines = ["ERROR: failed to reproduce 'prepare': failed to run: python -m mtdiff.stages.prepare, exited with 2"]
    assert isinstance(failure_for("prepare", 1, lines), StageConfigError)


# -- 10: strict types and cross-checks at load time ----------------------------------------------
# (a plain wrong type or bound per key: test_params_fuzz.py; here the look-alikes strict typing refuses)
@pytest.mark.parametrize("over, words", [
    ({"seed": True}, "seed"),
    ({"train.steps": "3000"}, "train.steps"),
    ({"train.tf32": 1}, "train.tf32"),
    ({"train.lr": "0.1"}, "train.lr"),
    ({"evaluate.classify_t": [0, 10]}, "classify_t"),
    ({"evaluate.classify_t": [1, 1001]}, "classify_t"),
    ({"model.backbone": "dit", "data.resolution": 30}, "patch_size"),
    ({"model.backbone": "dit", "diffusion.mode": "latent", "data.resolution": 64, "model.patch_size": 16},
     "patch_size"),
])
def test_bad_types_and_values_fail_at_load(over, words):
    with pytest.raises(ConfigError, match=words):
        load_params(DEFAULT_PARAMS, overrides=over)


def test_int_for_float_and_exponent_floats_still_load(tmp_path):
    p = load_params(DEFAULT_PARAMS, overrides=["train.lr=1", "train.weight_decay=1e-4"])
    assert p.train.lr == 1.0 and p.train.weight_decay == pytest.approx(1e-4)
    f = tmp_path / "params.yaml"
    f.write_text(DEFAULT_PARAMS.read_text().replace("lr: 0.001", "lr: 1e-3"))
    assert load_params(f).train.lr == pytest.approx(1e-3)


# -- 11: profiles are plain names in configs/ ----------------------------------------------------
@pytest.mark.parametrize("profile", ["../../somewhere/evil", "/etc/passwd", "sub/x", "..", ".hidden"])
def test_profile_must_be_a_plain_name(tmp_path, profile):
    evil = tmp_path / "evil.yaml"
    evil.write_text("seed: 7\n")
    with pytest.raises(ConfigError, match="profile"):
        load_params(DEFAULT_PARAMS, overrides={"profile": profile})


def test_known_profile_still_loads():
    assert load_params(DEFAULT_PARAMS, overrides={"profile": "imagenet256", "data.imagenet_dir": "/x"}).profile == "imagenet256"


# -- 8: a corrupt checkpoint is named, kept, and not retried ------------------------------------
def _real_checkpoint(path: Path, step: int = 3, phash: str = "h") -> bytes:
    import torch

    from mtdiff.checkpoint import save_checkpoint

    save_checkpoint(path, {"step": step, "params_hash": phash, "ema": {"w": torch.ones(64, 64) * step},
                           "meta": {}})
    return path.read_bytes()


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage", "not_a_dict"])
def test_corrupt_checkpoint_is_named_and_kept(tmp_path, kind):
    import torch

    from mtdiff.checkpoint import CheckpointError, load_checkpoint

    path = tmp_path / "last.pt"
    good = _real_checkpoint(path)
    content = {"empty": b"", "truncated": good[: len(good) // 2], "garbage": os.urandom(4096)}.get(kind)
    if content is None:
        torch.save([1, 2, 3], path)
        content = path.read_bytes()
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert str(path) in msg and "move it away" in msg and "\n" not in msg
    assert isinstance(err.value, ConfigError)  # stage_main: exit 2; the flow does not retry it
    assert path.read_bytes() == content  # never deleted or changed


def test_corrupt_checkpoint_in_a_stage_is_one_line_exit_2(tmp_path):
    """stage_main turns a ConfigError raised inside run() (here CheckpointError) into exit 2 with one
    line, which the flow does not retry; before, it was a traceback with exit 1 (retried twice)."""
    proj = tmp_path / "proj"
    (proj / "checkpoints").mkdir(parents=True)
    (proj / "dvc.yaml").write_text("stages: {}\n")
    last = proj / "checkpoints" / "last.pt"
    last.write_bytes(b"garbage, not a checkpoint" * 10)
    env = {k: v for k, v in os.environ.items() if k not in ("MTDIFF_PARAMS", "MTDIFF_OUTPUT_ROOTS")}
    env.update(MTDIFF_MLFLOW="0", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "mtdiff.stages.sample", "train.device=cpu"], cwd=proj, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "checkpoints/last.pt" in lines[0] and "Traceback" not in proc.stderr
    assert last.read_bytes() == b"garbage, not a checkpoint" * 10  # kept as it was


# -- 6: ema.pt older than last.pt (killed between the two writes) ------------------------------
def test_inference_skips_an_ema_pt_that_does_not_match_last_pt(tmp_path, monkeypatch):
    from mtdiff.checkpoint import EMA, LAST, default_inference_path

    params = load_params(DEFAULT_PARAMS, overrides={"train.out_dir": str(tmp_path / "ck")})
    ck = tmp_path / "ck"
    _real_checkpoint(ck / LAST, step=8)
    _real_checkpoint(ck / EMA, step=8)
    assert default_inference_path(params) == ck / EMA
    _real_checkpoint(ck / LAST, step=12)  # the kill came before ema.pt of step 12 was written
    assert default_inference_path(params) == ck / LAST
    (ck / EMA).write_bytes(b"junk")  # a broken ema.pt: the EMA inside last.pt is used
    assert default_inference_path(params) == ck / LAST
    (ck / LAST).unlink()
    assert default_inference_path(params) == ck / EMA


# -- 4: every set-aside checkpoint is kept -------------------------------------------------------
def test_move_aside_keeps_every_checkpoint_it_sets_aside(tmp_path, caplog):
    from mtdiff.checkpoint import EMA, LAST, move_aside

    (tmp_path / "last.pt.stale").write_text("legacy")  # the old single name is never overwritten either
    for n in range(3):
        (tmp_path / LAST).write_text(f"last {n}")
        (tmp_path / EMA).write_text(f"ema {n}")
        with caplog.at_level("WARNING"):
            moved = move_aside(tmp_path, f"params changed {n}")
        assert [p.name for p in moved] == [f"last.pt.stale.{n + 1}", f"ema.pt.stale.{n + 1}"]
        assert str(moved[0]) in caplog.text
    assert (tmp_path / "last.pt.stale").read_text() == "legacy"
    assert [(tmp_path / f"last.pt.stale.{n + 1}").read_text() for n in range(3)] == ["last 0", "last 1", "last 2"]
    assert not (tmp_path / LAST).exists() and move_aside(tmp_path, "nothing there") == []


# -- 9: broken IDX files are named ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["truncated_gzip", "not_gzip", "short_header", "empty"])
def test_broken_idx_file_is_named(tmp_path, kind):
    from mtdiff import sources

    bad = tmp_path / "train-images-idx3-ubyte.gz"
    full = gzip.compress(bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\1" * 1568)
    bad.write_bytes({"truncated_gzip": full[: len(full) // 2], "not_gzip": b"PK\3\4 this is a zip" * 10,
                     "short_header": gzip.compress(bytes([0, 0, 8, 3, 0, 0])), "empty": b""}[kind])
    with pytest.raises(sources.DataSourceError) as err:
        sources.read_idx(bad)
    assert str(bad) in str(err.value)


# -- 2, 3, 14: the ImageNet reader ---------------------------------------------------------------
from fixtures.imagenet_tree import jpeg_bytes, noise_image  # noqa: E402


def test_missing_val_is_found_before_decoding(tiny_imagenet, make_params, monkeypatch):
    import shutil

    from mtdiff import sources
    from mtdiff.stages import prepare

    shutil.rmtree(tiny_imagenet / "val")
    calls = []
    monkeypatch.setattr(sources, "write_imagenet_split", lambda *a, **k: calls.append(a) or 1 / 0)
    params = make_params({"data.source": "imagenet", "data.imagenet_dir": str(tiny_imagenet),
                          "data.resolution": 32, "data.channels": 3})
    with pytest.raises(sources.DataSourceError, match="no val/ folder"):
        prepare.run(params)
    assert calls == []  # no split was decoded


def test_non_utf8_file_names_are_kept_losslessly(tiny_imagenet, make_params):
    import json

    import pandas as pd

    from mtdiff import sources
    from mtdiff.stages import prepare

    raw_name = b"n01440764_caf\xe9.JPEG"  # Latin-1, not UTF-8
    folder = os.fsencode(tiny_imagenet / "train" / "n01440764")
    with open(os.path.join(folder, raw_name), "wb") as f:
        f.write(jpeg_bytes(noise_image(np.random.default_rng(1), 64, 64)))
    params = make_params({"data.source": "imagenet", "data.imagenet_dir": str(tiny_imagenet),
                          "data.resolution": 32, "data.channels": 3, "prepare.num_workers": 0})
    prepare.run(params)
    man = pd.read_parquet(params.prepared_dir / "manifest.parquet")
    stored = [p for p in man.source_path if p.startswith(sources.MANIFEST_HEX_PREFIX)]
    assert len(stored) == 1
    assert sources.manifest_path_to_fs(stored[0]) == os.path.join(folder, raw_name)
    report = json.loads((params.prepared_dir / "report.json").read_text())
    assert report["splits"]["train"]["non_utf8_names"] == 1


def test_symlinks_out_of_the_tree_and_huge_files_are_refused(tiny_imagenet, make_params, tmp_path, monkeypatch):
    import json

    from mtdiff import sources
    from mtdiff.stages import prepare

    secret = tmp_path / "outside.JPEG"
    secret.write_bytes(jpeg_bytes(noise_image(np.random.default_rng(2), 64, 64)))
    cls = tiny_imagenet / "train" / "n01443537"
    (cls / "leak.JPEG").symlink_to(secret)
    (cls / "inside_link.JPEG").symlink_to(cls / "gray.JPEG")  # a link within the tree is fine
    largest = max(f.stat().st_size for f in tiny_imagenet.rglob("*") if f.is_file())
    (cls / "big.JPEG").write_bytes(b"\xff" * (largest + 1000))
    monkeypatch.setattr(sources, "MAX_FILE_BYTES", largest + 500)
    params = make_params({"data.source": "imagenet", "data.imagenet_dir": str(tiny_imagenet),
                          "data.resolution": 32, "data.channels": 3, "prepare.num_workers": 0})
    prepare.run(params)
    rep = json.loads((params.prepared_dir / "report.json").read_text())["splits"]["train"]
    assert rep["skipped"]["symlink_outside"] == 1 and rep["skipped"]["file_too_large"] == 1
    assert any(f["path"].endswith("leak.JPEG") for f in rep["skipped_files"])


def test_decompression_bomb_limit_is_enforced(monkeypatch):
    import io

    from PIL import Image

    from mtdiff import sources

    buf = io.BytesIO()
    Image.new("L", (300, 300)).save(buf, format="PNG")
    monkeypatch.setattr(sources, "MAX_IMAGE_PIXELS", 200 * 200)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a library lifted PIL's limit
    dec = sources.decode_image_bytes(buf.getvalue(), "x.png", 32, 3)
    assert dec.image is None and dec.reason == "too_large"


# -- 12: sweep values and targets pass to dvc literally, or not at all ----------------------------
@pytest.mark.parametrize("config, words", [
    ({"points": {"a": {"train.out_dir": "${HOME}/x"}}}, "interpolated"),
    ({"grid": {"sample.condition": ["label", "${oops}"]}}, "interpolated"),
    ({"points": {"a": {"evaluate.classify_t": [1, "${x}"]}}}, "interpolated"),
    ({"points": {"a": {"train.steps": 5}}, "targets": ["--force"]}, "dvc option"),
    ({"points": {"a": {"train.steps": 5}}, "targets": ["-f"]}, "dvc option"),
])
def test_sweep_refuses_interpolation_and_option_targets(config, words):
    from mtdiff.pipeline.sweeps import load_sweep

    with pytest.raises(ConfigError, match=words):
        load_sweep(config)


def test_exp_run_args_refuse_option_like_targets_and_interpolation():
    from mtdiff.pipeline.sweeps import exp_run_args

    with pytest.raises(ConfigError):
        exp_run_args("e", {"train.steps": 5}, ["--run-all"])
    with pytest.raises(ConfigError):
        exp_run_args("e", {"train.out_dir": "${x}"})
    assert exp_run_args("e", {"train.steps": 5}, ["train"])[-1] == "train"


# -- 15: credentials in the tracking URI are never shown -----------------------------------------
def test_tracking_uri_credentials_are_redacted(tmp_path, monkeypatch, caplog):
    from mtdiff.pipeline import tracking
    from mtdiff.pipeline.dvc_runner import summary_text

    uri = "http://alice:s3cret@127.0.0.1:9/mlflow?token=abc123"
    assert tracking.redact_uri(uri) == "http://***@127.0.0.1:9/mlflow?token=***"
    assert tracking.redact_uri("sqlite:///x/mlflow.db") == "sqlite:///x/mlflow.db"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MTDIFF_MLFLOW", "1")


    def down(client, name, uri_):  # the server is down; MLflow's error repeats the URI
        raise ConnectionError(f"API request to {uri_} failed")

    monkeypatch.setattr(tracking, "experiment_id", down)
    params = load_params(DEFAULT_PARAMS, overrides={"mlflow.tracking_uri": uri})
    with caplog.at_level("WARNING"):
        with tracking.stage_run(params, "prepare") as run:
            assert run.run_id is None
    kept = tracking.pending_file("prepare").read_text()
    for text in (caplog.text, kept, summary_text(tmp_path, params, [], {}, uri, None, "")):
        assert "s3cret" not in text and "abc123" not in text


def test_pending_queue_lives_outside_stage_outputs(tmp_path, monkeypatch):
    from mtdiff.pipeline import tracking

    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    monkeypatch.setenv("MTDIFF_MLFLOW", "0")  # switched off: records are still kept
    assert tracking.pending_file("train") == tmp_path / ".mtdiff" / "mlflow_pending" / "train.jsonl"
    params = load_params(DEFAULT_PARAMS, overrides={"train.out_dir": str(tmp_path / "checkpoints")})
    with tracking.stage_run(params, "train", params.checkpoints_dir) as run:
        run.log_metrics({"a": 1.0})
    assert not params.checkpoints_dir.exists()
    assert "log_metrics" in tracking.pending_file("train").read_text()


# -- 17: one pipeline run per project at a time --------------------------------------------------
def test_second_pipeline_run_is_refused_at_once(tmp_path):
    import textwrap
    import time

    from mtdiff.pipeline.dvc_runner import PipelineBusy, pipeline_lock

    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from mtdiff.pipeline.dvc_runner import pipeline_lock
        with pipeline_lock(Path({str(tmp_path)!r})):
            print("held", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with pytest.raises(PipelineBusy, match=f"pid {holder.pid}"):
            with pipeline_lock(tmp_path):
                pass
        assert time.monotonic() - start < 5
    finally:
        holder.kill()
        holder.wait()
    with pipeline_lock(tmp_path):  # a killed holder leaves no stale lock behind
        pass


# -- round 2: a full disk, and data errors, are one line with exit 2 -------------------------------
def _stage(proj: Path, *args: str, preexec_fn=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MTDIFF_PARAMS", "MTDIFF_OUTPUT_ROOTS")}
    env.update(MTDIFF_MLFLOW="0", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-m", *args], cwd=proj, env=env, capture_output=True, text=True,
                          timeout=180, preexec_fn=preexec_fn)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_full_disk_is_one_line_exit_2_and_keeps_the_previous_outputs(tmp_path):
    """A write past the file-size limit fails as a full disk does (EFBIG; ENOSPC alike): the stage
    exits 2 with one line naming the file and the cause, the previous complete outputs are as they
    were, and no temp file is left."""
    import resource
    import signal

    from fixtures.fmnist_idx import build

    fmnist = build(tmp_path / "fmnist", sizes={"train": 64, "test": 32})
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "dvc.yaml").write_text("stages: {}\n")
    args = ["mtdiff.stages.prepare", f"data.fashion_mnist_dir={fmnist}", "prepare.num_workers=0"]
    first = _stage(proj, *args, "data.max_per_split=16")
    assert first.returncode == 0, first.stderr
    before = _files(proj / "data")

    def small_disk():  # the kernel then answers EFBIG instead of killing with SIGXFSZ
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    full = _stage(proj, *args, "data.max_per_split=64", preexec_fn=small_disk)
    assert full.returncode == 2, full.stderr
    lines = [ln for ln in full.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in full.stderr, full.stderr
    assert "File too large" in lines[0] or "disk full or file-size limit" in lines[0], lines[0]
    assert "data/prepared" in lines[0]  # the output that could not be written
    assert _files(proj / "data") == before
    assert not [p for p in proj.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]


def test_broken_data_file_in_a_stage_is_one_line_exit_2(tmp_path):
    from fixtures.fmnist_idx import build

    fmnist = build(tmp_path / "fmnist", sizes={"train": 16, "test": 16})
    images = fmnist / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:100])  # truncated download
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "dvc.yaml").write_text("stages: {}\n")
    proc = _stage(proj, "mtdiff.stages.prepare", f"data.fashion_mnist_dir={fmnist}", "prepare.num_workers=0")
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and str(images) in lines[0] and "Traceback" not in proc.stderr, proc.stderr
