"""Refactor guard: hash what the stages compute on tiny runs, to compare code before and after.

Runs the real stages (prepare, latents, representations, train, sample, evaluate) on 64 images per
split for a set of variants that cover the model's modes (tasks, guidance, predicted inputs,
samplers, backbones, precision, fine-tune) and prints one sha256 per variant and output: the EMA
weights, every samples.npz array and the evaluate metrics (timings left out). Two runs of the same
code on one machine print the same lines; a refactor that claims bit-identical results must too.

    python scripts/fingerprint.py > before.txt   # on the old code
    python scripts/fingerprint.py > after.txt    # on the new code, same machine
    diff before.txt after.txt
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

TINY = {"train.precision": "fp32", "model.channels": 8, "model.channel_mult": [1, 2], "model.attn_resolutions": [14],
        "model.depth": 2, "model.hidden_size": 64, "model.num_heads": 2, "model.patch_size": 4,
        "model.head_hidden": 32, "diffusion.timesteps": 50, "train.batch_size": 16,
        "train.warmup_steps": 2, "train.log_every": 2, "train.ckpt_every": 4, "train.steps": 6,
        "train.grid_every": 3, "train.device": "cpu", "sample.steps": 10, "sample.num_samples": 12,
        "sample.batch_size": 8, "sample.forward_batch": None, "data.max_per_split": 64,
        "representations.epochs": 1, "evaluate.num_samples": 12, "evaluate.num_ref": 64,
        "evaluate.inception": False, "evaluate.diffusion_classifier_images": 8,
        "evaluate.diffusion_classifier_draws": 2}
ALL_TASKS = {f"tasks.{t}.enabled": True for t in ("label", "representation", "masked", "transition")}

# name: (training overrides, [(sample name, sample overrides), ...], evaluate after the first sample)
VARIANTS = {
    "joint_label": ({}, [("label", {}), ("uncond_soft", {"sample.condition": "uncond"}),
                         ("uncond_hard", {"sample.condition": "uncond", "sample.predicted_label": "hard"}),
                         ("uncond_absent", {"sample.condition": "uncond", "sample.predicted_label": "absent"}),
                         ("uncond_drawn", {"sample.condition": "uncond", "sample.predicted_label": "drawn"}),
                         ("ddpm", {"sample.sampler": "ddpm", "sample.steps": 50}),
                         ("dpmpp2m", {"sample.sampler": "dpmpp2m"}),
                         ("unguided_eta0", {"sample.task_guidance": 1.0, "sample.eta": 0.0})], True),
    "classcond": ({"model.class_conditional": True, "tasks.label.enabled": False},
                  [("cfg2", {"sample.cfg_scale": 2.0}), ("cfg1", {"sample.cfg_scale": 1.0})], True),
    "all_tasks": ({**ALL_TASKS, "tasks.label.max_t": 20, "tasks.representation.loss": "cosine"},
                  [("label_expected", {}),
                   ("label_masked", {"sample.predicted_masked": "masked"}),
                   ("label_absent", {"sample.predicted_masked": "absent"}),
                   ("masked", {"sample.condition": "masked"}),
                   ("transition", {"sample.condition": "transition"}),
                   ("uncond", {"sample.condition": "uncond"})], True),
    "finetune": ({"tasks.masked.enabled": True, "model.class_conditional": True, "tasks.label.enabled": False,
                  "train.finetune_steps": 2, "train.finetune_tasks": []}, [("cfg", {"sample.cfg_scale": 1.5})], False),
    "dit": ({"model.backbone": "dit", "diffusion.w_schedule": "linear", "diffusion.prediction": "z0"},
            [("label", {})], True),
    "bf16_minsnr": ({"train.precision": "auto", "diffusion.beta_schedule": "cosine"}, [("label", {})], False),
}


def _digest(arr) -> str:
    a = np.ascontiguousarray(arr.detach().cpu().float().numpy() if isinstance(arr, torch.Tensor) else arr)
    return hashlib.sha256(a.tobytes() + str(a.dtype).encode() + str(a.shape).encode()).hexdigest()[:16]


def _weights(path: Path) -> str:
    state = torch.load(path, map_location="cpu", weights_only=False)
    sd = state["ema"]
    sd = sd.get("shadow", sd)
    h = hashlib.sha256()
    for k in sorted(sd):
        if isinstance(sd[k], torch.Tensor):
            h.update(k.encode() + _digest(sd[k]).encode())
    return h.hexdigest()[:16]


def _metrics(path: Path) -> dict:
    data = json.loads(path.read_text())
    skip = ("time", "per_s", "_s", "seconds", "tflops", "memory", "mfu", "path", "dir", "device")
    return {k: v for k, v in sorted(data.items())
            if isinstance(v, (int, float)) and not any(s in k for s in skip)}


def main() -> None:
    from mtdiff.config import DEFAULT_PARAMS, load_params
    from mtdiff.stages import evaluate, latents, prepare, representations, sample, train

    torch.set_num_threads(int(os.environ.get("FINGERPRINT_THREADS", "2")))
    only = set(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.chdir(root)
        os.environ["MTDIFF_MLFLOW"] = "0"
        os.environ["MTDIFF_OUTPUT_ROOTS"] = str(root)
        base = {"data.out_dir": str(root / "data"), **TINY, **ALL_TASKS}
        data_params = load_params(DEFAULT_PARAMS, overrides=base)
        prepare.run(data_params), latents.run(data_params), representations.run(data_params)
        for name, (train_over, samples, do_eval) in VARIANTS.items():
            if only and name not in only:
                continue
            run_dir = root / name
            over = {**base, "tasks.representation.enabled": False, "tasks.masked.enabled": False,
                    "tasks.transition.enabled": False, "train.out_dir": str(run_dir / "ckpt"), **train_over}
            params = load_params(DEFAULT_PARAMS, overrides=over)
            train.run(params)
            print(f"{name} ema {_weights(run_dir / 'ckpt' / 'ema.pt')}", flush=True)
            for i, (sname, s_over) in enumerate(samples):
                sp = load_params(DEFAULT_PARAMS, overrides={**over, **s_over,
                                                             "sample.out_dir": str(run_dir / f"s_{sname}"),
                                                             "evaluate.out_dir": str(run_dir / f"m_{sname}")})
                sample.run(sp)
                with np.load(run_dir / f"s_{sname}" / "samples.npz") as npz:
                    for k in sorted(npz.files):
                        print(f"{name} {sname} {k} {_digest(npz[k])}", flush=True)
                if do_eval and i == 0:
                    evaluate.run(sp)
                    for k, v in _metrics(run_dir / f"m_{sname}" / "evaluate.json").items():
                        print(f"{name} {sname} metric {k} {v!r}", flush=True)


if __name__ == "__main__":
    main()
