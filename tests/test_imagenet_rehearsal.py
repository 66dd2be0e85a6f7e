"""A real-size rehearsal of the ImageNet-256 profile on CPU (issue 30): an ImageNet-layout folder of mixed
JPEGs -> the SD-VAE of sd-vae-ft-ema's architecture (a local diffusers folder) -> DINOv2 ViT-B/14 (a local
timm weights file) -> DiT-B/2 -> sampling -> Inception FID (a local torch-fidelity weights file) against an
ADM-format reference .npz, all random weights, through ``dvc exp run`` in a temp copy of the repo.

Only the budget is tiny (2 train steps, 2 samples of 2 sampler steps, 6 images); the architectures,
shapes, loaders and file formats are the profile's. The run is what a user types:
``dvc exp run -S profile=imagenet256 -S <local paths> -S <budget>``. What a 2-core CPU cannot afford
and that ``-S`` cannot say under this profile (a key set back to its built-in default follows the
profile, docs/pipeline.md) is edited into the temp repo's copy of the profile, as a CPU user would:
no ``torch.compile``, no loader workers, no flipped latents."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from fixtures import real_size
from fixtures.dvc_repo import DVC, repo_copy, sh

pytestmark = pytest.mark.slow

# The budget, as -S values (each differs from the built-in default, so it wins over the profile)
TINY_BUDGET = {"train.steps": 2, "train.batch_size": 2,
               "sample.num_samples": 2, "sample.steps": 2}  # the sample batch and evaluate's count follow
# What a 2-core CPU cannot afford, back at the built-in defaults in the temp repo's profile
CPU_PROFILE_EDITS = {"train.compile": False, "train.num_workers": 0, "latents.flip": False}
THREADS = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}  # CI's two cores (dvc_env's 1 suits tiny models)
OFFLINE = {"HF_HUB_OFFLINE": "1", "MTDIFF_OFFLINE": "1"}  # every weight is local: no hub, no download


def _local_inputs(assets: Path) -> tuple[dict, dict[str, int]]:
    """The real-size random-weight components and the image folder under ``assets``, as overrides."""
    assets.mkdir()
    imagenet, decodable = real_size.mixed_imagenet(assets / "imagenet")
    return {"data.imagenet_dir": str(imagenet),
            "latents.vae": str(real_size.sd_vae_folder(assets / "sd-vae-ft-ema")),
            "representations.weights_path": str(real_size.dinov2_weights(assets / "dinov2_vitb14.pth")),
            "evaluate.feature_extractor_weights_path": str(real_size.inception_weights(assets / "pt_inception.pth")),
            "evaluate.ref_stats_npz": str(real_size.adm_reference_npz(assets / "VIRTUAL_imagenet256_labeled.npz")),
            }, decodable


def _edit_profile(root: Path, edits: dict) -> None:
    """The temp repo's configs/imagenet256.yaml with ``edits`` set."""
    path = root / "configs" / "imagenet256.yaml"
    profile = yaml.safe_load(path.read_text())
    for key, value in edits.items():
        section, leaf = key.split(".")
        profile[section][leaf] = value
    path.write_text(yaml.safe_dump(profile, sort_keys=False))


def _check_prepared(root: Path, decodable: dict[str, int]) -> None:
    report = json.loads((root / "data/prepared/report.json").read_text())
    assert report["skipped"] == {"truncated": 1} and report["skipped_total"] == 1, report["skipped"]
    assert report["splits"]["train"]["skipped_files"][0]["path"].endswith("corrupt.JPEG")
    assert report["splits"]["train"]["converted_by_mode"] == {"L": 1, "CMYK": 1, "RGBA": 1}
    assert report["splits"]["train"]["extension_mismatch_by_format"] == {"PNG": 1}
    for split, dir_name in (("train", "train"), ("test", "val")):
        images = np.load(root / f"data/prepared/{split}_images.npy", mmap_mode="r")
        assert images.shape == (decodable[dir_name], 256, 256, 3) and images.dtype == np.uint8


def _check_features(root: Path, decodable: dict[str, int]) -> None:
    for split, dir_name in (("train", "train"), ("test", "val")):
        latents = np.load(root / f"data/latents/{split}/mean.npy")
        assert latents.shape == (decodable[dir_name], 4, 32, 32) and np.isfinite(latents).all()
        reps = np.load(root / f"data/representations/{split}.npy")
        assert reps.shape == (decodable[dir_name], 768) and np.isfinite(reps).all()
    assert json.loads((root / "data/representations/meta.json").read_text())["image_size"] == 224


def _check_model_and_metrics(root: Path) -> None:
    train = json.loads((root / "metrics/train.json").read_text())
    assert train["steps"] == 2 and train["params_count"] > 130e6  # DiT-B/2 and its heads
    with np.load(root / "samples/samples.npz") as z:
        assert z["arr_0"].shape == (2, 256, 256, 3) and z["arr_0"].dtype == np.uint8
    assert json.loads((root / "samples/meta.json").read_text())["steps"] == 2  # -S beat the profile's 50
    metrics = json.loads((root / "metrics/evaluate.json").read_text())
    assert metrics["inception_skipped_reason"] == ""
    for key in ("fid", "fid_adm_ref", "kid", "isc", "label_acc_t1"):
        assert np.isfinite(metrics[key]), key
    assert metrics["fid_adm_ref"] > 0


@pytest.mark.slow
def test_imagenet256_chain_with_real_size_components_through_dvc_exp_run(tmp_path):
    inputs, decodable = _local_inputs(tmp_path / "assets")
    root = repo_copy(tmp_path / "repo")
    _edit_profile(root, CPU_PROFILE_EDITS)
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-q", "-m", "rehearsal repo")
    flags = [arg for key, value in {**inputs, **TINY_BUDGET}.items() for arg in ("-S", f"{key}={json.dumps(value)}")]
    run = sh(root, *DVC, "exp", "run", "-S", "profile=imagenet256", *flags, env={**THREADS, **OFFLINE})
    for stage in ("prepare", "latents", "representations", "train", "sample", "evaluate"):
        assert f"Running stage '{stage}'" in run.stdout, run.stdout[-2000:]
    _check_prepared(root, decodable)
    _check_features(root, decodable)
    _check_model_and_metrics(root)
