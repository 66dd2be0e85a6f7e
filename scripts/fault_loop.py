"""The SIGKILL fault test over many kill points, outside CI (CI runs two per stage).

Builds the tiny reference pipeline once, then for seed 0, 1, ... kills one stage (latents, train,
sample, evaluate in turn) twice at random points of its work, reruns it and checks its outputs equal
the uninterrupted run's with no temp file left (tests/fixtures/faults.py). Prints one line per run
and a summary; exits 1 when any run failed (its stage and seed reproduce it).

    python scripts/fault_loop.py --kills 100           # ~10 min on 2 cores
    python scripts/fault_loop.py --stage train --seed 12 --kills 2   # one case again

Run it on a tree nobody edits meanwhile (a clone, with PYTHONPATH=<clone>): a resumable training
state remembers the hash of the mtdiff source that made it, and a finished state of other code is
set aside (``last.pt.stale.N``) rather than resumed, which the comparison counts as a failure.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.update({"MTDIFF_MLFLOW": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})

import torch  # noqa: E402

from fixtures import tiny_project  # noqa: E402
from fixtures.faults import KILLED_STAGES, kill_and_rerun  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=100, help="stop once this many kills landed")
    ap.add_argument("--stage", choices=KILLED_STAGES, default=None, help="only this stage (default: all in turn)")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--fmnist-dir", default=os.environ.get("MTDIFF_FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    fmnist = Path(args.fmnist_dir)
    work = Path(tempfile.mkdtemp(prefix="mtdiff-fault-loop-"))
    t0 = time.monotonic()
    durations = tiny_project.build(work / "ref", fmnist)
    print(f"reference pipeline in {time.monotonic() - t0:.0f} s: " +
          ", ".join(f"{s} {d:.1f} s" for s, d in durations.items()), flush=True)
    stages = [args.stage] if args.stage else list(KILLED_STAGES)
    kills, failures, runs, seed = 0, [], 0, args.seed
    while kills < args.kills:
        stage = stages[runs % len(stages)]
        run_root = work / f"run-{stage}-{seed}"
        res = kill_and_rerun(work / "ref", durations, stage, run_root, random.Random(f"{stage}/{seed}"))
        ok = bool(res["kills"]) and res["equal"] and not res["leftovers"]
        kills += len(res["kills"])
        runs += 1
        print(f"{'ok  ' if ok else 'FAIL'} {stage:9s} seed {seed:4d} kills at {res['kills']} "
              f"equal={res['equal']} leftovers={len(res['leftovers'])}", flush=True)
        if not ok:
            failures.append((stage, seed, res))
        else:
            shutil.rmtree(run_root)
        seed += 1
    print(f"\n{kills} kill points in {runs} runs ({time.monotonic() - t0:.0f} s): {len(failures)} failed"
          + "".join(f"\n  {s} seed {sd}: {r}" for s, sd, r in failures))
    if not failures:
        shutil.rmtree(work)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
