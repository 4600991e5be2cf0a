"""The fused Winograd kernel (`ddpm.nn.winograd.conv3x3_fused`, `_winograd_cpu.c`) against oneDNN's direct
convolution, per layer and in whole networks, interleaved in one process, 2 threads.

Layers: every distinct 3x3 stride-1 convolution of a network (found by running it once), channels-last float32,
inference (the fused kernel with its filter tiles kept, as `Conv3x3` keeps them) and training (forward + backward:
`_FusedForward`, the fused kernels for the forward, the input gradient and the weight gradient), each
direct/fused pair called in turn; medians. Networks (--networks): the forward (inference mode) and the training step
(forward, loss, backward, Adam) in three settings called in turn: "fused" (the package as it is: every layer where
this machine measured it faster), "before" (the fused kernel turned off: the torch Winograd path where it pays,
else direct, as before session 18) and "direct" (winograd=False); medians and the range of paired ratios. With
--blocks a fourth, "half-L2 blocks": the package with session 18's blocks of tiles (as many as filled half the L2
cache, not evened out over the threads) in place of `tiles_per_block`'s.

    .venv/bin/python benchmarks/winograd_fused.py [--network fashion|digits|cifar10] [--batch 64] [--rounds 21]
        [--blocks]
    .venv/bin/python benchmarks/winograd_fused.py --networks [--network ...] [--batch 64] [--rounds 9] [--blocks]

Hold the machine to AVX2 with `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`
(the kernel then builds for -march=haswell).
"""

from __future__ import annotations

import argparse
import collections
import functools
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


