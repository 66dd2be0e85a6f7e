"""Issue 11 item 16: resume is bit-exact with DataLoader workers, in latent mode with posterior
sampling and flips. Each sample's randomness comes from (seed, epoch, index) (TrainDataset.set_epoch),
so a resumed run's workers draw what the uninterrupted run's did, whichever worker reads a batch."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fixtures.tiny_run import tiny_params

pytestmark = pytest.mark.usefixtures("single_thread")

N, SHAPE = 64, (4, 8, 8)  # latents of data.resolution 64 (/8); 64 images / batch 16 = 4 steps per epoch


def _write_latents(root) -> None:
    """Hand-written latent-mode arrays (no VAE needed): mean/std and their flipped copies."""
    d = root / "data" / "latents" / "train"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("mean", "mean_flip"):
        np.save(d / f"{name}.npy", rng.normal(size=(N, *SHAPE)).astype(np.float16))
    for name in ("std", "std_flip"):
        np.save(d / f"{name}.npy", (0.1 + 0.5 * rng.random((N, *SHAPE))).astype(np.float16))
    np.save(d / "labels.npy", (np.arange(N) % 10).astype(np.int64))
    (d / "meta.json").write_text(json.dumps({"mode": "latent", "scale": 0.18215, "shape": list(SHAPE), "num": N,
                                             "flip": True, "pair": None, "classes": [str(k) for k in range(10)]}))


def _params(root, ckpt: str, workers: int, steps: int = 10):
    return tiny_params(root, **{"diffusion.mode": "latent", "data.resolution": 64, "model.patch_size": 2,
                                "train.num_workers": workers, "train.ckpt_every": 3, "train.steps": steps,
                                "train.out_dir": str(root / ckpt), "evaluate.out_dir": str(root / f"m_{ckpt}")})


def _weights(result) -> dict[str, torch.Tensor]:
    return {**{f"model.{k}": v for k, v in result.model.state_dict().items()},
            **{f"ema.{k}": v for k, v in result.ema.shadow.items()}}


def _assert_same(a, b) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    bad = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not bad, f"weights differ: {bad[:5]}"


def test_resume_with_two_workers_latent_mode_is_bit_exact(workdir):
    from mtdiff.stages.train import train

    _write_latents(workdir)
    full = train(_params(workdir, "full", workers=2))

    def interrupt(step: int) -> None:
        if step == 8:  # last checkpoint: step 6 = epoch 1, batch 2 (mid-epoch: workers restart there)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_params(workdir, "int", workers=2), on_step=interrupt)
    resumed = train(_params(workdir, "int", workers=2))
    assert resumed.summary["resumed_from_step"] == 6
    _assert_same(full, resumed)
    # and the batches do not depend on the number of workers at all
    _assert_same(full, train(_params(workdir, "w0", workers=0)))
