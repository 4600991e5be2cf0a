"""The fused Winograd kernel (`ddpm.nn.winograd.conv3x3_fused`, `_winograd_cpu.c`) against oneDNN's direct
convolution, per layer and in whole networks, interleaved in one process, 2 threads.

Layers: every distinct 3x3 stride-1 convolution of a network (found by running it once), channels-last float32,
inference (the fused kernel with its filter tiles kept, as `Conv3x3` keeps them) and training (forward + backward:
`_FusedForward`, the fused kernel for the forward and the input gradient, oneDNN's weight gradient), each
direct/fused pair called in turn; medians. Networks (--networks): the forward (inference mode) and the training step
(forward, loss, backward, Adam) in three settings called in turn: "fused" (the package as it is: every layer where
this machine measured it faster), "before" (the fused kernel turned off: the torch Winograd path where it pays,
else direct, as before session 18) and "direct" (winograd=False); medians and the range of paired ratios.

    .venv/bin/python benchmarks/winograd_fused.py [--network fashion|digits|cifar10] [--batch 64] [--rounds 21]
    .venv/bin/python benchmarks/winograd_fused.py --networks [--network ...] [--batch 64] [--rounds 9]

Hold the machine to AVX2 with `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`
(the kernel then builds for -march=haswell).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ddpm import UNet
from ddpm.nn import winograd
from ddpm.nn.winograd import Conv3x3
from ddpm.runtime import keep_freed_memory

sys.path.insert(0, str(Path(__file__).parent))
from fashion import cpu  # noqa: E402

NETWORKS = {  # UNet(in_channels, ch, ch_mult, num_res_blocks, attn_resolutions, dropout, resolution)
    "fashion": (1, 32, (1, 2, 2), 2, (7,), 0.0, 28),
    "digits": (1, 32, (1, 2), 2, (4,), 0.0, 8),
    "cifar10": (3, 128, (1, 2, 2, 2), 2, (16,), 0.1, 32),
}


def build(name: str) -> UNet:
    torch.manual_seed(0)
    net = UNet(*NETWORKS[name])
    with torch.no_grad():  # non-zero output layers, so that every layer's work shows in the output
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return net


def conv_shapes(net: UNet, batch: int) -> collections.Counter:
    """{(C_in, C_out, H, W): calls per forward} of the network's Conv3x3 layers."""
    shapes: collections.Counter = collections.Counter()
    hooks = [m.register_forward_hook(lambda m, a, o: shapes.update([(m.in_channels, m.out_channels,
                                                                     *a[0].shape[2:])]))
             for m in net.modules() if isinstance(m, Conv3x3)]
    res, ch = net.config.resolution, net.config.in_channels
    with torch.no_grad():
        net(torch.randn(batch, ch, res, res), torch.full((batch,), 500))
    for h in hooks:
        h.remove()
    return shapes


