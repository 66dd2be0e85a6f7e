"""Benchmarks: ``mtdiff bench train|sample|data`` run in-process with tiny settings.

These check that the numbers exist, have the right types and sane ranges; the performance targets
themselves are shown by the benchmark output, not asserted (timings on a shared CI box are noise).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from mtdiff import bench
from mtdiff.bench import common as C

TRAIN_KEYS = {"mfu": float, "img_per_s": float, "peak_mem_mb": float, "device": str, "dtype": str,
              "flops_per_img": float, "matmul_flops": float, "threads": int, "batch_size": int, "params": int,
              "achieved_flops": float, "steps": int}


def _json_line(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, f"--json must print exactly one line, got {out!r}"
    return json.loads(out[0])


def test_train_quick_json(workdir, capsys):
    threads_before = torch.get_num_threads()
    rc = bench.main(["train", "--quick", "--json", "--device", "cpu", "--steps", "2", "--warmup", "1",
                     "--batch-size", "8", "--matmul-n", "512"])
    assert rc == 0
    r = _json_line(capsys)
    for key, typ in TRAIN_KEYS.items():
        assert key in r, f"missing {key}"
        assert isinstance(r[key], typ), f"{key}: {type(r[key]).__name__}, want {typ.__name__}"
    assert 0 < r["mfu"] < 1.5
    assert r["img_per_s"] > 0 and r["peak_mem_mb"] > 0 and r["matmul_flops"] > 1e8
    assert (r["device"], r["dtype"], r["batch_size"], r["steps"]) == ("cpu", "fp32", 8, 2)
    assert r["threads"] == C.physical_cores()
    # MFU is exactly achieved / peak with achieved = 3 x forward FLOPs x img/s
    assert r["achieved_flops"] == pytest.approx(3 * r["flops_per_img"] * r["img_per_s"], rel=1e-9)
    assert r["mfu"] == pytest.approx(r["achieved_flops"] / r["matmul_flops"], rel=1e-9)
    # the analytic FLOP count agrees with torch's counter (which may miss only the attention kernel)
    if r["flops_per_img_counted"]:
        assert r["flops_per_img_counted"] == pytest.approx(r["flops_per_img"], rel=0.1)
    assr_loss = r["loss"]
    assert assr_loss == assr_loss and assr_loss > 0  # finite, positive
    assert torch.get_num_threads() == threads_before, "the benchmark must restore torch's thread count"


def test_train_table_output(workdir, capsys):
    assert bench.main(["train", "--device", "cpu", "--steps", "1", "--warmup", "0", "--batch-size", "4",
                       "--matmul-n", "256", "model.depth=1"]) == 0
    out = capsys.readouterr().out
    for needle in ("img/s", "MFU", "3 x forward FLOPs/img", "matmul peak", "peak memory"):
        assert needle in out


def test_train_all_tasks(workdir, capsys):
    """The synthetic batch feeds every task's input to the real M5 loss (all four settings on)."""
    rc = bench.main(["train", "--json", "--device", "cpu", "--steps", "1", "--warmup", "0", "--batch-size", "4",
                     "--matmul-n", "128", "model.depth=1", "tasks.representation.enabled=true",
                     "tasks.masked.enabled=true", "tasks.transition.enabled=true"])
    assert rc == 0
    r = _json_line(capsys)
    assert r["tasks"] == ["label", "representation", "masked", "transition"]
    assert r["loss"] > 0 and r["mfu"] > 0


def test_bad_arguments_exit_2(workdir, capsys):
    assert bench.main(["train", "--device", "cpu", "--batch-size", "0", "--steps", "1"]) == 2
    assert "--batch-size" in capsys.readouterr().err
    assert bench.main(["train", "--device", "cpu", "model.nope=1", "--steps", "1"]) == 2
    assert "model.nope" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert bench.main(["train", "--device", "cuda", "--steps", "1"]) == 2
        assert "cuda" in capsys.readouterr().err.lower()


def test_imagenet_config_shapes():
    p = C.bench_params("imagenet256-dit-b2")
    assert C.data_shape(p) == (4, 32, 32)
    assert p.model.dims == (12, 768, 12) and p.model.patch_size == 2
    assert C.num_classes(p) == 1000 and p.tasks.enabled == ["label"]
    with pytest.raises(ValueError, match="--config"):
        C.bench_params("nope")


def test_physical_cores_and_matmul_peak():
    n = C.physical_cores()
    assert 1 <= n <= (os.cpu_count() or 1)
    peak = C.matmul_peak(torch.device("cpu"), "fp32", n=128, reps=2)
    assert peak["matmul_flops"] > 0 and peak["matmul_n"] == 128 and peak["matmul_dtype"] == "float32"


def test_sample_small(workdir, capsys):
    rc = bench.main(["sample", "--json", "--device", "cpu", "--num", "4", "--steps", "3", "model.depth=2"])
    assert rc == 0
    r = _json_line(capsys)
    assert (r["num"], r["steps"], r["condition"]) == (4, 3, "label")
    assert r["img_per_s"] > 0 and r["seconds"] > 0 and 0 < r["mfu"] < 1.5


def test_data_small(workdir, fmnist_dir, capsys):
    rc = bench.main(["data", "--quick", "--json", "--device", "cpu", "--batch-size", "8", "--steps", "1",
                     "--jpegs", "3", "--max-per-split", "64", "model.depth=1", "model.hidden_size=64",
                     "model.num_heads=2", f"data.fashion_mnist_dir={fmnist_dir}"])
    assert rc == 0
    r = _json_line(capsys)
    assert r["fmnist_decode"]["idx_images"] == 60000 and r["fmnist_decode"]["idx_img_per_s"] > 0
    assert r["fmnist_decode"]["split_images"] == 60000 and r["fmnist_decode"]["split_img_per_s"] > 0
    assert r["jpeg_decode"]["jpegs"] == 3 and r["jpeg_decode"]["img_per_s"] > 0
    assert "temp slice" in r["data_source"]
    assert r["reading"]["shards_img_per_s"] > 0 and r["reading"]["in_memory_img_per_s"] > 0
    assert r["ratio_shards_vs_memory"] > 0 and r["ratio_latents_vs_vae"] > 0
    lv = r["latents_vs_vae"]
    assert "TINY RANDOM" in lv["vae"] and lv["latent_shape"] == [4, 8, 8]
    # nothing leaked into the working directory: the slice lived in a temp folder
    assert not (workdir / "data").exists()


def test_make_jpegs_decode_to_crop(tmp_path):
    from mtdiff import sources
    from mtdiff.bench.data import make_jpegs

    (p,) = make_jpegs(tmp_path, 1)
    d = sources.decode_image_bytes(p.read_bytes(), p.name, 64, 3)
    assert d.image is not None and d.image.shape == (64, 64, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_cuda_bf16(workdir, capsys):
    rc = bench.main(["train", "--json", "--device", "cuda", "--dtype", "bf16", "--steps", "3", "--warmup", "2",
                     "--batch-size", "64", "--matmul-n", "4096"])
    assert rc == 0
    r = _json_line(capsys)
    assert r["device"] == "cuda" and r["dtype"] == "bf16" and r["peak_mem_kind"] == "cuda_max_memory_allocated"
    assert 0 < r["mfu"] < 1.5 and r["peak_mem_mb"] > 0
