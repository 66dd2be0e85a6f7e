"""Sample stage: every conditioning mode writes samples.npz / grid.png / png/ / meta.json with the
right shapes; the same seed gives the same images, another seed other images."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures.tiny_run import ALL_TASKS, data_root, tiny_params

pytestmark = pytest.mark.usefixtures("single_thread")

TASKS = {f"tasks.{t}.enabled": True for t in ALL_TASKS}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny data + a tiny model trained a few steps with every task (shared by the tests)."""
    root = data_root(tmp_path_factory, tasks=ALL_TASKS)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MTDIFF_MLFLOW", "0")
            from mtdiff.stages import train

            train.run(tiny_params(root, **TASKS, **{"train.steps": 4}))
    finally:
        torch.set_num_threads(before)
    return root


def _sample(root, tag: str, **over):
    from mtdiff.stages import sample

    params = tiny_params(root, **TASKS, **{"sample.out_dir": str(root / tag), **over})
    summary = sample.run(params)
    return params, summary, np.load(root / tag / "samples.npz")


@pytest.mark.parametrize("condition", ["uncond", "label", "masked", "transition"])
def test_every_condition_writes_outputs(trained, workdir, condition):
    n = 12
    params, summary, npz = _sample(trained, f"s_{condition}", **{"sample.condition": condition})
    out = trained / f"s_{condition}"
    arr = npz["arr_0"]
    assert arr.shape == (n, 28, 28, 1) and arr.dtype == np.uint8
    assert npz["labels"].shape == (n,) and npz["labels"].dtype == np.int64
    assert npz["labels"].min() >= 0 and npz["labels"].max() < 10
    if condition == "label":
        assert npz["labels"].tolist() == [i % 10 for i in range(n)]  # balanced, cycling classes
        assert summary["labels"] == "given" and 0.0 <= summary["label_head_agreement"] <= 1.0
    else:
        assert summary["labels"] == "predicted"
    test_images = np.load(trained / "data" / "prepared" / "test_images.npy")
    if condition == "masked":
        assert set(npz.files) == {"arr_0", "labels", "reference", "mask"}
        assert np.array_equal(npz["reference"], test_images[:n])
        mask = npz["mask"]
        assert mask.shape == (n, 28, 28) and set(np.unique(mask)) <= {0, 1}
        # patch 4 on 28x28: 49 patches, round(0.5 * 49) = 24 hidden -> 25 * 16 visible pixels
        assert (mask.reshape(n, -1).sum(1) == 25 * 16).all()
    elif condition == "transition":
        from mtdiff.data import pair_images

        assert set(npz.files) == {"arr_0", "labels", "source", "reference"}
        assert np.array_equal(npz["reference"], test_images[:n])
        assert np.array_equal(npz["source"], pair_images(test_images[:n], params.tasks.transition.pairing))
    else:
        assert set(npz.files) == {"arr_0", "labels"}

    pngs = sorted((out / "png").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(n)]
    assert np.array_equal(np.asarray(Image.open(pngs[5]))[..., None], arr[5])
    grid = Image.open(out / "grid.png")
    assert grid.mode == "L" and min(grid.size) > 28
    meta = json.loads((out / "meta.json").read_text())
    assert meta["condition"] == condition and meta["num_samples"] == n and meta["checkpoint_step"] == 4
    assert summary["samples_npz"] == str(out / "samples.npz")
    # written atomically: no temp folders left beside the output
    assert not [p for p in trained.iterdir() if p.name.startswith(f".s_{condition}")]


def test_label_grid_rows_are_classes(trained, workdir):
    _, _, npz = _sample(trained, "grid", **{"sample.condition": "label", "sample.num_samples": 30})
    grid = np.asarray(Image.open(trained / "grid" / "grid.png"))
    # 10 rows (classes) x 10 columns, 2 px padding, enlarged 2x (28 px < 64 px)
    assert grid.shape == (2 * (10 * 30 + 2), 2 * (10 * 30 + 2))
    # class 1's first sample is sample 1; it sits in row 1, column 0
    cell = grid[2 * 32:2 * 60:2, 2 * 2:2 * 30:2]
    assert np.array_equal(cell, npz["arr_0"][1][..., 0])


