"""mtdiff.data: TrainDataset over the latents contract, batched reads, pairings and patch masks."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mtdiff.data import TrainDataset, collate_batch, pair_images, random_patch_mask
from mtdiff.stages import latents, prepare
from mtdiff.utils import derive_seed


@pytest.fixture
def pixel_params(fmnist_dir, make_params):
    """Prepared + pixel latents (flip and rot90 pairs) of a 64-image slice."""
    params = make_params({"data.fashion_mnist_dir": str(fmnist_dir), "data.max_per_split": 64,
                          "latents.flip": True, "tasks.transition.enabled": True})
    prepare.run(params)
    latents.run(params)
    return params


def test_dataset_shapes_and_batched_equals_items(fmnist_dir, make_params):
    params = make_params({"data.fashion_mnist_dir": str(fmnist_dir), "data.max_per_split": 64})
    prepare.run(params)
    latents.run(params)
    ds = TrainDataset(params, "train")
    assert len(ds) == 64 and ds.shape == (1, 28, 28) and ds.num_classes == 10 and ds.repr_dim is None
    item = ds[3]
    assert set(item) == {"z0", "label"}
    assert item["z0"].shape == (1, 28, 28) and item["z0"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and item["label"].ndim == 0
    idx = [17, 3, 40, 3, 0]
    batch = ds.__getitems__(idx)
    assert batch["z0"].shape == (5, 1, 28, 28) and batch["label"].shape == (5,)
    for row, i in enumerate(idx):
        one = ds[i]
        torch.testing.assert_close(batch["z0"][row], one["z0"])
        assert int(batch["label"][row]) == int(one["label"])
    images = np.load(params.prepared_dir / "train_images.npy")
    expected = torch.from_numpy(images[17].transpose(2, 0, 1) / 127.5 - 1.0).float()
    torch.testing.assert_close(batch["z0"][0], expected, atol=1e-3, rtol=0)
    assert batch["label"].tolist() == np.load(params.prepared_dir / "train_labels.npy")[idx].tolist()


def test_dataloader_with_collate_and_workers(pixel_params):
    ds = TrainDataset(pixel_params, "train")
    for workers in (0, 1):
        loader = DataLoader(ds, batch_size=16, shuffle=True, collate_fn=collate_batch, num_workers=workers,
                            generator=torch.Generator().manual_seed(0))
        batches = list(loader)
        assert len(batches) == 4
        b = batches[0]
        assert b["z0"].shape == (16, 1, 28, 28) and b["transition"].shape == (16, 1, 28, 28)
        assert b["label"].dtype == torch.int64 and b["label"].shape == (16,)
    # The per-item path (no __getitems__) collates to the same layout.
    stacked = collate_batch([ds[0], ds[1]])
    assert stacked["z0"].shape == (2, 1, 28, 28) and stacked["label"].shape == (2,)


def test_flip_and_transition_targets_agree(pixel_params):
    ds = TrainDataset(pixel_params, "train")
    d = pixel_params.latents_dir / "train"
    mean, mean_flip = np.load(d / "mean.npy"), np.load(d / "mean_flip.npy")
    pair, pair_flip = np.load(d / "pair_mean.npy"), np.load(d / "pair_mean_flip.npy")
    torch.manual_seed(0)
    idx = list(range(64)) * 2
    b = ds.__getitems__(idx)
    n_flipped = 0
    for row, i in enumerate(idx):
        z0, tr = b["z0"][row].numpy(), b["transition"][row].numpy()
        if np.array_equal(z0, mean[i].astype(np.float32)):
            np.testing.assert_array_equal(tr, pair[i].astype(np.float32))
        else:
            np.testing.assert_array_equal(z0, mean_flip[i].astype(np.float32))
            np.testing.assert_array_equal(tr, pair_flip[i].astype(np.float32))
            n_flipped += 1
    assert 20 < n_flipped < 108  # about half of 128 draws


def test_latent_mode_draws_mean_plus_std_noise(tmp_path, make_params, monkeypatch):
    """Hand-written latent-mode arrays: z0 = mean + std * randn in request order."""
    params = make_params({"diffusion.mode": "latent", "tasks.representation.enabled": True})
    d = params.latents_dir / "train"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    n, shape = 10, (4, 2, 2)
    mean = rng.normal(size=(n, *shape)).astype(np.float16)
    std = (0.1 + rng.random((n, *shape))).astype(np.float16)
    np.save(d / "mean.npy", mean)
    np.save(d / "std.npy", std)
    np.save(d / "labels.npy", np.arange(n, dtype=np.int64) % 3)
    (d / "meta.json").write_text(json.dumps({"mode": "latent", "scale": 0.18215, "shape": list(shape), "num": n,
                                             "flip": False, "pair": None, "classes": ["a", "b", "c"]}))
    params.representations_dir.mkdir(parents=True)
    reps = rng.normal(size=(n, 5)).astype(np.float32)
    np.save(params.representations_dir / "train.npy", reps)
    ds = TrainDataset(params, "train")
    assert ds.repr_dim == 5 and ds.num_classes == 3 and ds.shape == shape
    idx = [7, 2, 9]
    torch.manual_seed(123)
    b = ds.__getitems__(idx)

    def draw(i: int, epoch: int) -> torch.Tensor:  # each sample's own generator: (seed, epoch, index)
        return torch.randn(shape, generator=torch.Generator().manual_seed(derive_seed(params.seed, f"data/{epoch}/{i}")))

    expected = torch.from_numpy(mean[idx].astype(np.float32)) + torch.from_numpy(std[idx].astype(np.float32)) \
        * torch.stack([draw(i, 0) for i in idx])
    torch.testing.assert_close(b["z0"], expected)
    torch.testing.assert_close(b["representation"], torch.from_numpy(reps[idx]))
    assert b["label"].tolist() == [1, 2, 0]
    # The same (epoch, index) draws the same, whatever the global RNG and the batch neighbours ...
    torch.manual_seed(7)
    assert torch.equal(ds.__getitems__(idx)["z0"], b["z0"])
    assert torch.equal(ds.__getitems__([9, 0])["z0"][0], b["z0"][2])
    # ... and a new epoch draws fresh noise.
    ds.set_epoch(1)
    assert not torch.equal(ds.__getitems__(idx)["z0"], b["z0"])
    torch.testing.assert_close(ds[2]["z0"], torch.from_numpy(mean[2].astype(np.float32))
                               + torch.from_numpy(std[2].astype(np.float32)) * draw(2, 1))


def test_missing_inputs_say_which_stage(make_params):
    params = make_params()
    with pytest.raises(FileNotFoundError, match="dvc repro latents"):
        TrainDataset(params)


def test_missing_representations_say_which_stage(pixel_params, make_params, fmnist_dir):
    params = make_params({"data.fashion_mnist_dir": str(fmnist_dir), "data.max_per_split": 64,
                          "tasks.representation.enabled": True})
    with pytest.raises(FileNotFoundError, match="dvc repro representations"):
        TrainDataset(params)


def test_mode_mismatch_is_an_error(pixel_params, make_params, fmnist_dir):
    params = make_params({"data.fashion_mnist_dir": str(fmnist_dir), "diffusion.mode": "latent"})
    with pytest.raises(ValueError, match="mode 'pixel'"):
        TrainDataset(params)


def test_random_patch_mask_ratio_and_alignment():
    g = torch.Generator().manual_seed(0)
    mask = random_patch_mask(6, (1, 28, 28), 0.5, 4, generator=g)
    assert mask.shape == (6, 1, 28, 28) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    tiles = mask.view(6, 1, 7, 4, 7, 4)
    assert torch.all(tiles.amax(dim=(3, 5)) == tiles.amin(dim=(3, 5)))  # constant on each 4x4 tile
    masked_tiles = (tiles[:, :, :, 0, :, 0] == 0).flatten(1).sum(1)
    assert masked_tiles.tolist() == [24] * 6  # round(0.5 * 49) in every sample
    assert not torch.equal(mask[0], mask[1])
    assert random_patch_mask(2, (4, 32, 32), 0.0, 2).min() == 1.0
    with pytest.raises(ValueError, match="not divisible by patch"):
        random_patch_mask(2, (1, 28, 28), 0.5, 3)


def test_pair_images_rot90_and_edges():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    r = pair_images(x, "rot90")
    assert r.shape == x.shape and r.dtype == np.uint8
    np.testing.assert_array_equal(r[0, :, :, 0], np.rot90(x[0, :, :, 0]))
    np.testing.assert_array_equal(pair_images(pair_images(r, "rot90"), "rot90")[..., 0],
                                  np.rot90(x[..., 0], k=3, axes=(1, 2)))
    step = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    step[0, :, 4:] = 200  # a vertical edge between columns 3 and 4; image 1 is flat
    e = pair_images(step, "edges")
    assert e.shape == step.shape and e.dtype == np.uint8
    assert e[0].max() == 255 and e[0, :, :2].max() == 0 and e[0, :, 6:].max() == 0
    assert e[0, 4, 3, 0] == 255 and e[0, 4, 4, 0] == 255
    assert e[1].max() == 0
    np.testing.assert_array_equal(e[..., 0], e[..., 2])
    with pytest.raises(ValueError, match="allowed: rot90, edges"):
        pair_images(x, "blur")
    with pytest.raises(ValueError, match="square"):
        pair_images(np.zeros((1, 4, 6, 1), np.uint8), "rot90")


def test_progress_log_says_where_it_is_and_when_it_ends(caplog, monkeypatch):
    """Progress lines with an ETA for piped output (DVC, Prefect), throttled to one per interval."""
    import logging

    from mtdiff import utils

    clock = iter([0.0, 10.0, 20.0, 40.0, 60.0])
    monkeypatch.setattr(utils.time, "monotonic", lambda: next(clock))
    progress = utils.ProgressLog(logging.getLogger("t"), "sample: images", 100, every_s=30)
    with caplog.at_level(logging.INFO, logger="t"):
        progress.update(10)   # t=10: within the interval, nothing
        progress.update(50)   # t=20: still within
        progress.update(80)   # t=40: 80 % after 40 s -> 10 s left
        progress.update(100)  # t=60: the end is always logged
    assert [r.getMessage() for r in caplog.records] == [
        "sample: images 80/100 (80 %), 0:40 elapsed, ETA 0:10",
        "sample: images 100/100 (100 %), 1:00 elapsed, ETA 0:00"]
    assert utils.format_duration(3725) == "1:02:05"
