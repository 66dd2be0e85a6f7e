"""Same-process A/B of mtdiff's training step against the public DiT reference step (issue 10).

    pip install timm                      # DiT's models.py builds on timm's PatchEmbed / Attention / Mlp
    git clone https://github.com/facebookresearch/DiT /path/to/DiT
    python scripts/dit_reference_ab.py --dit-repo /path/to/DiT --rounds 12

Both steps on the bench config ``imagenet256-dit-b2 model.size=S`` (DiT-S/2 on 4x32x32 latents,
batch 32, fp32, no EMA): mtdiff's ``TrainStep`` (M5 loss with the label task, fused AdamW) and
DiT's ``DiT-S/2`` (learn_sigma, class embedding) with the eps MSE and torch's default AdamW, as
DiT's train.py steps it. The rounds alternate which step goes first; the per-round ratio is the
robust figure on a machine whose speed drifts (both steps of a round see about the same load).
mtdiff's CPU allocator setting (``mtdiff.host_memory``) is process-wide, so the reference step gets
it too; ``MTDIFF_RETAIN_FREED_MEMORY=0`` runs both with glibc's defaults.
Neither DiT nor timm is a dependency of mtdiff: this script is for the comparison only.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from mtdiff.bench import build, build_parser, setup, synthetic_batch
from mtdiff.training import TrainStep

BATCH = 32
BENCH_ARGS = ["train", "--config", "imagenet256-dit-b2", "model.size=S", "--batch-size", str(BATCH),
              "--no-ema", "--dtype", "fp32", "--device", "cpu"]


def mtdiff_step():
    s = setup(build_parser().parse_args(BENCH_ARGS))
    torch.manual_seed(s.params.seed)
    model, diffusion = build(s)
    step = TrainStep(model, diffusion, s.params, s.device, generator=torch.Generator().manual_seed(1), use_ema=False)
    batch = synthetic_batch(s, BATCH, torch.Generator().manual_seed(2))
    return lambda: step(batch)


def reference_step(dit_repo: str):
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dit-repo", required=True, help="a checkout of facebookresearch/DiT")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    steps = {"mtdiff": mtdiff_step(), "dit": reference_step(args.dit_repo)}
    for _ in range(args.warmup):
        for run in steps.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.rounds):
        for name in (list(steps) if r % 2 == 0 else list(reversed(steps))):
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
        print(f"round {r}: mtdiff {times['mtdiff'][-1]:.2f} s, DiT {times['dit'][-1]:.2f} s, "
              f"img/s ratio {times['dit'][-1] / times['mtdiff'][-1]:.3f}", flush=True)
    mean = {name: statistics.mean(ts) for name, ts in times.items()}
    ratios = [d / m for m, d in zip(times["mtdiff"], times["dit"])]
    print(f"mtdiff {BATCH / mean['mtdiff']:.2f} img/s, DiT {BATCH / mean['dit']:.2f} img/s: ratio of means "
          f"{mean['dit'] / mean['mtdiff']:.3f}, median per-round ratio {statistics.median(ratios):.3f} "
          f"({args.rounds} rounds, threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
