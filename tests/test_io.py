"""Atomic outputs: an exception or a kill mid-write leaves the old output (or none), never a partial one."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from mtdiff.io import OUTPUT_MARKER, atomic_dir, atomic_path, save_npy, sha1_bytes, sha1_file, write_json


def test_atomic_path_exception_keeps_old(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "partial')
            raise RuntimeError("killed mid-write")
    assert target.read_text().strip().replace(" ", "").replace("\n", "") == '{"v":1}'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp file left


def test_atomic_path_success_replaces(tmp_path):
    target = tmp_path / "a.npy"
    save_npy(target, np.zeros(3))
    save_npy(target, np.arange(4))
    assert np.load(target).tolist() == [0, 1, 2, 3]
    assert sha1_file(target) == sha1_bytes(target.read_bytes())


def test_atomic_dir_exception_keeps_old_and_cleans(tmp_path):
    target = tmp_path / "prepared"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(ValueError):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("new")
            (tmp / "b.txt").write_text("partial")
            raise ValueError("boom")
    assert sorted(p.name for p in target.iterdir()) == [OUTPUT_MARKER, "a.txt"]
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]


def test_atomic_dir_fresh_exception_leaves_nothing(tmp_path):
    with pytest.raises(KeyError):
        with atomic_dir(tmp_path / "latents") as tmp:
            (tmp / "mean.npy").write_bytes(b"123")
            raise KeyError("x")
    assert list(tmp_path.iterdir()) == []


def test_sigkill_inside_atomic_dir_keeps_old(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "ok.txt").write_text("old")
    code = textwrap.dedent(f"""
        import os, signal, sys
        from pathlib import Path
        from mtdiff.io import atomic_dir
        with atomic_dir(Path({str(target)!r})) as tmp:
            (tmp / "ok.txt").write_text("new")
            (tmp / "half.txt").write_text("partial")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], timeout=600)
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in target.iterdir()) == [OUTPUT_MARKER, "ok.txt"]
    assert (target / "ok.txt").read_text() == "old"


def _wait_for(pred, proc, timeout: float) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def test_prepare_killed_mid_stage_leaves_no_output(fmnist_dir, tmp_path):
    """SIGKILL while prepare writes its temp folder: no data/prepared appears (and an old one survives)."""
    env = {**os.environ, "MTDIFF_MLFLOW": "0"}
    env.pop("MTDIFF_PARAMS", None)
    # Upscaling every image keeps the stage busy for seconds after the temp folder exists: all 70k real
    # images to 96 px, or the test fixture's few hundred to 256 px.
    real = (fmnist_dir / "train-images-idx3-ubyte.gz").stat().st_size > 10_000_000
    cmd = [sys.executable, "-m", "mtdiff.stages.prepare", f"data.fashion_mnist_dir={fmnist_dir}",
           f"data.resolution={96 if real else 256}", "data.out_dir=data"]
    data = tmp_path / "data"

    def temp_dirs():
        return list(data.glob(".prepared.*.tmp")) if data.exists() else []

    for old in (False, True):
        if old:
            with atomic_dir(data / "prepared") as prev:
                (prev / "marker.txt").write_text("old output")
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            started = _wait_for(lambda: bool(temp_dirs()), proc, timeout=240)
            assert started, f"prepare ended before writing (rc={proc.poll()}): {proc.stderr.read()[-2000:]!r}"
            time.sleep(0.3)
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.stderr.close()
        if old:
            assert sorted(p.name for p in (data / "prepared").iterdir()) == [OUTPUT_MARKER, "marker.txt"]
        else:
            assert not (data / "prepared").exists()


def test_atomic_outputs_follow_umask_and_stale_temp_dirs_are_removed(tmp_path):
    import os
    import stat

    from mtdiff.io import atomic_dir, write_json

    old = os.umask(0o022)
    try:
        stale = tmp_path / ".out.abc.tmp"
        stale.mkdir()
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "x").write_text("1")
        write_json(tmp_path / "m.json", {"a": 1})
    finally:
        os.umask(old)
    assert not stale.exists()
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644


def test_atomic_file_write_removes_a_killed_writers_temp_file_only_its_own(tmp_path):
    """A SIGKILLed ``save_checkpoint`` leaves ``.last.pt.<random>.tmp``; the next write of last.pt
    removes it, and leaves the temp files of other outputs (``last.pt.bak``) alone."""
    from mtdiff.io import save_torch

    own = tmp_path / ".last.pt.of00md0m.tmp"
    other = tmp_path / ".last.pt.bak.k2j4x9aa.tmp"
    own.write_bytes(b"PK half a zip")
    other.write_bytes(b"another output's write in flight")
    save_torch(tmp_path / "last.pt", {"step": 2})
    assert not own.exists()
    assert other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "last.pt"]


def test_save_torch_equal_objects_give_equal_bytes(tmp_path):
    """torch.save names its zip's root after the path it writes; through the random temp name that
    would make every save differ (and every DVC hash of a checkpoint folder)."""
    import torch

    from mtdiff.io import save_torch

    obj = {"state_dict": {"w": torch.arange(6.0).reshape(2, 3)}, "step": 3}
    a, b = save_torch(tmp_path / "a.pt", obj), save_torch(tmp_path / "sub" / "b.pt", obj)
    assert a.read_bytes() == b.read_bytes()
    assert torch.equal(torch.load(b, weights_only=True)["state_dict"]["w"], obj["state_dict"]["w"])
