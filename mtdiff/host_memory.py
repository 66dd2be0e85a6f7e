"""Keep freed tensor memory inside the process on CPU, so each training / sampling step reuses it.

Every step allocates and frees the same large activations. glibc's malloc serves blocks above its
mmap threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps them on ``free``, and trims the top
of its heap back to the kernel; the next step then takes one page fault per 4 KiB page to touch the
memory again. On the DiT-S/2 benchmark step (batch 32: (32*256, 1536) float32 MLP activations are
48 MiB) that is most of the non-matmul time: ``softmax`` of a (32, 6, 256, 256) score tensor took
35 ms with a fresh mapping and 12 ms with the memory kept; the whole step 11.8 -> 9.6 s on the
2-core VM (``mtdiff bench train --config imagenet256-dit-b2 model.size=S``).

``retain_freed_memory`` sets the two documented ``mallopt`` knobs (``man 3 mallopt``):
``M_MMAP_MAX = 0`` (large blocks come from the heap, not ``mmap``) and ``M_TRIM_THRESHOLD = -1``
(never hand the heap's free top back). The process keeps its peak footprint until it exits: the
same peak it already needed, with no refaulting. The setting is skipped where the C library is not
glibc, where ``MTDIFF_RETAIN_FREED_MEMORY=0`` opts out (glibc's defaults, for A/B timings), and
where the user set glibc's own ``MALLOC_MMAP_MAX_`` / ``MALLOC_TRIM_THRESHOLD_`` environment
variables (their choice wins).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger(__name__)  # not utils.get_logger: utils imports this module

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
NEVER_TRIM = -1  # "Setting M_TRIM_THRESHOLD to -1 disables trimming completely" (mallopt(3))
USER_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
OPT_OUT_ENV = "MTDIFF_RETAIN_FREED_MEMORY"

_applied: bool | None = None  # None: not tried yet; then whether the knobs are set


def retain_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory (once per process); True when the setting is in force."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    user_set = [name for name in USER_ENV if name in os.environ]
    if os.environ.get(OPT_OUT_ENV, "1") == "0":
        log.info("%s=0: malloc keeps glibc's defaults", OPT_OUT_ENV)
    elif user_set:
        log.info("malloc left as configured by %s", ", ".join(user_set))
    elif platform.libc_ver()[0] != "glibc":
        log.debug("not glibc (%s): malloc left as is", platform.libc_ver()[0] or "unknown C library")
    else:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        # mallopt returns 1 on success, 0 on error
        _applied = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
        if not _applied:
            log.warning("mallopt refused to keep freed memory; CPU steps will page-fault their activations")
    return _applied
