"""The fused group-norm + swish kernel (`ddpm.nn.fused`) built several ways, timed interleaved in one process.

Each BUILD is NAME=SOURCE[:EXTRA_FLAGS]: the C source (default: the package's own `_fused_cpu.c`) compiled with the
flags `ddpm.nn.fused` uses plus EXTRA_FLAGS (e.g. `-ffp-contract=off` for the build before session 14), loaded
through ctypes and swapped in as the kernel in turn. A SOURCE must have the entry points' current signatures
(`ddpm.nn.fused.declare`: the sources before session 16 take no shift). The allocator runs as in the ddpm commands
(`ddpm.runtime.keep_freed_memory`): otherwise every call's output can be fresh memory whose page faults weigh on
the forward's time (2.5 against 0.63 ms in session 5's measurement, RESULTS). Forward and backward of
`group_norm_act` at the fashion and digits networks' shapes, 2 threads, medians of the rounds; the outputs' largest
difference from the first build beside each row (rounding only, for builds of the same function).

    .venv/bin/python benchmarks/gn_builds.py old=:-ffp-contract=off new=: [--rounds 9]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ddpm.nn import fused
from ddpm.runtime import keep_freed_memory

sys.path.insert(0, str(Path(__file__).parent))
from fashion import cpu  # noqa: E402

SHAPES = [(64, 32, 28, 28), (64, 64, 14, 14), (64, 128, 7, 7), (64, 96, 28, 28), (64, 32, 8, 8), (64, 64, 4, 4)]


def build(source: str, extra: list[str], out: Path) -> ctypes.CDLL:
    subprocess.run([*fused.c_compiler(), *fused._FLAGS, *extra, source, "-o", str(out), "-lm"], check=True)
    return fused.declare(ctypes.CDLL(str(out)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("builds", nargs="+", help="NAME=SOURCE[:EXTRA_FLAGS]; an empty SOURCE is the package's")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--calls", type=int, default=5, help="calls timed per round")
    args = p.parse_args()
    torch.set_num_threads(2)
    keep_freed_memory()
    if not fused.status()[0]:
        raise SystemExit(f"the kernel is off here: {fused.status()[1]}")
    tmp = Path(tempfile.mkdtemp())
    libs = {}
    for spec in args.builds:
        name, _, rest = spec.partition("=")
        source, _, extra = rest.partition(":")
        libs[name] = build(source or str(fused._SOURCE), extra.split(), tmp / f"{name}.so")
    times = {(n, s): ([], []) for n in libs for s in SHAPES}
    outputs = {}
    for r in range(args.rounds):
        for shape in SHAPES:
            norm = torch.nn.GroupNorm(32, shape[1])
            x = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_()
            for name, lib in libs.items():
                fused._state["lib"] = lib
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    y = fused.group_norm_act(x, norm)
                t1 = time.perf_counter()
                for _ in range(args.calls):
                    x.grad = None
                    y.backward(torch.ones_like(y), retain_graph=True)
                t2 = time.perf_counter()
                times[name, shape][0].append((t1 - t0) / args.calls * 1e3)
                times[name, shape][1].append((t2 - t1) / args.calls * 1e3)
                if r == 0:
                    outputs[name, shape] = (y.detach().clone(), x.grad.clone())
    first = next(iter(libs))
    print(f"\n{time.strftime('%Y-%m-%d')}, {cpu()}, base flags {' '.join(fused._FLAGS)}, 2 threads, medians of "
          f"{args.rounds} interleaved rounds")
    print("\n| shape | build | forward ms | backward ms | max diff from " + first + " |\n|---|---|---|---|---|")
    for shape in SHAPES:
        y0, g0 = outputs[first, shape]
        for name in libs:
            y, g = outputs[name, shape]
            diff = max((y - y0).abs().max().item(), (g - g0).abs().max().item())
            fwd, bwd = (statistics.median(v) for v in times[name, shape])
            print(f"| {shape} | {name} | {fwd:.3f} | {bwd:.3f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
