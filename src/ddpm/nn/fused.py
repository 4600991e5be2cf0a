"""Group norm -> swish -> dropout as one CPU kernel on channels-last tensors (forward and backward).

The same function as `dropout(silu(group_norm(x + shift)))` (shift: an optional value per sample and channel,
the residual block's time embedding), computed in one pass over memory instead of four, with
every loop running across the whole channel row. It exists because torch's channels-last group norm vectorises
over the channels of a single group (4 or 8 in the paper's network): its bfloat16 backward ran 3-4x slower than
the contiguous one on the machine measured, and with swish and dropout (a 32-bit Bernoulli draw per element,
then a pass to scale) this part took 30% of a bf16 training step. Fused: bf16 training 1.4x, float32 1.3x
(benchmarks/RESULTS.md).

The kernel is C (`_fused_cpu.c`), compiled on first use with the machine's C compiler for the machine's own
instruction set (`-O3 -march=native -fopenmp`, 512-bit vectors on x86-64; 2-11 seconds, once; `-march=haswell` when
`ATEN_CPU_CAPABILITY=avx2` holds torch's own kernels to AVX2), cached under
`$DDPM_CACHE_DIR/kernels` or `~/.cache/ddpm/kernels`, and loaded through ctypes. Its OpenMP threads are
torch's own (torch ships libgomp.so.1, and the library resolves to the copy already loaded). With no compiler,
or `DDPM_FUSED_CPU=0`, or anything but a float32/bfloat16 channels-last tensor on the CPU, `group_norm_act`
runs torch's own operators instead: the same function, torch's speed. `status()` says which and why. Its
results do not depend on the number of threads (the sums run in a fixed order within a work item). The same
library holds the fused Winograd convolution's kernels (`_winograd_cpu.c`, used by ddpm.nn.winograd).

Dropout: element (n, c, h, w) is dropped when 32 random bits, a hash of (its flat index in the channels-last
layout, ((n H + h) W + w) C + c, and a 64-bit seed), fall below p * 2^32; the survivors are multiplied by
1 / (1 - p) rounded to float32. The seed is drawn from torch's default generator, so `torch.manual_seed`
reproduces the masks. The kernel's backward pass hashes again instead of storing a mask. Where the kernel does
not run, `dropout_mask` computes the same hash with torch's integer operators, on any device and for any
memory layout, and the seed is drawn the same way: the masks are bitwise the kernel's and the generator advances
alike, so a seeded run trains the same network whether or not the kernel could be built (to the last bits of
group norm's rounding). They are not the masks `F.dropout` draws, and they cost about as much: a training step
of the CIFAR-10 network at batch 8 with fused_norm=False took 1.01x F.dropout's time on two threads, 1.03x on
one. Inside a torch.compile graph the kernel steps aside and so does the hash: F.dropout runs there, and the
compiler fuses it into its generated code with its own random numbers (Inductor replaces eager's generator with
its own, so a compiled run's masks would not match eager ones even if the hash were traced, and drawing the seed
as eager does would break the graph at every layer).
"""

from __future__ import annotations

import ctypes
import functools
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

from ddpm.runtime import cache_dir

_SOURCE = Path(__file__).with_name("_fused_cpu.c")
# built into the same library: the fused Winograd convolution's kernels (ddpm.nn.winograd)
_SOURCES = (_SOURCE, Path(__file__).with_name("_winograd_cpu.c"))
_X86 = platform.machine().lower() in ("x86_64", "amd64")
# ATEN_CPU_CAPABILITY (torch's own switch) holding torch's kernels below the machine's instruction set holds
# this one there too, so that an AVX-512 machine can stand in for an AVX2 one (benchmarks/RESULTS.md)
_HELD = {"avx2": "-march=haswell", "default": "-march=x86-64"}


