"""bf16 against float32 for a training step of the small presets' networks, interleaved in one process (issue 23).

    .venv/bin/python benchmarks/bf16_step.py [THREADS]
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 .venv/bin/python benchmarks/bf16_step.py [THREADS]  # as AVX2

Prints, per network, the median time of a training step (forward, backward, Adam) in float32 and under bf16
autocast, over 8 interleaved pairs after 2 warm-up steps each.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from ddpm import GaussianDiffusion, UNet, beta_schedule

NETWORKS = {  # the presets' networks and a batch each
    "digits": (dict(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(4,), dropout=0.0,
                    resolution=8), 64),
    "fashion": (dict(in_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(7,), dropout=0.0,
                     resolution=28), 32),
}


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(beta_schedule("linear", 1000))
    for name, (kwargs, batch) in NETWORKS.items():
        net = UNet(**kwargs)
        opt = torch.optim.Adam(net.parameters(), 1e-4)
        x0 = torch.rand(batch, 1, kwargs["resolution"], kwargs["resolution"]) * 2 - 1

        def step(bf16: bool, net=net, opt=opt, x0=x0) -> float:
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = diffusion.training_losses(net, x0).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            return time.perf_counter() - t0

        for bf16 in (False, True):
            step(bf16)
            step(bf16)
        times = {False: [], True: []}
        for _ in range(8):
            for bf16 in (False, True):
                times[bf16].append(step(bf16))
        f, h = statistics.median(times[False]), statistics.median(times[True])
        print(f"{name}: fp32 {f * 1e3:.1f} ms, bf16 {h * 1e3:.1f} ms, bf16 time / fp32 {h / f:.2f}x")


if __name__ == "__main__":
    main()