def half_l2_blocks(C: int, K: int, tiles: int, threads: int) -> int:
    """Session 18's block of tiles: its transforms (36 (C + K) floats a tile) in half the L2 cache, a multiple of
    6, at most an even share of the tiles per thread."""
    fit = max(6, winograd._l2_bytes() // 2 // (36 * 4 * (C + K)) // 6 * 6)
    share = -(-max(tiles, 1) // max(threads, 1))
    return max(6, min(fit, -(-share // 6) * 6))


def block_rules(name: str, batch: int, rounds: int) -> None:
    """Per layer, the two compiled kernels alone (the forward with its filter tiles given, the weight gradient's
    sums in Winograd's domain) with session 18's half-L2 blocks and with `tiles_per_block`'s, called in turn; medians."""
    lib, threads = winograd.fused_library(), torch.get_num_threads()
    print(f"| layer (batch {batch}) | tiles | forward blocks, half-L2 / now | ms | ms | **x** "
          f"| weight gradient blocks | ms | ms | **x** |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    total = collections.Counter()
    for (C, K, H, W), n in sorted(conv_shapes(build(name), batch).items()):
        x = torch.randn(batch, C, H, W).contiguous(memory_format=torch.channels_last)
        gy = torch.randn(batch, K, H, W).contiguous(memory_format=torch.channels_last)
        w = torch.randn(K, C, 3, 3)
        if not winograd._fused_takes(x, w):
            continue
        u, y = winograd.fused_filter_tiles(w), torch.empty_like(gy)
        padded = -(-C // 6) * 6
        gu, parts = torch.empty(36, C, K), torch.empty(threads, 36, padded, K)
        tiles = winograd._tiles(x.shape)
        fb = {"half": half_l2_blocks(C, K, tiles, threads), "now": winograd.tiles_per_block(C, K, tiles, threads)}
        gb = {"half": half_l2_blocks(padded, K, tiles, threads),
              "now": winograd.tiles_per_block(padded, K, tiles, threads)}

        shape = (batch, H, W, C, K)
        forward = functools.partial(lib.ddpm_winograd_forward, x.data_ptr(), u.data_ptr(), None, y.data_ptr(), *shape)
        grad = functools.partial(lib.ddpm_winograd_weight_grad, x.data_ptr(), gy.data_ptr(), gu.data_ptr(),
                                 parts.data_ptr(), *shape)
        med = {k: statistics.median(v) * 1e3 for k, v in in_turn(
            {"f half": functools.partial(forward, fb["half"], threads), "f now": functools.partial(forward, fb["now"], threads),
             "g half": functools.partial(grad, gb["half"], threads), "g now": functools.partial(grad, gb["now"], threads)},
            rounds).items()}
        for k, v in med.items():
            total[k] += n * v
        print(f"| {C} -> {K}, {H}x{W} | {tiles} | {fb['half']} / {fb['now']} | {med['f half']:.3f} | "
              f"{med['f now']:.3f} | **{med['f half'] / med['f now']:.2f}** | {gb['half']} / {gb['now']} | "
              f"{med['g half']:.3f} | {med['g now']:.3f} | **{med['g half'] / med['g now']:.2f}** |")
    print(f"| all, per forward | | | {total['f half']:.2f} | {total['f now']:.2f} | "
          f"**{total['f half'] / total['f now']:.2f}** | | {total['g half']:.2f} | {total['g now']:.2f} | "
          f"**{total['g half'] / total['g now']:.2f}** |")


def networks(name: str, batch: int, rounds: int, blocks: bool = False) -> None:
    net = build(name)
    res, ch = net.config.resolution, net.config.in_channels
    x, t = torch.randn(batch, ch, res, res), torch.randint(0, 1000, (batch,))
    eps = torch.randn_like(x)
    # (off, _fused_training_pays also turns off _fused_trains_faster, which asks it)
    real = (Conv3x3.uses_fused, Conv3x3._fused_training_pays)
    off = (lambda self, x: False,) * 2

    rule, run_kernel = winograd.tiles_per_block, winograd._fused_run
    calls = collections.Counter()

    def counted(*args):
        calls[mode_now[0]] += 1
        return run_kernel(*args)

    mode_now = ["fused"]
    winograd._fused_run = counted

    def setting(mode: str) -> None:
        net.set_winograd(mode != "direct")
        fused = mode in ("fused", "half-L2 blocks")
        Conv3x3.uses_fused, Conv3x3._fused_training_pays = real if fused else off
        winograd.tiles_per_block = half_l2_blocks if mode == "half-L2 blocks" else rule
        mode_now[0] = mode

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

    modes = ("fused", "before", "direct", "half-L2 blocks") if blocks else ("fused", "before", "direct")
    try:
        for what, make in (("forward", forward), ("training step", step)):
            times = in_turn({m: make(m) for m in modes}, rounds)
            if calls["before"] or calls["direct"]:  # the settings without the fused kernels must not reach them
                raise SystemExit(f"the fused kernel ran where turned off: {dict(calls)}")
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            paired = sorted(b / a for a, b in zip(times["fused"], times["before"], strict=True))
            line = (f"| {name}, batch {batch}, {what} | {med['fused']:.1f} | {med['before']:.1f} | {med['direct']:.1f} | "
                    f"**{med['before'] / med['fused']:.2f}** ({paired[0]:.2f}-{paired[-1]:.2f}) | "
                    f"{med['direct'] / med['fused']:.2f} |")
            if blocks:
                paired = sorted(b / a for a, b in zip(times["fused"], times["half-L2 blocks"], strict=True))
                line += (f" {med['half-L2 blocks']:.1f} | **{med['half-L2 blocks'] / med['fused']:.2f}** "
                         f"({paired[0]:.2f}-{paired[-1]:.2f}) |")
            print(line, flush=True)
    finally:
        Conv3x3.uses_fused, Conv3x3._fused_training_pays = real
        winograd.tiles_per_block, winograd._fused_run = rule, run_kernel


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--network", choices=sorted(NETWORKS), default="fashion")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=None, help="calls of each (21 per layer, 9 per network)")
    p.add_argument("--networks", action="store_true", help="whole networks instead of layers")
    p.add_argument("--blocks", action="store_true",
                   help="session 18's half-L2 blocks against tiles_per_block's (per layer: the two kernels alone)")
    args = p.parse_args()
    torch.set_num_threads(2)
    keep_freed_memory()
    print(f"{time.strftime('%Y-%m-%d')}, {cpu()}, 2 threads, torch {torch.__version__}; "
          f"fused kernel: {'on' if winograd.fused_library() else 'off'}\n")
    if args.networks:
        extra = (" half-L2 blocks ms | **fused x half-L2** (paired) |", "---|---|") if args.blocks else ("", "")
        print("| network | fused ms | before ms | direct ms | **fused x before** (paired) | fused x direct |" + extra[0])
        print("|---|---|---|---|---|---|" + extra[1])
        networks(args.network, args.batch, args.rounds or 9, args.blocks)
    elif args.blocks:
        block_rules(args.network, args.batch, args.rounds or 21)
    else:
        layers(args.network, args.batch, args.rounds or 21)
    return 0


if __name__ == "__main__":
    sys.exit(main())