def test_same_seed_same_samples_other_seed_differs(trained, workdir):
    over = {"sample.condition": "masked", "sample.sampler": "ddpm", "sample.num_samples": 6}
    _, _, a = _sample(trained, "seed_a", **over)
    _, _, b = _sample(trained, "seed_b", **over)
    _, _, c = _sample(trained, "seed_c", **over, seed=1)
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["mask"], b["mask"])
    assert not np.array_equal(a["arr_0"], c["arr_0"])


@pytest.mark.parametrize("condition", ["uncond", "masked"])
def test_predicted_input_modes_reach_the_sampler(trained, workdir, monkeypatch, condition):
    """sample.predicted_label / predicted_masked reach the sampler as its input policies; an unconditioned
    masked input gets one training-form patch mask per sample; the samples change, the default stays."""
    from mtdiff.diffusion import Sampler
    from mtdiff.diffusion.sampler import Absent, DrawnLabel, ExpectedMasked, HardLabel, PatchMasked, SoftLabel

    seen, real = [], Sampler._chain
    monkeypatch.setattr(Sampler, "_chain", lambda self, *a: seen.append(real(self, *a)) or seen[-1])
    over = {"sample.condition": condition, "sample.num_samples": 6}
    _, _, plain = _sample(trained, f"plain_{condition}", **over)
    defaults = seen[-1].policies
    assert type(defaults["label"]) is SoftLabel
    _, _, moded = _sample(trained, f"modes_{condition}", **over, **{"sample.predicted_label": "hard",
                                                                     "sample.predicted_masked": "masked"})
    policies = seen[-1].policies
    assert type(policies["label"]) is HardLabel
    if condition == "masked":  # the masked image is given: no policy for its prediction
        assert "masked" not in policies
        return
    assert defaults["masked"] == ExpectedMasked(0.5) and isinstance(policies["masked"], PatchMasked)
    mask = policies["masked"].mask  # 49 patches of 4 x 4, round(0.5 * 49) = 24 hidden
    assert mask.shape == (6, 1, 28, 28) and (mask.reshape(6, -1).sum(1) == 25 * 16).all()
    assert not np.array_equal(plain["arr_0"], moded["arr_0"])
    _, _, drawn = _sample(trained, "drawn_uncond", **over, **{"sample.predicted_label": "drawn"})
    assert type(seen[-1].policies["label"]) is DrawnLabel and drawn["labels"].shape == (6,)
    assert not np.array_equal(plain["arr_0"], drawn["arr_0"])
    _sample(trained, "absent_uncond", **over, **{"sample.predicted_masked": "absent"})
    assert seen[-1].policies["masked"] == Absent()  # every patch hidden


def test_sample_without_checkpoint_is_a_clear_error(workdir):
    from mtdiff.stages import sample

    with pytest.raises(FileNotFoundError, match="run the train stage"):
        sample.run(tiny_params(workdir))


def test_grid_helpers():
    from mtdiff.sampling_io import gather_with_blanks, image_grid, label_grid_indices, to_uint8_nhwc

    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    assert to_uint8_nhwc(x)[0, :, :, 0].tolist() == [[0, 128], [255, 255]]
    labels = np.array([0, 1, 0, 2, 1])
    assert label_grid_indices(labels, 3, rows=3, cols=2) == [0, 2, 1, 4, 3, -1]
    imgs = np.zeros((5, 2, 2, 1), np.uint8)
    cells = gather_with_blanks(imgs, [0, -1])
    assert cells[1].min() == 255 and cells[0].max() == 0
    assert image_grid(imgs, nrow=2, pad=1).shape == (3 * 3 + 1, 2 * 3 + 1, 1)
