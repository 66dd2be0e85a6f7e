"""Sharded inference stages (mtdiff.sharding): the slice and gather helpers, and the real stage CLIs
under torchrun with two gloo ranks on CPU giving bit-identical outputs to one process."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from fixtures.tiny_run import data_root, tiny_params

pytestmark = pytest.mark.usefixtures("single_thread")

SHARD_TASKS = {"tasks.masked.enabled": True}


def _info(rank: int, world: int):
    from mtdiff.distributed import DistInfo

    return DistInfo(rank, world, rank, torch.device("cpu"), False)  # no group: barriers are no-ops


@pytest.mark.parametrize("n,world,block", [(0, 2, 1), (1, 3, 1), (7, 2, 1), (10, 4, 1), (20, 2, 8), (17, 3, 4),
                                           (64, 2, 4096), (1000, 7, 64)])
def test_shard_range_is_a_block_aligned_partition(n, world, block):
    from mtdiff.sharding import shard_range

    slices = [shard_range(n, _info(r, world), block) for r in range(world)]
    assert [i for s in slices for i in s] == list(range(n))  # disjoint, covering, in rank order
    assert all(s.start % block == 0 for s in slices if len(s))  # every batch is one a single process makes
    assert n == 0 or len(slices[0]) > 0
    batches = [-(-len(s) // block) for s in slices]
    assert max(batches) - min(batches) <= 1  # balanced to within one batch


def test_gather_concatenates_in_rank_order(tmp_path):
    from mtdiff.sharding import gather_arrays, rank_dir, save_arrays

    scratch = tmp_path / "scratch"
    full = {"x": np.arange(30, dtype=np.float16).reshape(10, 3), "y": np.arange(10, dtype=np.int64)}
    for rank, (lo, hi) in enumerate([(0, 6), (6, 6), (6, 10)]):  # rank 1's slice is empty: it writes nothing
        if hi > lo:
            save_arrays(rank_dir(scratch, _info(rank, 3)), {k: v[lo:hi] for k, v in full.items()})
    names = gather_arrays(scratch, tmp_path / "out", _info(0, 3))
    assert names == ["x", "y"]
    for k, v in full.items():
        got = np.load(tmp_path / "out" / f"{k}.npy")
        assert got.dtype == v.dtype and np.array_equal(got, v)

    save_arrays(rank_dir(tmp_path / "bad", _info(0, 2)), {"x": np.zeros((2, 3), np.float32)})
    save_arrays(rank_dir(tmp_path / "bad", _info(1, 2)), {"x": np.zeros((2, 4), np.float32)})
    with pytest.raises(ValueError, match="first rank"):
        gather_arrays(tmp_path / "bad", tmp_path / "out2", _info(0, 2))


# -- the stages under torchrun ------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny data (with the masked task's test latents) and a tiny model trained two steps."""
    root = data_root(tmp_path_factory, tasks=("masked",))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTDIFF_MLFLOW", "0")
        mp.chdir(root)
        from mtdiff.stages import train

        train.run(tiny_params(root, **_tiny_over()))
    return root


def _tiny_over(**extra) -> dict:
    # 20 samples in batches of 8: rank 0 draws batches 0-1, rank 1 batch 2 (a short one)
    return {**SHARD_TASKS, "train.steps": 2, "sample.num_samples": 20, "sample.batch_size": 8,
            "sample.condition": "masked", **extra}


def _cli_overrides(root, **over) -> list[str]:
    """Every param that differs from the defaults, as ``key=value`` arguments."""
    from mtdiff.config import DEFAULT_PARAMS, load_params

    flat, default = tiny_params(root, **over).flat(), load_params(DEFAULT_PARAMS).flat()
    return [f"{k}={v}".replace(" ", "") for k, v in flat.items() if default.get(k) != v]


def _launch(root, stage: str, overrides: list[str], nproc: int) -> None:
    """``python -m mtdiff.stages.<stage>`` (nproc 1: no torchrun, the plain default) or torchrun."""
    env = {**os.environ, "MTDIFF_MLFLOW": "0", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launcher, "-m", f"mtdiff.stages.{stage}", *overrides]
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def test_two_ranks_sample_the_same_images_as_one(trained):
    outs = {}
    for nproc in (1, 2):
        out = trained / f"samples_{nproc}"
        _launch(trained, "sample", _cli_overrides(trained, **_tiny_over(**{"sample.out_dir": str(out)})), nproc)
        outs[nproc] = out
    one, two = np.load(outs[1] / "samples.npz"), np.load(outs[2] / "samples.npz")
    assert sorted(one.files) == sorted(two.files) == ["arr_0", "labels", "mask", "reference"]
    for name in one.files:
        assert np.array_equal(one[name], two[name]), name
    assert one["arr_0"].shape[0] == 20
    assert not np.array_equal(one["arr_0"][:8], one["arr_0"][8:16])  # batches draw their own noise
    pngs = sorted(p.name for p in (outs[1] / "png").iterdir())
    assert pngs == sorted(p.name for p in (outs[2] / "png").iterdir()) and len(pngs) == 20
    assert all((outs[1] / "png" / p).read_bytes() == (outs[2] / "png" / p).read_bytes() for p in pngs)
    assert (outs[1] / "grid.png").read_bytes() == (outs[2] / "grid.png").read_bytes()
    assert json.loads((outs[2] / "meta.json").read_text())["world_size"] == 2
    assert not list(trained.glob(".samples_*.shards"))  # the ranks' scratch folders are gone


def test_two_ranks_extract_the_same_latents_and_representations(trained, workdir):
    """Pixel latents (flips and pairs too, 64 images cut 32 / 32) and fmnist_cnn features (rank 0
    trains, rank 1 gets its weights) match one process's files byte for byte."""
    over = {**SHARD_TASKS, "tasks.transition.enabled": True, "latents.flip": True, "representations.epochs": 1}
    roots = {}
    for nproc in (1, 2):
        root = workdir / f"ranks{nproc}"
        (root / "data").mkdir(parents=True)
        shutil.copytree(trained / "data" / "prepared", root / "data" / "prepared")
        for stage in ("latents", "representations"):
            _launch(root, stage, _cli_overrides(root, **over), nproc)
        roots[nproc] = root
    for sub in ("latents/train", "latents/test", "representations"):
        one, two = roots[1] / "data" / sub, roots[2] / "data" / sub
        files = sorted(p.name for p in one.iterdir() if p.suffix == ".npy")
        assert files == sorted(p.name for p in two.iterdir() if p.suffix == ".npy")
        assert all((one / f).read_bytes() == (two / f).read_bytes() for f in files), sub
    assert {"mean.npy", "mean_flip.npy", "pair_mean.npy", "pair_mean_flip.npy"} <= set(
        p.name for p in (roots[2] / "data" / "latents" / "train").iterdir())
    assert (roots[1] / "data" / "latents" / "train" / "meta.json").read_text() == \
        (roots[2] / "data" / "latents" / "train" / "meta.json").read_text()
