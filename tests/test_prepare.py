"""prepare stage: real Fashion-MNIST slice and a tiny ImageNet-layout folder with broken files."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mtdiff import sources
from mtdiff.io import sha1_bytes
from mtdiff.stages import prepare


def test_prepare_fashion_mnist_slice(fmnist_dir, make_params):
    params = make_params({"data.fashion_mnist_dir": str(fmnist_dir), "data.max_per_split": 200,
                          "prepare.num_workers": 0})
    summary = prepare.run(params)
    out = params.prepared_dir
    assert summary["out_dir"] == str(out)
    classes = json.loads((out / "classes.json").read_text())
    assert classes == sources.FASHION_MNIST_CLASSES
    for split in ("train", "test"):
        images = np.load(out / f"{split}_images.npy")
        labels = np.load(out / f"{split}_labels.npy")
        assert images.shape == (200, 28, 28, 1) and images.dtype == np.uint8
        assert labels.shape == (200,) and labels.dtype == np.int64
        assert labels.min() >= 0 and labels.max() <= 9 and len(np.unique(labels)) > 5
        assert images.std() > 10  # real clothes, not zeros
    # The first training image must equal the raw IDX bytes (no resize at 28 px).
    raw = sources.read_idx(fmnist_dir / "train-images-idx3-ubyte.gz")
    train = np.load(out / "train_images.npy")
    np.testing.assert_array_equal(train[:, :, :, 0], raw[:200])
    man = pd.read_parquet(out / "manifest.parquet")
    assert list(man.columns) == ["split", "index", "class_index", "class_name", "source_path", "sha1"]
    assert len(man) == 400 and (man.split == "train").sum() == 200
    first = man.iloc[0]
    assert first.sha1 == sha1_bytes(raw[0].tobytes())
    assert first.source_path.endswith("train-images-idx3-ubyte.gz#0")
    assert first.class_name == classes[first.class_index]
    report = json.loads((out / "report.json").read_text())
    assert report["decoded"] == 400 and report["skipped"] == {}
    assert report["splits"]["train"]["listed"] == len(raw)  # 60000 real, fewer in the test fixture


def test_prepare_rerun_gives_equal_bytes(fmnist_dir, make_params):
    """A rerun writes byte-equal outputs (no timings in report.json): DVC's run-cache keys of the
    downstream stages hash them, so a differing byte would retrain every model of a sweep."""
    params = make_params({"data.fashion_mnist_dir": str(fmnist_dir), "data.max_per_split": 50,
                          "prepare.num_workers": 0})
    out = params.prepared_dir
    prepare.run(params)
    first = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    prepare.run(params)
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir())} == first


def test_prepare_fashion_mnist_resize_rgb(fmnist_dir, make_params):
    params = make_params({"data.fashion_mnist_dir": str(fmnist_dir), "data.max_per_split": 8,
                          "data.resolution": 32, "data.channels": 3})
    prepare.run(params)
    images = np.load(params.prepared_dir / "test_images.npy")
    assert images.shape == (8, 32, 32, 3)
    np.testing.assert_array_equal(images[..., 0], images[..., 2])  # gray replicated to RGB


def test_missing_fashion_mnist_offline_says_how(make_params, monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "_network_reachable", lambda *a, **k: False)
    params = make_params({"data.fashion_mnist_dir": str(tmp_path / "nowhere")})
    with pytest.raises(sources.DataSourceError, match="apt-get install dataset-fashion-mnist"):
        prepare.run(params)
    assert not params.prepared_dir.exists()


def test_read_idx_rejects_truncated(tmp_path):
    bad = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(bad, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big")
                + (28).to_bytes(4, "big") + b"\0" * 100)
    with pytest.raises(sources.DataSourceError, match="truncated"):
        sources.read_idx(bad)


@pytest.mark.parametrize("workers", [0, 2])
def test_prepare_imagenet_folder_counts(tiny_imagenet, make_params, workers):
    params = make_params({"data.source": "imagenet", "data.imagenet_dir": str(tiny_imagenet),
                          "data.resolution": 32, "data.channels": 3, "prepare.num_workers": workers})
    prepare.run(params)
    out = params.prepared_dir
    report = json.loads((out / "report.json").read_text())
    train, test = report["splits"]["train"], report["splits"]["test"]
    # train: 6 good + cmyk + gray + png-named-JPEG decode; corrupt, truncated, txt, empty are skipped.
    assert train["decoded"] == 9
    assert train["skipped"] == {"corrupt": 1, "truncated": 1, "not_an_image": 1, "empty": 1}
    assert train["converted_by_mode"] == {"CMYK": 1, "L": 1}
    assert train["extension_mismatch"] == 1 and train["extension_mismatch_by_format"] == {"PNG": 1}
    assert {s["reason"] for s in train["skipped_files"]} == {"corrupt", "truncated", "not_an_image", "empty"}
    # val -> "test": 6 good + palette GIF; the unknown wnid is skipped.
    assert test["decoded"] == 7 and test["skipped"] == {"unknown_class": 1}
    assert test["converted_by_mode"] == {"P": 1}
    assert report["decoded"] == 16 and report["converted"] == 3
    assert report["skipped"]["corrupt"] == 1 and report["skipped_total"] == 5
    images = np.load(out / "train_images.npy")
    labels = np.load(out / "train_labels.npy")
    assert images.shape == (9, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert np.load(out / "test_images.npy").shape == (7, 32, 32, 3)
    assert json.loads((out / "classes.json").read_text()) == ["n01440764", "n01443537"]
    man = pd.read_parquet(out / "manifest.parquet")
    assert len(man) == 16
    row = man[man.source_path.str.endswith("cmyk.JPEG")].iloc[0]
    assert row.sha1 == sha1_bytes(open(row.source_path, "rb").read())
    assert row.class_name == "n01443537"
    # Rows follow ImageFolder order and the images match a direct ADM decode.
    first = man[(man.split == "train")].iloc[0]
    direct = sources.center_crop_arr(Image.open(first.source_path).convert("RGB"), 32)
    np.testing.assert_array_equal(images[0], direct)


def test_imagenet_max_per_split_is_class_stratified(tiny_imagenet, make_params):
    params = make_params({"data.source": "imagenet", "data.imagenet_dir": str(tiny_imagenet),
                          "data.resolution": 16, "data.channels": 1, "data.max_per_split": 4,
                          "prepare.num_workers": 0})
    prepare.run(params)
    labels = np.load(params.prepared_dir / "test_labels.npy")
    assert sorted(labels.tolist()) == [0, 0, 1, 1]
    assert np.load(params.prepared_dir / "test_images.npy").shape == (4, 16, 16, 1)


def test_center_crop_arr_box_then_bicubic():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 500, 3), dtype=np.uint8))
    arr = sources.center_crop_arr(img, 64)
    assert arr.shape == (64, 64, 3)
    # By hand: 500x300 -> BOX 250x150 (min 150 >= 128) -> BOX 125x75 -> BICUBIC to 107x64 -> crop x 21..85.
    step = img.resize((250, 150), Image.BOX).resize((125, 75), Image.BOX)
    ref = np.array(step.resize((round(125 * 64 / 75), 64), Image.BICUBIC))[:, 21:85]
    np.testing.assert_array_equal(arr, ref)


def test_shrink_npy_keeps_rows(tmp_path):
    path = tmp_path / "a.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(10, 2, 2, 1))
    mm[:] = np.arange(10, dtype=np.uint8)[:, None, None, None]
    mm.flush()
    del mm
    sources._shrink_npy(path, 7, (2, 2, 1))
    arr = np.load(path)
    assert arr.shape == (7, 2, 2, 1) and arr[:, 0, 0, 0].tolist() == list(range(7))


def test_fashion_mnist_found_in_download_folder(fmnist_dir, make_params, tmp_path):
    """With data.fashion_mnist_dir missing, a previous torchvision download under data/downloads is used."""
    import shutil

    raw = tmp_path / "data" / "downloads" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in fmnist_dir.glob("*-ubyte.gz"):
        shutil.copy(f, raw / f.name)
    params = make_params({"data.fashion_mnist_dir": str(tmp_path / "nowhere"), "data.max_per_split": 5})
    assert sources.fashion_mnist_dir(params) == raw
    prepare.run(params)
    assert np.load(params.prepared_dir / "test_images.npy").shape == (5, 28, 28, 1)