def _flags() -> list[str]:
    held = _HELD.get(os.environ.get("ATEN_CPU_CAPABILITY", "").lower()) if _X86 else None
    arch = [held] if held else ["-march=native"]
    if _X86 and not held:
        # gcc's default for AVX-512 machines is 256-bit vectors; the full width measured 1.1-1.4x faster here
        arch.append("-mprefer-vector-width=512")
    # -fno-trapping-math: without AVX-512's masks gcc vectorises none of the loops with a compare or a
    # conversion unless it may ignore floating-point exception flags (which nothing here reads; the results are
    # the same): an AVX2 build ran 5-25x slower than torch's operators without it (benchmarks/RESULTS.md).
    # -ffp-contract=fast: ISO C (-std=c11) turns off gcc's fused multiply-adds, and the build had none; with them
    # the kernel ran 1.1-1.8x faster forward on an AVX2-only EPYC (benchmarks/gn_builds.py, RESULTS.md)
    return ["-O3", *arch, "-fno-trapping-math", "-ffp-contract=fast", "-fopenmp", "-fPIC", "-shared", "-std=c11"]


_FLAGS = _flags()
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
# the kernel's path (the same bits on each): 0 its own choice by the shape, 1 work items of whole samples (or blocks
# of their groups), 2 blocks of rows; for tests and benchmarks
_path = 0
_ERRORS = {-1: "arguments refused", -2: "out of memory for its buffers"}

_lock = threading.Lock()
_state: dict[str, object] = {}


@functools.cache
def cpu_key() -> str:
    """What -march=native depends on: the machine's architecture and CPU flags (read once per process: the
    Winograd choice asks for it on every wide convolution)."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return platform.machine() + flags


def c_compiler() -> list[str]:
    """The C compiler's command: $CC (split as a shell would), else gcc or cc on PATH; [] when there is none."""
    found = shutil.which("gcc") or shutil.which("cc")
    return shlex.split(os.environ.get("CC", "")) or ([found] if found else [])


def _compile(compiler: list[str]) -> Path:
    sources = [p.read_bytes() for p in _SOURCES]
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join([*sources, " ".join(_FLAGS).encode(), version.encode(),
                                     cpu_key().encode()])).hexdigest()[:16]
    for folder in (cache_dir(), Path(tempfile.gettempdir()) / f"ddpm-kernels-{os.getuid()}"):
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
            done = subprocess.run([*compiler, *_FLAGS, *map(str, _SOURCES), "-o", tmp, "-lm"], capture_output=True,
                                  text=True, timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(compiler)} failed on {', '.join(map(str, _SOURCES))}:\n"
                                   f"{done.stderr[-2000:]}")
            os.replace(tmp, target)  # atomic: a process compiling beside this one finds a whole file or none
            return target
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"no writable folder for the compiled kernel ({cache_dir()})")


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Give the loaded library's entry points their C signatures (`_fused_cpu.c`, `_winograd_cpu.c`); returns
    lib."""
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    lib.ddpm_gn_act_forward.argtypes = [ctypes.c_int, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, f32,
                                        ctypes.c_int, ctypes.c_uint32, f32, ctypes.c_uint64, ctypes.c_int, ctypes.c_int]
    lib.ddpm_gn_act_backward.argtypes = [ctypes.c_int, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64,
                                         i64, i64, ctypes.c_int, ctypes.c_uint32, f32, ctypes.c_uint64, ctypes.c_int,
                                         ctypes.c_int]
    lib.ddpm_gn_act_forward.restype = lib.ddpm_gn_act_backward.restype = ctypes.c_int
    if hasattr(lib, "ddpm_winograd_forward"):  # absent from builds of _fused_cpu.c alone (benchmarks/gn_builds.py)
        lib.ddpm_winograd_forward.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, ctypes.c_int]
        lib.ddpm_winograd_weight_grad.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, ctypes.c_int]
        lib.ddpm_winograd_vector_width.argtypes = []
        for entry in (lib.ddpm_winograd_forward, lib.ddpm_winograd_weight_grad, lib.ddpm_winograd_vector_width):
            entry.restype = ctypes.c_int
    return lib


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
            compiler = c_compiler()
            if not compiler:
                why = "no C compiler (gcc or $CC) on PATH"
            else:
                try:
                    lib = ctypes.CDLL(str(_compile(compiler)))
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    why = f"could not build the kernel: {e}"
        if lib is not None:
            declare(lib)
            why = f"compiled kernel loaded ({' '.join(f for f in _FLAGS if f.startswith('-m'))})"
        elif not why.startswith("turned off"):
            warnings.warn(f"ddpm: the fused CPU group-norm kernel is off ({why}); torch's operators run instead "
                          "(the same function, slower on the CPU). DDPM_FUSED_CPU=0 silences this.",
                          RuntimeWarning, stacklevel=3)
        _state["why"] = why
        _state["lib"] = lib  # last: its presence says the state is whole
        return lib


def library() -> ctypes.CDLL | None:
    """The compiled library (built on first use), or None where it is off or could not be built (`status`)."""
    return _load()


def status() -> tuple[bool, str]:
    """(whether the compiled kernel is in use on this machine, why or why not). Builds it if need be."""
    lib = _load()
    return lib is not None, str(_state["why"])


def _dropout_threshold(p: float) -> tuple[int, float]:
    """(32-bit threshold below which an element is dropped, the survivors' scale 1 / (1 - p) rounded to float32,
    as the kernel receives it)."""
    return min(round(p * 2.0**32), 2**32 - 1), ctypes.c_float(1.0 / (1.0 - p)).value


def _dropout_seed() -> int:
    """The 64-bit seed of one dropout mask, drawn from torch's default CPU generator (one draw: the kernel and
    `dropout_mask`'s callers advance the generator alike, whatever the device of the tensor)."""
    return int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)) % 2**64


