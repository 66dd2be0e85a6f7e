"""DDP: two gloo processes on CPU under torchrun run the real stage CLI; rank 0 alone writes, the
ranks end with identical weights, and a DDP run resumes from its own checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fixtures.tiny_run import data_root, link_data, tiny_params

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory):
    return data_root(tmp_path_factory, tasks=("masked",))


def _torchrun(root, overrides: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "MTDIFF_MLFLOW": "0", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "mtdiff.stages.train", *overrides]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=180)


def _overrides(root, **extra) -> list[str]:
    params = tiny_params(root, **{"tasks.masked.enabled": True, **extra})
    keys = ["data.out_dir", "train.out_dir", "sample.out_dir", "evaluate.out_dir", "data.max_per_split",
            "model.channels", "model.channel_mult", "model.attn_resolutions", "model.depth", "model.hidden_size", "model.num_heads", "model.head_hidden", "diffusion.timesteps",
            "train.batch_size", "train.warmup_steps", "train.log_every", "train.ckpt_every", "train.steps",
            "train.device", "sample.steps", "representations.epochs", "tasks.masked.enabled"]
    flat = params.flat()
    return [f"{k}={flat[k]}".replace(" ", "") for k in keys]


def test_ddp_two_gloo_processes(shared_data, workdir):
    from mtdiff.checkpoint import load_checkpoint

    link_data(shared_data, workdir)
    res = _torchrun(workdir, _overrides(workdir, **{"train.steps": 4, "train.ckpt_every": 2}))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "DDP rank 1/2" in res.stderr and "DDP rank 0/2" in res.stderr

    summary = json.loads((workdir / "metrics" / "train.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert summary["ranks_in_sync"] is True  # fingerprints of model + EMA all-gathered and compared
    state = load_checkpoint(workdir / ".mtdiff" / "train_state" / "checkpoints" / "last.pt")
    assert state["step"] == 4 and len(state["rng"]) == 2  # one RNG bundle per rank
    # the two ranks drew different noise (distinct per-rank streams), yet hold the same weights
    assert not torch.equal(state["rng"][0]["noise"], state["rng"][1]["noise"])
    # rank 0 alone writes: exactly one set of outputs, no temp leftovers
    written = sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name != "mlflow_pending.jsonl")
    assert written == ["ema.pt"]  # the output; last.pt is the resumable state in .mtdiff/train_state/
    # global batch 16 over 2 ranks: 64 images -> 4 steps per epoch, so step 4 closes epoch 0
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 0)

    # extending the run under DDP resumes from the DDP checkpoint
    res = _torchrun(workdir, _overrides(workdir, **{"train.steps": 6, "train.ckpt_every": 2}))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((workdir / "metrics" / "train.json").read_text())
    assert summary["resumed_from_step"] == 4 and summary["steps"] == 6 and summary["ranks_in_sync"] is True


def test_ranks_in_sync_detects_divergence():
    """The check itself can fail: different fingerprints on different 'ranks' compare unequal."""
    from mtdiff.distributed import weights_checksum

    a = {"w": torch.ones(3, 3), "b": torch.zeros(3)}
    b = {"w": torch.ones(3, 3), "b": torch.tensor([0.0, 0.0, 1e-6])}
    c = {"w": torch.ones(3, 3).T.contiguous(), "b": torch.zeros(3)}
    assert torch.equal(weights_checksum(a), weights_checksum(c))  # same values, same fingerprint
    assert not torch.equal(weights_checksum(a), weights_checksum(b))
    # a permutation inside a tensor changes the weighted sum
    d = {"w": torch.arange(9.0).view(3, 3), "b": torch.zeros(3)}
    e = {"w": torch.arange(9.0).flip(0).view(3, 3), "b": torch.zeros(3)}
    assert not torch.equal(weights_checksum(d), weights_checksum(e))
