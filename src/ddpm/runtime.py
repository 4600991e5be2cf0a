"""Process-wide settings that the `ddpm` programs make for themselves. Importing ddpm changes nothing in its host
process; a script of one's own may call these at its start.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30


def keep_freed_memory(limit: int = KEEP_BYTES) -> bool:
    """Tells glibc's malloc to serve blocks up to `limit` bytes from its heap and to keep freed memory there for
    reuse, instead of mapping each large tensor afresh from the system and unmapping it when freed (the
    default for blocks above 32 MB, and for smaller ones whenever the heap's free top passes the trim threshold).

    Every fresh mapping arrives as zeroed pages, one page fault per 4 kB on first touch: a CIFAR-10 training
    step at batch 16 took 80-160 thousand of them (about 1.5 us each on the machine measured), sampling at
    batch 64 some 400 thousand per network call. With this setting both fall to about zero after the first
    step (training 1.08x; benchmarks/RESULTS.md). The price: the process keeps its peak memory instead of
    returning it between steps. `ddpm` commands call this at start; `DDPM_KEEP_FREED_MEMORY=0` turns it off,
    and a GLIBC_TUNABLES malloc setting of one's own is left alone. Returns whether the setting was made
    (False off Linux/glibc)."""
    if not sys.platform.startswith("linux") or os.environ.get("DDPM_KEEP_FREED_MEMORY", "1") == "0":
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    limit = int(limit)
    return bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))


_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 instructions that compute in bf16 (oneDNN uses them)
_BELOW_BF16_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI")  # ONEDNN_MAX_CPU_ISA


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this x86 CPU computes in bf16 natively (AVX-512 BF16 or AMX), as oneDNN may use it: without,
    bf16 is emulated in float32 arithmetic plus conversions, slower than float32. A CPU whose flags cannot be
    read (not Linux, not x86) counts as native: nothing is claimed about it. ONEDNN_MAX_CPU_ISA below
    AVX512_CORE_BF16 counts as without."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _BELOW_BF16_ISAS:
        return False
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return True
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), None)
    if flags is None:
        return True
    return any(f in flags for f in _BF16_FLAGS)


def default_batch_size(pixels: int, device="cpu", threads: int | None = None) -> int:
    """Images per network call when a command is not told (`--batch-size`): enough pixels per call that the
    kernels, not the per-call overhead, set the pace. On the CPU 8,192 pixels per thread, rounded to a power of
    two, between 64 and 1024: the digits network (8x8) sampled 1.38x faster at 256 than at 64 on 2 threads and
    levelled off past that, Fashion-MNIST's (28x28) ran alike from 16 to 256 (benchmarks/RESULTS.md), so 2
    threads give 256 for 8x8 and 64 from 28x28 up. On a GPU 2^18 pixels, between 64 and 256."""
    import math

    import torch

    if torch.device(device).type == "cpu":
        want, top = 8192 * (threads or torch.get_num_threads()), 1024
    else:
        want, top = 1 << 18, 256
    return int(min(top, max(64, 2 ** round(math.log2(max(want / max(pixels, 1), 1))))))


def cache_dir(name: str = "kernels") -> Path:
    """`$DDPM_CACHE_DIR/<name>`, else `~/.cache/ddpm/<name>` (XDG_CACHE_HOME honoured): what ddpm keeps per machine
    (`ddpm.nn.fused`'s kernel builds, `ddpm.nn.winograd`'s measurements, the feature classifiers' weights)."""
    if os.environ.get("DDPM_CACHE_DIR"):
        return Path(os.environ["DDPM_CACHE_DIR"]) / name
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ddpm" / name
