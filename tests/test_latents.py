"""latents stage: pixel mode and latent mode with a tiny random AutoencoderKL loaded from disk."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mtdiff.data import pair_images
from mtdiff.encoders import decode_latents_vae, encode_images_vae, load_vae
from mtdiff.stages import latents, prepare


def test_pixel_mode_matches_images(fmnist_dir, make_params):
    params = make_params({"data.fashion_mnist_dir": str(fmnist_dir), "data.max_per_split": 50})
    prepare.run(params)
    summary = latents.run(params)
    assert summary["shape"] == [1, 28, 28] and summary["out_dir"] == str(params.latents_dir)
    for split in ("train", "test"):
        d = params.latents_dir / split
        mean = np.load(d / "mean.npy")
        images = np.load(params.prepared_dir / f"{split}_images.npy")
        assert mean.dtype == np.float16 and mean.shape == (50, 1, 28, 28)
        np.testing.assert_allclose(mean.astype(np.float32), images.transpose(0, 3, 1, 2) / 127.5 - 1, atol=1e-3)
        assert mean.min() >= -1 and mean.max() <= 1
        assert not (d / "std.npy").exists() and not (d / "mean_flip.npy").exists()
        np.testing.assert_array_equal(np.load(d / "labels.npy"), np.load(params.prepared_dir / f"{split}_labels.npy"))
        meta = json.loads((d / "meta.json").read_text())
        assert meta["mode"] == "pixel" and meta["shape"] == [1, 28, 28] and meta["num"] == 50
        assert meta["flip"] is False and meta["pair"] is None and len(meta["classes"]) == 10


def test_pixel_mode_flip_and_pairs(fmnist_dir, make_params):
    params = make_params({"data.fashion_mnist_dir": str(fmnist_dir), "data.max_per_split": 20,
                          "latents.flip": True, "tasks.transition.enabled": True,
                          "tasks.transition.pairing": "edges"})
    prepare.run(params)
    latents.run(params)
    d = params.latents_dir / "train"
    images = np.load(params.prepared_dir / "train_images.npy")
    mean, flip = np.load(d / "mean.npy"), np.load(d / "mean_flip.npy")
    np.testing.assert_array_equal(flip, mean[..., ::-1])
    pair = np.load(d / "pair_mean.npy").astype(np.float32)
    np.testing.assert_allclose(pair, pair_images(images, "edges").transpose(0, 3, 1, 2) / 127.5 - 1, atol=1e-3)
    pair_flip = np.load(d / "pair_mean_flip.npy").astype(np.float32)
    np.testing.assert_allclose(pair_flip, pair_images(images[:, :, ::-1].copy(), "edges").transpose(0, 3, 1, 2)
                               / 127.5 - 1, atol=1e-3)
    assert json.loads((d / "meta.json").read_text())["pair"] == "edges"


def test_missing_prepared_says_which_stage(make_params):
    with pytest.raises(FileNotFoundError, match="dvc repro prepare"):
        latents.run(make_params())


@pytest.fixture
def tiny_vae_dir(tmp_path):
    """A randomly initialised AutoencoderKL of the SD architecture, 2 blocks (downsampling 2)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, sample_size=32)
    path = tmp_path / "tiny-vae"
    vae.save_pretrained(path)
    return path


def test_latent_mode_with_tiny_vae(fmnist_dir, make_params, tiny_vae_dir):
    params = make_params({"data.fashion_mnist_dir": str(fmnist_dir), "data.max_per_split": 12,
                          "data.resolution": 32, "diffusion.mode": "latent", "latents.vae": str(tiny_vae_dir),
                          "latents.batch_size": 5, "latents.flip": True, "tasks.transition.enabled": True})
    prepare.run(params)
    summary = latents.run(params)
    assert summary["shape"] == [4, 16, 16]
    d = params.latents_dir / "test"
    meta = json.loads((d / "meta.json").read_text())
    assert meta["mode"] == "latent" and meta["scale"] == pytest.approx(0.18215) and meta["vae"] == str(tiny_vae_dir)
    assert meta["shape"] == [4, 16, 16] and meta["num"] == 12 and meta["flip"] and meta["pair"] == "rot90"
    names = {"mean", "std", "mean_flip", "std_flip", "pair_mean", "pair_mean_flip", "labels"}
    assert {p.stem for p in d.glob("*.npy")} == names
    mean, std = np.load(d / "mean.npy"), np.load(d / "std.npy")
    assert mean.dtype == np.float16 and mean.shape == (12, 4, 16, 16) and std.shape == mean.shape
    assert (std > 0).all()
    # Same numbers as encoding directly (scale applied, fp16 storage), independent of batch size.
    vae = load_vae(str(tiny_vae_dir))
    images = np.load(params.prepared_dir / "test_images.npy")
    ref_mean, ref_std = encode_images_vae(vae, images)
    np.testing.assert_allclose(mean.astype(np.float32), ref_mean.numpy() * 0.18215, atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(std.astype(np.float32), ref_std.numpy() * 0.18215, atol=2e-3, rtol=2e-3)
    flip_mean, _ = encode_images_vae(vae, images[:, :, ::-1].copy())
    np.testing.assert_allclose(np.load(d / "mean_flip.npy").astype(np.float32), flip_mean.numpy() * 0.18215,
                               atol=2e-3, rtol=2e-3)
    pair_mean, _ = encode_images_vae(vae, pair_images(images, "rot90"))
    np.testing.assert_allclose(np.load(d / "pair_mean.npy").astype(np.float32), pair_mean.numpy() * 0.18215,
                               atol=2e-3, rtol=2e-3)
    decoded = decode_latents_vae(vae, torch.from_numpy(mean[:2].astype(np.float32)), 0.18215, channels=1)
    assert decoded.shape == (2, 32, 32, 1) and decoded.dtype == np.uint8


def test_latent_mode_rejects_resolution_not_divisible(fmnist_dir, make_params, tiny_vae_dir):
    # The tiny VAE downsamples by 2, so a 29 px image has no whole latent grid.
    params = make_params({"data.fashion_mnist_dir": str(fmnist_dir), "data.max_per_split": 4,
                          "data.resolution": 29, "diffusion.mode": "latent", "latents.vae": str(tiny_vae_dir)})
    prepare.run(params)
    with pytest.raises(ValueError, match="not divisible by the VAE's downsampling factor 2"):
        latents.run(params)
    assert not params.latents_dir.exists()


def test_load_vae_offline_hub_name_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="latents.vae=<dir>"):
        load_vae("stabilityai/this-vae-is-not-cached-anywhere")
