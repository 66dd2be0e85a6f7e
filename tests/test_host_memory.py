"""mtdiff.host_memory: freed CPU tensor memory is kept in the process, so steps stop page-faulting."""
import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the mallopt knobs are glibc's")

# Allocates, touches and frees a 64 MiB tensor (above glibc's 32 MiB mmap ceiling) over and over, and
# reports the minor page faults (a 4 KiB page each on first touch) of the rounds after a warm-up (the
# first few rounds of a kept heap still grow it while memalign's split chunks settle).
PROBE = """
import json, resource, torch
from mtdiff.utils import pick_device
from mtdiff.host_memory import retain_freed_memory
pick_device("cpu")
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.empty(16 * 2**20).fill_(1.0)
start = faults()
for _ in range(5):
    torch.empty(16 * 2**20).fill_(1.0)
print(json.dumps({"faults": faults() - start, "retained": retain_freed_memory()}))
"""
PAGES_PER_TENSOR = 64 * 2**20 // 4096


def _probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("MTDIFF_RETAIN_FREED_MEMORY", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cpu_device_keeps_freed_memory_so_reallocation_does_not_fault():
    kept = _probe()
    default = _probe(MTDIFF_RETAIN_FREED_MEMORY="0")
    assert kept["retained"] is True and default["retained"] is False
    # glibc's default unmaps each 64 MiB block on free: every round faults all its pages again
    assert default["faults"] >= 4 * PAGES_PER_TENSOR
    assert kept["faults"] < PAGES_PER_TENSOR // 4


def test_users_own_glibc_malloc_settings_win():
    assert _probe(MALLOC_TRIM_THRESHOLD_="1048576")["retained"] is False
