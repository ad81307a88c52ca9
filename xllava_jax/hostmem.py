"""glibc malloc settings for processes whose XLA runs on the CPU.

XLA:CPU allocates each execution's temporaries (and outputs) with `posix_memalign` from its worker threads. Under
glibc's defaults a worker thread allocates from its own arena, which cannot hold a block over 64 MiB, so such a
block is mapped fresh with `mmap` on every execution and unmapped when the execution ends: the kernel faults in
and zeroes every page of it again each time. A demo instruction-tuning step (a 123 MiB temporary) spent about a
sixth of its time in those page faults. One arena, with a mapping threshold and a trim threshold above the
temporaries, keeps the freed block in the heap for the next execution instead (BENCHMARKS.md, "Demo").

The price is slower compilation (with one arena XLA compiles about 1.5 times slower: a demo step in 2.9 s instead of
1.9 s), so only the commands whose time goes into many runs of one compiled step (`xllava train`, but not
`--compile-only`, and `xllava demo`) apply it, right after parsing their arguments, before XLA's threads first
allocate. Only CPU-only processes are tuned (on a GPU or TPU host the device buffers do not come from malloc), only
on glibc, and never over a user's own malloc settings.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from collections.abc import Mapping

# mallopt parameters (glibc malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
KEEP_BYTES = 1 << 30  # blocks up to this size come from the heap, and this much freed memory may stay mapped
ACCELERATOR_DEVICES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


def cpu_only(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether JAX will run on the CPU alone: `JAX_PLATFORMS` names only cpu, or, unset, the host has no GPU or
    TPU device file."""
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return all(p.strip() == "cpu" for p in platforms.split(","))
    return not any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICES)


def user_set_malloc(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment already chooses malloc's behaviour: a `MALLOC_*` variable, a glibc malloc tunable,
    or another malloc preloaded."""
    return (any(name.startswith("MALLOC_") for name in environ) or "malloc" in environ.get("GLIBC_TUNABLES", "")
            or "malloc" in environ.get("LD_PRELOAD", ""))


def tune_malloc_for_xla_cpu(environ: Mapping[str, str] = os.environ) -> bool:
    """Apply the settings above when this is a CPU-only glibc process and the user set none of their own; returns
    whether they were applied."""
    if not sys.platform.startswith("linux") or user_set_malloc(environ) or not cpu_only(environ):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (raises AttributeError off glibc, e.g. musl)
    except (OSError, AttributeError):
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in
               ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, KEEP_BYTES), (M_TRIM_THRESHOLD, KEEP_BYTES)))