# splitmix64's constants (the kernel's drop_bits), as the int64 values with the same 64 bits
_GOLDEN, _MIX1, _MIX2 = (u - 2**64 for u in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


# dropout_mask's elements per chunk. On the CPU, chunks that stay in cache (hashing a large tensor in one piece
# measured slower: benchmarks/RESULTS.md); elsewhere (a GPU) large ones, for few launches, bounded for the
# temporaries' memory (64 MB).
_CHUNK_CPU, _CHUNK_OTHER = 2**18, 2**22


def _int64(u: int) -> int:
    """The int64 with the bits of the 64-bit unsigned integer u (mod 2^64)."""
    u %= 2**64
    return u - 2**64 if u >= 2**63 else u


def dropout_mask(shape: tuple[int, int, int, int], p: float, seed: int,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """The kernel's dropout mask for an [N, C, H, W] tensor: True where the element is dropped.

    The kernel's drop_bits with torch's int64 operators: z = seed + i * golden, two xor-shift-multiply rounds,
    and the element is dropped when the top 32 bits of z ^ (z >> 31) fall below the threshold round(p * 2^32);
    i is the element's flat index in the channels-last layout. int64 multiplication wraps as uint64's does; the
    arithmetic right shifts are masked to logical ones, and the last unsigned comparison is a signed one with
    both sides' top bits flipped. Returns a bool [N, C, H, W] view with channels-last strides, on `device`."""
    N, C, H, W = shape
    threshold = _dropout_threshold(p)[0]
    numel = N * C * H * W
    drop = torch.empty(numel, dtype=torch.bool, device=device)
    chunk = min(numel, _CHUNK_CPU if torch.device(device).type == "cpu" else _CHUNK_OTHER)
    step = torch.arange(chunk, dtype=torch.int64, device=device).mul_(_GOLDEN)  # i * golden, i from the start
    z, t = torch.empty_like(step), torch.empty_like(step)
    below = _int64((threshold << 32) ^ 2**63)  # bits < threshold <=> (z ^ 2^63) < (threshold << 32) ^ 2^63, signed
    for start in range(0, numel, chunk):
        n = min(chunk, numel - start)
        zc, tc = z[:n], t[:n]
        torch.add(step[:n], _int64(seed + start * _GOLDEN), out=zc)
        for shift, mult in ((30, _MIX1), (27, _MIX2), (31, None)):
            torch.bitwise_right_shift(zc, shift, out=tc)
            zc.bitwise_xor_(tc.bitwise_and_(2 ** (64 - shift) - 1))
            if mult is not None:
                zc.mul_(mult)
        torch.lt(zc.bitwise_xor_(-(2**63)), below, out=drop[start:start + n])
    return drop.view(N, H, W, C).permute(0, 3, 1, 2)


def _hashed_dropout(h: torch.Tensor, p: float, inplace: bool) -> torch.Tensor:
    """dropout(h, p) with the kernel's mask and scale (see dropout_mask), through autograd: the backward pass
    zeroes the gradient where the forward dropped and scales the rest by the same float32 scale. Keeps h's
    memory format. h [N, C, H, W]."""
    if h.dim() != 4:
        raise ValueError(f"dropout's mask is defined for [N, C, H, W] tensors; got shape {tuple(h.shape)}")
    threshold, scale = _dropout_threshold(p)
    if not threshold:
        return h  # p below 2^-33: the kernel drops nothing, scales nothing and draws no seed
    mask = dropout_mask(tuple(h.shape), p, _dropout_seed(), h.device)
    # scale times the value in float32 for float32 and bf16 (torch's opmath, the kernel's arithmetic); the
    # dropped elements +0.0, as the kernel writes them
    return (h.mul_(scale) if inplace else h * scale).masked_fill_(mask, 0.0)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _f32(t: torch.Tensor) -> torch.Tensor:
    """t detached as contiguous float32 (t itself where it already is; asked first, which skips the two calls:
    21 against 24 us a kernel call at 1 x 64 x 7 x 7, interleaved, on an Intel Xeon with AMX)."""
    t = t.detach()
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.to(torch.float32).contiguous()


def _kernel_forward(x, weight, bias, shift, groups, eps, silu, p):
    """The kernel's forward: y, and (w32, b32, s32, mean, rstd), (threshold, scale, seed) for its backward."""
    N, C, H, W = x.shape
    w32, b32 = _f32(weight), _f32(bias)
    # the shift as x's dtype would hold it (group_norm_act's definition), handed to the kernel in float32
    s32 = None if shift is None else _f32(shift.detach().to(x.dtype))
    threshold, scale = _dropout_threshold(p) if p > 0 else (0, 1.0)
    seed = _dropout_seed() if threshold else 0
    y = torch.empty_like(x, memory_format=torch.channels_last)
    stats = torch.empty(2, N, groups, dtype=torch.float32)
    mean, rstd = stats[0], stats[1]
    rc = _state["lib"].ddpm_gn_act_forward(_DTYPES[x.dtype], x.data_ptr(), y.data_ptr(), w32.data_ptr(),
                                           b32.data_ptr(), _ptr(s32), mean.data_ptr(), rstd.data_ptr(), N, H * W, C,
                                           groups, eps, int(silu), threshold, scale, seed, torch.get_num_threads(),
                                           _path)
    if rc != 0:
        raise RuntimeError(f"fused group norm forward: {_ERRORS.get(rc, rc)} for x {tuple(x.shape)} {x.dtype}")
    return y, (w32, b32, s32, mean, rstd), (threshold, scale, seed)


class _GroupNormAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, shift, groups, eps, silu, p):
        y, saved, (threshold, scale, seed) = _kernel_forward(x, weight, bias, shift, groups, eps, silu, p)
        ctx.save_for_backward(x, *saved)
        ctx.args = (groups, silu, threshold, scale, seed, weight.dtype, bias.dtype,
                    None if shift is None else shift.dtype)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        lib = _state["lib"]
        x, w32, b32, s32, mean, rstd = ctx.saved_tensors
        groups, silu, threshold, scale, seed, wdtype, bdtype, sdtype = ctx.args
        N, C, H, W = x.shape
        dy = dy.to(x.dtype).contiguous(memory_format=torch.channels_last)
        dx = torch.empty_like(x, memory_format=torch.channels_last)
        sums = torch.empty(N, 2, C, dtype=torch.float32)
        dshift = torch.empty(N, C, dtype=torch.float32) if s32 is not None and ctx.needs_input_grad[3] else None
        rc = lib.ddpm_gn_act_backward(_DTYPES[x.dtype], dy.data_ptr(), x.data_ptr(), w32.data_ptr(),
                                      b32.data_ptr(), _ptr(s32), mean.data_ptr(), rstd.data_ptr(), dx.data_ptr(),
                                      sums.data_ptr(), _ptr(dshift), N, H * W, C, groups, int(silu), threshold,
                                      scale, seed, torch.get_num_threads(), _path)
        if rc != 0:
            raise RuntimeError(f"fused group norm backward: {_ERRORS.get(rc, rc)} for x {tuple(x.shape)} {x.dtype}")
        d = C // groups
        s_dz, s_dzx = sums[:, 0], sums[:, 1]
        dweight = ((s_dzx - mean.repeat_interleave(d, 1) * s_dz) * rstd.repeat_interleave(d, 1)).sum(0)
        dbias = s_dz.sum(0)
        if dshift is not None:
            dshift = dshift.to(sdtype)
        return dx, dweight.to(wdtype), dbias.to(bdtype), dshift, None, None, None, None


def fused_applies(x: torch.Tensor, norm: nn.GroupNorm) -> bool:
    """Whether `group_norm_act` takes the compiled kernel for this input (else torch's operators)."""
    return (x.device.type == "cpu" and x.dtype in _DTYPES and x.dim() == 4 and norm.affine
            and x.is_contiguous(memory_format=torch.channels_last)
            and not torch.compiler.is_compiling() and _load() is not None)


def group_norm_act(x: torch.Tensor, norm: nn.GroupNorm, silu: bool = True, dropout: float = 0.0,
                   fused: bool = True, shift: torch.Tensor | None = None) -> torch.Tensor:
    """dropout(silu(norm(x + shift)), p=dropout) (silu=False: no swish), x [N, C, H, W], shift None or [N, C]
    (one value per sample and channel, cast to x's dtype and added as torch's add would: the residual block's
    time embedding). `dropout` is the probability applied (pass 0 in eval mode). With fused=True and a
    channels-last float32/bfloat16 CPU tensor, one compiled kernel, in which the shift costs no pass over memory
    of its own; otherwise torch's operators, and dropout with the kernel's masks (`dropout_mask`; F.dropout
    inside a torch.compile graph). The output keeps x's memory format."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1); got {dropout}")
    if shift is not None and (x.dim() != 4 or shift.shape != x.shape[:2]):
        raise ValueError(f"shift must be [N, C] = {list(x.shape[:2])} for x {list(x.shape)}; got {list(shift.shape)}")
    if fused and fused_applies(x, norm):
        args = (x, norm.weight, norm.bias, shift, norm.num_groups, float(norm.eps), silu, float(dropout))
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:4]):
            return _GroupNormAct.apply(*args)
        return _kernel_forward(*args)[0]  # no graph to record: the autograd Function's own cost saved (a few us)
    inplace = not torch.is_grad_enabled()
    h = norm(x if shift is None else x + shift.to(x.dtype)[:, :, None, None])
    if silu:
        h = F.silu(h, inplace=inplace)
    if dropout == 0:
        return h
    if torch.compiler.is_compiling():
        return F.dropout(h, dropout, training=True, inplace=inplace)
    return _hashed_dropout(h, dropout, inplace)
