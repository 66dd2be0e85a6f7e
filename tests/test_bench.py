"""Benchmarks: ``mtdiff bench train|sample`` run in-process with tiny settings.

These check that the numbers exist, have the right types and sane ranges; the performance targets
themselves are shown by the benchmark output, not asserted (timings on a shared CI box are noise).
"""
from __future__ import annotations

import json

import pytest
import torch

from mtdiff import bench
from mtdiff.bench import probes
from mtdiff.models import input_shape_from_params
from mtdiff.precision import cpu_bf16_units
from mtdiff.train.step import TrainStep

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
    # no --dtype: train.precision (auto) decides, bf16 on CPUs with bf16 units and fp32 elsewhere
    want_dtype = "bf16" if cpu_bf16_units() else "fp32"
    assert (r["device"], r["dtype"], r["batch_size"], r["steps"]) == ("cpu", want_dtype, 8, 2)
    assert r["threads"] == threads_before  # --threads not given: torch's count as found
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


def test_train_times_the_shared_step_with_and_without_ema(workdir, capsys, monkeypatch):
    """bench train calls mtdiff.train.step.TrainStep (the train stage's step), warm-up and timed steps
    alike; --no-ema builds it without the EMA update; --profile adds the profiler's table (stderr)."""
    built, calls = [], []
    real_init, real_call = TrainStep.__init__, TrainStep.__call__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        built.append(self)

    def call(self, batch):
        calls.append(self)
        return real_call(self, batch)

    monkeypatch.setattr(TrainStep, "__init__", init)
    monkeypatch.setattr(TrainStep, "__call__", call)
    args = ["train", "--json", "--device", "cpu", "--steps", "2", "--warmup", "1", "--batch-size", "4",
            "--matmul-n", "128", "model.depth=1"]
    assert bench.main([*args, "--no-ema", "--profile"]) == 0
    captured = capsys.readouterr()
    r = json.loads(captured.out.strip())
    assert r["ema"] is False and built[-1].ema is None
    assert len(calls) == 1 + 2 + 2  # warm-up, timed, profiled
    assert "Self CPU" in captured.err
    assert bench.main(args) == 0
    assert _json_line(capsys)["ema"] is True and built[-1].ema is not None and built[-1].ema.num_updates == 3


def test_bad_arguments_exit_2(workdir, capsys):
    assert bench.main(["train", "--device", "cpu", "--batch-size", "0", "--steps", "1"]) == 2
    assert "--batch-size" in capsys.readouterr().err
    assert bench.main(["train", "--device", "cpu", "model.nope=1", "--steps", "1"]) == 2
    assert "model.nope" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert bench.main(["train", "--device", "cuda", "--steps", "1"]) == 2
        assert "cuda" in capsys.readouterr().err.lower()


def test_imagenet_config_shapes():
    p = probes.bench_params("imagenet256-dit-b2")
    assert input_shape_from_params(p) == (4, 32, 32)
    assert p.model.dims == (12, 768, 12) and p.model.patch_size == 2
    assert probes.CONFIGS["imagenet256-dit-b2"].num_classes == 1000 and p.tasks.enabled == ["label"]
    with pytest.raises(ValueError, match="--config"):
        probes.bench_params("nope")


def test_matmul_peak():
    probe = probes.MatmulProbe(torch.device("cpu"), torch.float32, n=128)
    probe.rate(reps=2)
    info = probe.info()
    assert info["matmul_flops"] > 0 and info["matmul_n"] == 128 and info["matmul_dtype"] == "float32"
    assert info["matmul_samples"] == 2 and info["matmul_flops"] == max(probe.samples)  # warm-up + timed


def test_sample_small(workdir, capsys):
    rc = bench.main(["sample", "--json", "--device", "cpu", "--num", "4", "--steps", "3", "model.depth=2"])
    assert rc == 0
    r = _json_line(capsys)
    assert (r["num"], r["steps"], r["condition"]) == (4, 3, "label")
    assert r["img_per_s"] > 0 and r["seconds"] > 0 and 0 < r["mfu"] < 1.5
    # task guidance as the sample stage runs it: a doubled batch per step
    assert r["task_guidance"] == 1.5 and r["network_images"] == 4 * 2 * 3
    bench.main(["sample", "--json", "--device", "cpu", "--num", "4", "--steps", "3", "model.depth=2",
                "sample.task_guidance=1"])
    assert _json_line(capsys)["network_images"] == 4 * 3


