"""A/B of mtdiff's training step against the public DiT reference step, alternated in one run (issue 10).

    pip install timm                      # DiT's models.py builds on timm's PatchEmbed / Attention / Mlp
    git clone https://github.com/facebookresearch/DiT /path/to/DiT
    python scripts/dit_reference_ab.py --dit-repo /path/to/DiT --rounds 12

Both steps on the bench config ``imagenet256-dit-b2 model.size=S`` (DiT-S/2 on 4x32x32 latents,
batch 32, fp32, no EMA): mtdiff's ``TrainStep`` as ``mtdiff bench train`` runs it (M5 loss with the
label task, fused AdamW; eager, or compiled with ``--compile``) and DiT's ``DiT-S/2`` (learn_sigma,
class embedding) with the eps MSE and torch's default AdamW, as DiT's train.py steps it (eager).

Each step lives in its own worker process, so each runs as its own program would: mtdiff's worker
with mtdiff's CPU allocator setting (``mtdiff.host_memory``), DiT's with glibc's defaults, or with
the same setting under ``--reference-allocator retain`` (the like-for-like figure). The parent
alternates the workers one step at a time (never both at once) and flips the order every round; the
per-round ratio is the robust figure on a machine whose speed drifts (both steps of a round see
about the same load). Neither DiT nor timm is a dependency of mtdiff: this script is for the
comparison only.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

BATCH = 32
BENCH_ARGS = ["train", "--config", "imagenet256-dit-b2", "model.size=S", "--batch-size", str(BATCH),
              "--no-ema", "--dtype", "fp32", "--device", "cpu"]


def mtdiff_step(compile_model: bool):
    import torch

    from mtdiff.bench import build_parser
    from mtdiff.bench.probes import build, setup, synthetic_batch
    from mtdiff.train.step import TrainStep

    s = setup(build_parser().parse_args(BENCH_ARGS))  # the CPU via pick_device, as bench and train stage
    torch.manual_seed(s.params.seed)
    model, diffusion = build(s)
    step = TrainStep(model, diffusion, s.params, s.device, generator=torch.Generator().manual_seed(1),
                     use_ema=False, compile_model=compile_model)
    batch = synthetic_batch(s, BATCH, torch.Generator().manual_seed(2))
    return lambda: step(batch)


def reference_step(dit_repo: str, retain_freed_memory: bool):
    import torch

    if retain_freed_memory:
        from mtdiff.host_memory import retain_freed_memory as retain
        retain()
    sys.path.insert(0, dit_repo)
    from models import DiT_models  # facebookresearch/DiT models.py

    model = DiT_models["DiT-S/2"](input_size=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)  # DiT's train.py
    x, y = torch.randn(BATCH, 4, 32, 32), torch.randint(0, 1000, (BATCH,))

    def step() -> None:
        t, noise = torch.randint(0, 1000, (BATCH,)), torch.randn_like(x)
        eps, _ = model(x + noise, t, y).chunk(2, dim=1)  # learn_sigma: eps and the variance channels
        loss = ((eps - noise) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def serve(step) -> None:
    """Worker loop: one step per line on stdin, its wall time in seconds on stdout."""
    print("ready", flush=True)
    for _ in sys.stdin:
        t0 = time.perf_counter()
        step()
        print(f"{time.perf_counter() - t0:.6f}", flush=True)


def start_worker(args: argparse.Namespace, which: str) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--worker", which, "--dit-repo", args.dit_repo,
           "--reference-allocator", args.reference_allocator, "--compile" if args.compile else "--no-compile"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the {which} worker did not start (exit code {proc.wait()})")
    return proc


def timed_step(proc: subprocess.Popen) -> float:
    proc.stdin.write("step\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"a worker exited (code {proc.wait()})")
    return float(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dit-repo", required=True, help="a checkout of facebookresearch/DiT")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per worker (compilation included)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                    help="torch.compile mtdiff's model (as bench train --compile)")
    ap.add_argument("--reference-allocator", choices=("glibc", "retain"), default="glibc",
                    help="DiT's worker with glibc's malloc defaults (as DiT's train.py runs) or mtdiff's setting")
    ap.add_argument("--worker", choices=("mtdiff", "dit"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        serve(mtdiff_step(args.compile) if args.worker == "mtdiff"
              else reference_step(args.dit_repo, args.reference_allocator == "retain"))
        return
    workers = {"mtdiff": start_worker(args, "mtdiff"), "dit": start_worker(args, "dit")}
    for _ in range(args.warmup):
        for proc in workers.values():
            timed_step(proc)
    times: dict[str, list[float]] = {name: [] for name in workers}
    for r in range(args.rounds):
        for name in (list(workers) if r % 2 == 0 else list(reversed(workers))):
            times[name].append(timed_step(workers[name]))
        print(f"round {r}: mtdiff {times['mtdiff'][-1]:.2f} s, DiT {times['dit'][-1]:.2f} s, "
              f"img/s ratio {times['dit'][-1] / times['mtdiff'][-1]:.3f}", flush=True)
    for proc in workers.values():
        proc.stdin.close()
        proc.wait()
    mean = {name: statistics.mean(ts) for name, ts in times.items()}
    ratios = [d / m for m, d in zip(times["mtdiff"], times["dit"])]
    print(f"mtdiff ({'compiled' if args.compile else 'eager'}) {BATCH / mean['mtdiff']:.2f} img/s, DiT "
          f"(allocator: {args.reference_allocator}) {BATCH / mean['dit']:.2f} img/s: ratio of means "
          f"{mean['dit'] / mean['mtdiff']:.3f}, median per-round ratio {statistics.median(ratios):.3f} "
          f"({args.rounds} rounds)")


if __name__ == "__main__":
    main()
