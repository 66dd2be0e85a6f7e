"""representations stage: FashionCNN on a slice, and a tiny random DINOv2-family ViT via timm."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mtdiff.encoders import images_to_unit_range, load_fmnist_encoder, load_image_encoder
from mtdiff.stages import prepare, representations

TINY_VIT = {"img_size": 28, "depth": 2, "embed_dim": 48, "num_heads": 2}


@pytest.fixture
def prepared(fmnist_dir, make_params):
    def _make(**over):
        params = make_params({"data.fashion_mnist_dir": str(fmnist_dir), "data.max_per_split": 512,
                              "representations.epochs": 2, "representations.batch_size": 32,
                              "representations.dim": 32, **over})
        prepare.run(params)
        return params
    return _make


def test_fmnist_cnn_trains_and_saves(prepared):
    params = prepared()
    summary = representations.run(params)
    out = params.representations_dir
    metrics = json.loads((params.metrics_dir / "representations.json").read_text())
    assert metrics["encoder"] == "fmnist_cnn" and metrics["epochs"] == 2
    assert 0.35 < metrics["test_accuracy"] <= 1.0  # chance is 0.1; 32 steps already learn a lot
    assert 0.3 < metrics["ncm_test_accuracy"] <= 1.0
    assert summary["test_accuracy"] == metrics["test_accuracy"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["encoder"] == "fmnist_cnn" and meta["dim"] == 32
    train, test = np.load(out / "train.npy"), np.load(out / "test.npy")
    assert train.shape == (512, 32) and test.shape == (512, 32) and train.dtype == np.float32
    assert np.isfinite(train).all() and train.std() > 0.1
    # The checkpoint reproduces the stored features and classifies like the reported accuracy.
    enc = load_fmnist_encoder(out / "encoder.pt")
    assert not enc.training
    images = np.load(params.prepared_dir / "test_images.npy")
    labels = np.load(params.prepared_dir / "test_labels.npy")
    with torch.no_grad():
        x = images_to_unit_range(images)
        feats = enc.features(x[:16]).numpy()
        acc = float((enc(x).argmax(1).numpy() == labels).mean())
    np.testing.assert_allclose(feats, test[:16], atol=1e-4, rtol=1e-4)
    assert acc == pytest.approx(metrics["test_accuracy"])
    # the evaluation network: another architecture and seed, its accuracy stated, no task reads it
    from mtdiff.encoders import EVAL_NET_FILE, FashionEvalNet

    net = load_fmnist_encoder(out / EVAL_NET_FILE)
    assert isinstance(net, FashionEvalNet) and not net.training
    assert torch.load(out / EVAL_NET_FILE, weights_only=True)["seed"] == params.seed + 1000
    with torch.no_grad():
        net_acc = float((net(x).argmax(1).numpy() == labels).mean())
    assert net_acc == pytest.approx(metrics["eval_net_test_accuracy"]) and net_acc > 0.35


def test_fmnist_cnn_is_seeded(prepared):
    params = prepared(**{"data.max_per_split": 128})
    representations.run(params)
    first = np.load(params.representations_dir / "test.npy")
    representations.run(params)
    np.testing.assert_array_equal(first, np.load(params.representations_dir / "test.npy"))


def _tiny_dinov2():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, **TINY_VIT).eval()


def test_dinov2_from_timm_folder(prepared, tmp_path):
    """A timm Hub-format folder (config.json + model.safetensors) as representations.weights_path."""
    from timm.models import save_for_hf

    model = _tiny_dinov2()
    folder = tmp_path / "tiny-dinov2"
    save_for_hf(model, str(folder), model_args=TINY_VIT, safe_serialization=True)
    params = prepared(**{"data.max_per_split": 40, "representations.encoder": "dinov2",
                         "representations.weights_path": str(folder), "representations.batch_size": 16})
    representations.run(params)
    out = params.representations_dir
    assert json.loads((out / "meta.json").read_text())["dim"] == 48
    feats = np.load(out / "train.npy")
    assert feats.shape == (40, 48) and feats.dtype == np.float32
    assert not (out / "encoder.pt").exists()
    # Same as running the original model on ImageNet-normalised, gray->RGB 28 px inputs.
    images = np.load(params.prepared_dir / "train_images.npy")[:4]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).repeat(1, 3, 1, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = model((x - mean) / std).numpy()
    np.testing.assert_allclose(feats[:4], ref, atol=1e-4, rtol=1e-4)
    metrics = json.loads((params.metrics_dir / "representations.json").read_text())
    assert metrics["encoder"] == "dinov2" and "test_accuracy" not in metrics and 0 <= metrics["ncm_test_accuracy"] <= 1


@pytest.mark.parametrize("ext", ["pth", "safetensors"])
def test_image_encoder_from_weights_file_resizes(tmp_path, ext):
    model = _tiny_dinov2()
    path = tmp_path / f"w.{ext}"
    if ext == "pth":
        torch.save(model.state_dict(), path)
    else:
        from safetensors.torch import save_file
        save_file(model.state_dict(), str(path))
    enc, preprocess, dim = load_image_encoder("dinov2", "vit_small_patch14_dinov2", str(path), **TINY_VIT)
    assert dim == 48
    images = np.random.default_rng(0).integers(0, 256, (3, 56, 56, 3), dtype=np.uint8)
    x = preprocess(images)
    assert x.shape == (3, 3, 28, 28)  # resized to the model's input size
    with torch.no_grad():
        torch.testing.assert_close(enc(x), model(x))


def test_image_encoder_offline_without_weights_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="representations.weights_path"):
        load_image_encoder("dinov2", "vit_small_patch14_dinov2", None, **TINY_VIT)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_image_encoder("clip", None, "/nonexistent/weights.pth")
    with pytest.raises(ValueError, match="allowed dinov2, clip"):
        load_image_encoder("resnet")


def test_missing_prepared_says_which_stage(make_params):
    with pytest.raises(FileNotFoundError, match="dvc repro prepare"):
        representations.run(make_params())


def test_unreachable_hub_fails_fast_and_restores_mode(monkeypatch):
    import time

    from huggingface_hub import constants

    from mtdiff import encoders

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(encoders, "_hub_reachable", lambda timeout=3.0: False)
    before = constants.HF_HUB_OFFLINE
    t0 = time.time()
    with pytest.raises(RuntimeError, match="huggingface-cli download timm/vit_small_patch14_dinov2"):
        load_image_encoder("dinov2", "vit_small_patch14_dinov2", None, **TINY_VIT)
    assert time.time() - t0 < 20
    assert constants.HF_HUB_OFFLINE == before


def test_image_encoder_image_size_resamples_and_wants_whole_patches(tmp_path):
    """representations.image_size: weights saved at one size load at another (timm resamples the position
    embeddings, as DINOv2's 518 px weights at 224); a size that is not whole patches is refused."""
    path = tmp_path / "w.pth"
    torch.save(_tiny_dinov2().state_dict(), path)  # built at 28 px (2 x 2 patches)
    arch = {k: v for k, v in TINY_VIT.items() if k != "img_size"}
    enc, preprocess, _ = load_image_encoder("dinov2", "vit_small_patch14_dinov2", str(path), image_size=42, **arch)
    x = preprocess(np.zeros((1, 64, 64, 3), dtype=np.uint8))
    assert x.shape == (1, 3, 42, 42) and enc.pos_embed.shape[1] == 1 + 3 * 3
    with pytest.raises(ValueError, match="not a multiple of the encoder's patch size 14"):
        load_image_encoder("dinov2", "vit_small_patch14_dinov2", str(path), image_size=32, **arch)
