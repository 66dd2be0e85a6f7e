"""Stage ``prepare``: raw data set -> ``data/prepared/`` (the prepared contract of COMMON.md).

Writes ``{split}_images.npy`` (uint8 NHWC), ``{split}_labels.npy`` (int64), ``manifest.parquet``
(split, index, class_index, class_name, source_path, sha1), ``classes.json`` and ``report.json``
(decode counts: decoded, converted, skipped by reason). The whole folder is built in a temp folder
and swapped in at the end, so a killed run leaves the previous output (or none), never a partial one.

    python -m mtdiff.stages.prepare [data.max_per_split=200 ...]
"""
from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pandas as pd

from mtdiff import sources
from mtdiff.config import Params
from mtdiff.io import atomic_dir
from mtdiff.pipeline.tracking import stage_run
from mtdiff.stages import stage_main
from mtdiff.utils import get_logger

log = get_logger("mtdiff.prepare")


def _totals(per_split: dict[str, dict[str, Any]]) -> dict[str, Any]:
    skipped: dict[str, int] = {}
    for rep in per_split.values():
        for reason, count in rep["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
    return {"decoded": sum(r["decoded"] for r in per_split.values()),
            "converted": sum(r["converted"] for r in per_split.values()),
            "extension_mismatch": sum(r["extension_mismatch"] for r in per_split.values()),
            "skipped": skipped, "skipped_total": sum(skipped.values())}


def run(params: Params) -> dict[str, Any]:
    """Prepare both splits of ``params.data.source``; returns the summary written to report.json."""
    out = params.prepared_dir
    start = time.time()
    with stage_run(params, "prepare", out.parent) as tracker:
        classes = sources.source_classes(params)
        per_split: dict[str, dict[str, Any]] = {}
        frames = []
        with atomic_dir(out) as tmp:
            for split in sources.SPLITS:
                t0 = time.time()
                result = sources.write_split(params, split, tmp / f"{split}_images.npy", classes)
                if result.num == 0:
                    raise sources.DataSourceError(f"split '{split}': no image could be decoded "
                                                  f"(see the skip counts: {result.report['skipped']})")
                np.save(tmp / f"{split}_labels.npy", result.labels)
                frames.append(pd.DataFrame({
                    "split": split, "index": np.arange(result.num, dtype=np.int64),
                    "class_index": result.labels,
                    "class_name": [classes[c] for c in result.labels],
                    "source_path": result.source_paths, "sha1": result.sha1s}))
                per_split[split] = dict(result.report)  # no timings in the output: reruns give equal bytes
                log.info("%s: %d images decoded (%d converted, skipped %s) in %.1fs", split, result.num,
                         result.report["converted"], result.report["skipped"] or "none", time.time() - t0)
            pd.concat(frames, ignore_index=True).to_parquet(tmp / "manifest.parquet", index=False)
            (tmp / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")
            report = {"source": params.data.source, "resolution": params.data.resolution,
                      "channels": params.data.channels, "max_per_split": params.data.max_per_split,
                      "num_classes": len(classes), **_totals(per_split), "splits": per_split}
            (tmp / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        seconds = round(time.time() - start, 2)
        tracker.log_metrics({"prepare/decoded": report["decoded"], "prepare/converted": report["converted"],
                             "prepare/skipped": report["skipped_total"],
                             "prepare/train_images": per_split["train"]["decoded"],
                             "prepare/test_images": per_split["test"]["decoded"],
                             "prepare/seconds": seconds})
        tracker.log_artifact(out / "report.json", artifact_path="prepare")
    log.info("prepared %s (%d classes, %s px, %d ch): train %d, test %d images -> %s in %.1fs",
             params.data.source, len(classes), params.data.resolution, params.data.channels,
             per_split["train"]["decoded"], per_split["test"]["decoded"], out, seconds)
    return {**report, "seconds": seconds, "out_dir": str(out),
            "outputs": {name: str(out / name) for name in
                        ("train_images.npy", "train_labels.npy", "test_images.npy", "test_labels.npy",
                         "manifest.parquet", "classes.json", "report.json")}}


def main(argv: list[str] | None = None) -> Any:
    return stage_main(run, argv)


if __name__ == "__main__":
    main()