def in_turn(fns: dict, rounds: int) -> dict[str, list[float]]:
    times = {k: [] for k in fns}
    names = list(fns)
    for fn in fns.values():
        fn()
    for i in range(rounds):
        for k in names if i % 2 else names[::-1]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def time_layer(x, w, b, gy, rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """Medians in ms, {"direct", "fused"}, for inference and for training (forward + backward)."""
    u = winograd.fused_filter_tiles(w)
    with torch.no_grad():
        inf = in_turn({"direct": lambda: F.conv2d(x, w, b, padding=1),
                       "fused": lambda: winograd.conv3x3_fused(x, w, b, filter_tiles=u)}, rounds)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    train = in_turn({"direct": lambda: torch.autograd.grad(F.conv2d(*leaves, padding=1), leaves, gy),
                     "fused": lambda: torch.autograd.grad(winograd._FusedForward.apply(*leaves), leaves, gy)}, rounds)
    return tuple({k: statistics.median(v) * 1e3 for k, v in d.items()} for d in (inf, train))


def layers(name: str, batch: int, rounds: int) -> None:
    shapes = conv_shapes(build(name), batch)
    print(f"| layer (batch {batch}) | calls | inference direct ms | fused | **x** | training direct ms | fused | **x** |")
    print("|---|---|---|---|---|---|---|---|")
    total = collections.Counter()
    for (C, K, H, W), n in sorted(shapes.items()):
        x = torch.randn(batch, C, H, W).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(K, C, 3, 3) / (3 * C**0.5), torch.randn(K)
        gy = torch.randn(batch, K, H, W).contiguous(memory_format=torch.channels_last)
        if not winograd._fused_takes(x, w):
            print(f"| {C} -> {K}, {H}x{W} | {n} | (the fused kernel cannot take it) | | | | | |")
            continue
        mi, mt = time_layer(x, w, b, gy, rounds)
        for key, v in (("inference direct", mi["direct"]), ("inference fused", mi["fused"]),
                       ("training direct", mt["direct"]), ("training fused", mt["fused"])):
            total[key] += n * v
        print(f"| {C} -> {K}, {H}x{W} | {n} | {mi['direct']:.3f} | {mi['fused']:.3f} | **{mi['direct'] / mi['fused']:.2f}** "
              f"| {mt['direct']:.3f} | {mt['fused']:.3f} | **{mt['direct'] / mt['fused']:.2f}** |")
    print(f"| all, per forward / step | | {total['inference direct']:.1f} | {total['inference fused']:.1f} | "
          f"**{total['inference direct'] / max(total['inference fused'], 1e-9):.2f}** | {total['training direct']:.1f} | "
          f"{total['training fused']:.1f} | **{total['training direct'] / max(total['training fused'], 1e-9):.2f}** |")


def networks(name: str, batch: int, rounds: int) -> None:
    net = build(name)
    res, ch = net.config.resolution, net.config.in_channels
    x, t = torch.randn(batch, ch, res, res), torch.randint(0, 1000, (batch,))
    eps = torch.randn_like(x)
    real = (Conv3x3.uses_fused, Conv3x3.trains_fused, Conv3x3._fused_trains_faster)
    off = (lambda self, x: False,) * 3

    def setting(mode: str) -> None:
        net.set_winograd(mode != "direct")
        Conv3x3.uses_fused, Conv3x3.trains_fused, Conv3x3._fused_trains_faster = real if mode == "fused" else off

    def forward(mode: str):
        def run():
            setting(mode)
            with torch.inference_mode():
                net.eval()(x, t)
        return run

    opt = torch.optim.Adam(net.parameters(), lr=1e-4)

    def step(mode: str):
        def run():
            setting(mode)
            loss = (net.train()(x, t) - eps).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return run

    try:
        for what, make in (("forward", forward), ("training step", step)):
            times = in_turn({m: make(m) for m in ("fused", "before", "direct")}, rounds)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            paired = sorted(b / a for a, b in zip(times["fused"], times["before"], strict=True))
            print(f"| {name}, batch {batch}, {what} | {med['fused']:.1f} | {med['before']:.1f} | {med['direct']:.1f} | "
                  f"**{med['before'] / med['fused']:.2f}** ({paired[0]:.2f}-{paired[-1]:.2f}) | "
                  f"{med['direct'] / med['fused']:.2f} |")
    finally:
        Conv3x3.uses_fused, Conv3x3.trains_fused, Conv3x3._fused_trains_faster = real


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--network", choices=sorted(NETWORKS), default="fashion")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=None, help="calls of each (21 per layer, 9 per network)")
    p.add_argument("--networks", action="store_true", help="whole networks instead of layers")
    args = p.parse_args()
    torch.set_num_threads(2)
    keep_freed_memory()
    print(f"{time.strftime('%Y-%m-%d')}, {cpu()}, 2 threads, torch {torch.__version__}; "
          f"fused kernel: {'on' if winograd.fused_library() else 'off'}\n")
    if args.networks:
        print("| network | fused ms | before ms | direct ms | **fused x before** (paired) | fused x direct |")
        print("|---|---|---|---|---|---|")
        networks(args.network, args.batch, args.rounds or 9)
    else:
        layers(args.network, args.batch, args.rounds or 21)
    return 0


if __name__ == "__main__":
    sys.exit(main())
