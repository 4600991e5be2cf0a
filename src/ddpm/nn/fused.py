"""Group norm -> swish -> dropout as one CPU kernel on channels-last tensors (forward and backward).

The same function as `dropout(silu(group_norm(x)))` (dropout's mask aside: see below), computed in one pass
over memory instead of three, with every loop running across the whole channel row. It exists because torch's
channels-last group norm vectorises over the channels of a single group (4 or 8 in the paper's network): its
bfloat16 backward ran 3-4x slower than the contiguous one on the machine measured, and with swish and dropout
(a 32-bit Bernoulli draw per element, then a pass to scale) this part took 30% of a bf16 training step. Fused:
bf16 training 1.4x, float32 1.3x (benchmarks/RESULTS.md).

The kernel is C (`_fused_cpu.c`), compiled on first use with the machine's C compiler for the machine's own
instruction set (`-O3 -march=native -fopenmp`, 512-bit vectors on x86-64; about a second), cached under
`$DDPM_CACHE_DIR/kernels` or `~/.cache/ddpm/kernels`, and loaded through ctypes. Its OpenMP threads are
torch's own (torch ships libgomp.so.1, and the library resolves to the copy already loaded). With no compiler,
or `DDPM_FUSED_CPU=0`, or anything but a float32/bfloat16 channels-last tensor on the CPU, `group_norm_act`
runs torch's own operators instead: the same function, torch's speed. `status()` says which and why. Its
results do not depend on the number of threads (the sums run in a fixed order within a work item).

Dropout: element i (its flat index in the channels-last tensor) is dropped when 32 random bits, a hash of
(i, seed), fall below p * 2^32; the seed is drawn from torch's default generator, so `torch.manual_seed`
reproduces the masks, but they are not the masks torch's own dropout draws. The backward pass hashes again
instead of storing a mask.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

_SOURCE = Path(__file__).with_name("_fused_cpu.c")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11"]
if platform.machine().lower() in ("x86_64", "amd64"):
    # gcc's default for AVX-512 machines is 256-bit vectors; the full width measured 1.1-1.4x faster here
    _FLAGS.append("-mprefer-vector-width=512")
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_ERRORS = {-1: "arguments refused", -2: "out of memory for its buffers"}

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cache_dir() -> Path:
    if os.environ.get("DDPM_CACHE_DIR"):
        return Path(os.environ["DDPM_CACHE_DIR"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ddpm" / "kernels"


def _cpu_key() -> str:
    """What -march=native depends on: the machine's architecture and CPU flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return platform.machine() + flags


def _compile(compiler: list[str]) -> Path:
    source = _SOURCE.read_bytes()
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join([source, " ".join(_FLAGS).encode(), version.encode(),
                                     _cpu_key().encode()])).hexdigest()[:16]
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / f"ddpm-kernels-{os.getuid()}"):
        target = folder / f"fused_cpu-{key}.so"
        if target.exists():
            return target
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
            os.close(fd)
        except OSError:
            continue  # not writable: the next folder
        try:
            done = subprocess.run([*compiler, *_FLAGS, str(_SOURCE), "-o", tmp, "-lm"], capture_output=True,
                                  text=True, timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(compiler)} failed on {_SOURCE}:\n{done.stderr[-2000:]}")
            os.replace(tmp, target)  # atomic: a process compiling beside this one finds a whole file or none
            return target
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"no writable folder for the compiled kernel ({_cache_dir()})")


def _load() -> ctypes.CDLL | None:
    """The compiled library, or None (the reason in _state["why"]). Built once per process; warns once."""
    if "lib" in _state:
        return _state["lib"]  # type: ignore[return-value]
    with _lock:
        if "lib" in _state:
            return _state["lib"]  # type: ignore[return-value]
        lib, why = None, ""
        if os.environ.get("DDPM_FUSED_CPU", "1") == "0":
            why = "turned off by DDPM_FUSED_CPU=0"
        else:
            found = shutil.which("gcc") or shutil.which("cc")
            compiler = shlex.split(os.environ.get("CC", "")) or ([found] if found else [])
            if not compiler:
                why = "no C compiler (gcc or $CC) on PATH"
            else:
                try:
                    lib = ctypes.CDLL(str(_compile(compiler)))
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    why = f"could not build the kernel: {e}"
        if lib is not None:
            i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
            lib.ddpm_gn_act_forward.argtypes = [ctypes.c_int, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64,
                                                f32, ctypes.c_int, ctypes.c_uint32, f32, ctypes.c_uint64,
                                                ctypes.c_int]
            lib.ddpm_gn_act_backward.argtypes = [ctypes.c_int, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64,
                                                 i64, i64, ctypes.c_int, ctypes.c_uint32, f32, ctypes.c_uint64,
                                                 ctypes.c_int]
            lib.ddpm_gn_act_forward.restype = lib.ddpm_gn_act_backward.restype = ctypes.c_int
            why = "compiled kernel loaded"
        elif not why.startswith("turned off"):
            warnings.warn(f"ddpm: the fused CPU group-norm kernel is off ({why}); torch's operators run instead "
                          "(the same function, slower on the CPU). DDPM_FUSED_CPU=0 silences this.",
                          RuntimeWarning, stacklevel=3)
        _state["why"] = why
        _state["lib"] = lib  # last: its presence says the state is whole
        return lib