def test_decode_image_bytes_center_crops_a_jpeg(tmp_path):
    """(Kept from the dropped ``bench data``: the prepare stage's JPEG decode + ADM center crop.)"""
    import numpy as np
    from PIL import Image

    from mtdiff import sources

    p = tmp_path / "img.jpg"
    rgb = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(p, format="JPEG")
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


def test_smoke_projects_the_profiles_budget_from_what_it_measured(workdir, capsys):
    """``bench smoke`` on CPU with a shrunk DiT: the profile's budget (steps, samples) projected from
    the measured rates, and the table names every stage. The real-size run is ``make gpu-smoke``."""
    rc = bench.main(["smoke", "--json", "--device", "cpu", "--steps", "1", "--batch-size", "1",
                     "--sample-steps", "1", "--no-compile", "model.size=custom", "model.depth=1",
                     "model.hidden_size=64", "model.num_heads=2", "train.steps=1000", "sample.num_samples=300"])
    assert rc == 0
    r = _json_line(capsys)
    t, p = r["train"], r["projection"]
    assert t["input_shape"] == [4, 32, 32] and t["batch_size"] == 1 and r["sample"]["steps"] == 1
    h = p["hours_1gpu"]
    # the profile's batch (256) and steps (the override) over the measured img/s
    assert h["train"] == pytest.approx(1000 * 256 / t["img_per_s"] / 3600)
    assert h["decode"] == pytest.approx(300 / r["vae_decode_img_per_s"] / 3600)
    assert p["calls_per_image"] == pytest.approx(2.0)  # task guidance 1.5: a guided and an unguided call
    assert p["budget"]["sample.steps"] == 50  # the profile's DDIM-50, not the timed step count
    one, eight = p["per_gpus"]["1"], p["per_gpus"]["8"]  # JSON keys
    assert one["total_h"] == pytest.approx(sum(h.values()))
    assert eight["train_h"] == pytest.approx(one["train_h"] / (8 * 0.9))
    r["projection"]["per_gpus"] = {int(k): v for k, v in p["per_gpus"].items()}
    r["scaling_efficiency_assumed"] = {int(k): v for k, v in r["scaling_efficiency_assumed"].items()}
    table = bench.format_smoke(r)
    assert all(w in table for w in ("MFU", "VAE decode", "FID network", "64 GPUs", "1,000 steps x batch 256"))


def test_stages_each_in_its_own_process(capsys):
    """``bench stages``: the chosen stages in pipeline order, each measured in a fresh process (its peak
    memory holds the imports' baseline plus its own model, the Inception network's ~100 MB of weights)."""
    assert bench.main(["stages", "--json", "--device", "cpu", "--threads", "1", "--reps", "1",
                       "inception", "prepare"]) == 0
    r = _json_line(capsys)
    assert [row["stage"] for row in r["rows"]] == ["prepare", "inception"]  # pipeline order, not argv's
    prepare, inception = r["rows"]
    assert prepare["images"] == 16 and inception["images"] == 4
    assert all(row["img_per_s"] > 0 for row in r["rows"])
    assert inception["peak_mem_mb"] > r["baseline_mb"] + 50
    assert isinstance(r["avx512_bf16"], bool) and r["cpu_model"]
    assert bench.main(["stages", "--reps", "1", "nope"]) == 2
    assert "unknown stage" in capsys.readouterr().err


def test_compare_prints_fp32_and_bf16_side_by_side(workdir, capsys):
    """``--compare``: the same benchmark at fp32, bf16 (and bf16 + compile for train) in one run."""
    rc = bench.main(["sample", "--compare", "--device", "cpu", "--steps", "2", "--num", "4"])
    out = capsys.readouterr().out
    assert rc == 0 and "bench sample-compare" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("fp32", "bf16"))]
    assert [r[0] for r in rows] == ["fp32", "bf16"] and rows[0][2] == "1.00x"
    result = bench.run(["sample", "--compare", "--device", "cpu", "--steps", "2", "--num", "4", "--json"])
    assert [r["dtype"] for r in result["rows"]] == ["fp32", "bf16"]