def status() -> tuple[bool, str]:
    """(whether the compiled kernel is in use on this machine, why or why not). Builds it if need be."""
    lib = _load()
    return lib is not None, str(_state["why"])


def _dropout_threshold(p: float) -> tuple[int, float]:
    """(32-bit threshold below which an element is dropped, the survivors' scale 1 / (1 - p))."""
    return min(round(p * 2.0**32), 2**32 - 1), 1.0 / (1.0 - p)


class _GroupNormAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps, silu, p):
        lib = _state["lib"]
        N, C, H, W = x.shape
        w32 = weight.detach().to(torch.float32).contiguous()
        b32 = bias.detach().to(torch.float32).contiguous()
        threshold, scale = _dropout_threshold(p) if p > 0 else (0, 1.0)
        seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)) % 2**64 if threshold else 0
        y = torch.empty_like(x, memory_format=torch.channels_last)
        mean = torch.empty(N, groups, dtype=torch.float32)
        rstd = torch.empty(N, groups, dtype=torch.float32)
        rc = lib.ddpm_gn_act_forward(_DTYPES[x.dtype], x.data_ptr(), y.data_ptr(), w32.data_ptr(), b32.data_ptr(),
                                     mean.data_ptr(), rstd.data_ptr(), N, H * W, C, groups, eps, int(silu),
                                     threshold, scale, seed, torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"fused group norm forward: {_ERRORS.get(rc, rc)} for x {tuple(x.shape)} {x.dtype}")
        ctx.save_for_backward(x, w32, b32, mean, rstd)
        ctx.args = (groups, silu, threshold, scale, seed, weight.dtype, bias.dtype)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        lib = _state["lib"]
        x, w32, b32, mean, rstd = ctx.saved_tensors
        groups, silu, threshold, scale, seed, wdtype, bdtype = ctx.args
        N, C, H, W = x.shape
        dy = dy.to(x.dtype).contiguous(memory_format=torch.channels_last)
        dx = torch.empty_like(x, memory_format=torch.channels_last)
        sums = torch.empty(N, 2, C, dtype=torch.float32)
        rc = lib.ddpm_gn_act_backward(_DTYPES[x.dtype], dy.data_ptr(), x.data_ptr(), w32.data_ptr(),
                                      b32.data_ptr(), mean.data_ptr(), rstd.data_ptr(), dx.data_ptr(),
                                      sums.data_ptr(), N, H * W, C, groups, int(silu), threshold, scale, seed,
                                      torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"fused group norm backward: {_ERRORS.get(rc, rc)} for x {tuple(x.shape)} {x.dtype}")
        d = C // groups
        s_dz, s_dzx = sums[:, 0], sums[:, 1]
        dweight = ((s_dzx - mean.repeat_interleave(d, 1) * s_dz) * rstd.repeat_interleave(d, 1)).sum(0)
        dbias = s_dz.sum(0)
        return dx, dweight.to(wdtype), dbias.to(bdtype), None, None, None, None


def fused_applies(x: torch.Tensor, norm: nn.GroupNorm) -> bool:
    """Whether `group_norm_act` takes the compiled kernel for this input (else torch's operators)."""
    return (x.device.type == "cpu" and x.dtype in _DTYPES and x.dim() == 4 and norm.affine
            and x.is_contiguous(memory_format=torch.channels_last)
            and not torch.compiler.is_compiling() and _load() is not None)


def group_norm_act(x: torch.Tensor, norm: nn.GroupNorm, silu: bool = True, dropout: float = 0.0,
                   fused: bool = True) -> torch.Tensor:
    """dropout(silu(norm(x)), p=dropout) (silu=False: no swish), x [N, C, H, W]. `dropout` is the probability
    applied (pass 0 in eval mode). With fused=True and a channels-last float32/bfloat16 CPU tensor, one compiled
    kernel; otherwise torch's operators. The output keeps x's memory format."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1); got {dropout}")
    if fused and fused_applies(x, norm):
        return _GroupNormAct.apply(x, norm.weight, norm.bias, norm.num_groups, float(norm.eps), silu,
                                   float(dropout))
    inplace = not torch.is_grad_enabled()
    h = norm(x)
    if silu:
        h = F.silu(h, inplace=inplace)
    return F.dropout(h, dropout, training=True, inplace=inplace) if dropout > 0 else h
