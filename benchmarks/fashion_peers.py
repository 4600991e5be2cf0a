"""The peers on Fashion-MNIST, timed as `ddpm train --preset fashion` is: trained for a wall-time budget on this
machine's cores, their EMA weights kept at each snapshot time (default 10, 20 and 30 minutes of training), then
1,000 samples per snapshot with DDIM at eta 1 on 50 steps, scored by the project's fashion evaluation
(`ddpm.metrics.fashion`, as benchmarks/fashion.py scores ours).

    .venv/bin/python benchmarks/fashion_peers.py --peer diffusers|lucidrains [--minutes 10 20 30] [--n 1000]
        [--out benchmarks/out/fashion_peers] [--data /usr/share/datasets/fashion-mnist]

- diffusers: `UNet2DModel` in the configuration closest to the fashion preset's network (32, 64, 64 channels,
  28 -> 14 -> 7, two residual blocks a level, one attention layer at 7x7 and in the middle, one head, 32
  groups) with `DDPMScheduler` (T = 1000, linear betas, epsilon), in the loop of diffusers' train_unconditional
  example at its defaults (AdamW lr 1e-4, betas 0.95 / 0.999, weight decay 1e-6; cosine schedule with 500
  warm-up steps over 100 epochs; gradient clip 1; EMAModel with warm-up, inv_gamma 1, power 3/4, at most
  0.9999; no flips), at the preset's batch of 64. Sampled by ddpm's DDIM on the same schedule.
- lucidrains: denoising-diffusion-pytorch's `Unet(dim=32, dim_mults=(1, 2, 2), channels=1)` + `GaussianDiffusion`
  (its defaults: v-prediction, sigmoid schedule, T = 1000) + its own `Trainer` on a folder of the training
  images as PNGs (written once to --out), at the Trainer's defaults (batch 16, Adam lr 1e-4, betas 0.9 / 0.99,
  EMA 0.995 every 10 steps, clip 1, horizontal flips) except: no FID during training (it would download
  Inception weights) and no sample grids (every 1000 steps it would draw 25 samples at 1000 steps). Sampled by
  its own DDIM with `sampling_timesteps=50`, `ddim_sampling_eta=1`.

Prints one markdown row per scored snapshot and writes result.json in --out/PEER; the EMA weights of every
snapshot are kept in --out/PEER/snapshots.pt.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion import cpu  # noqa: E402

BATCH = 64  # the fashion preset's


class Budget:
    """Calls `keep(label)` as each snapshot time of training passes; raises Done after the last."""

    class Done(Exception):
        pass

    def __init__(self, minutes: list[float], keep):
        self.marks = sorted(minutes)
        self.keep = keep
        self.t0 = None
        self.steps = 0
        self.log = []

    def start(self):
        self.t0 = time.perf_counter()

    def tick(self):
        self.steps += 1
        elapsed = time.perf_counter() - self.t0
        while self.marks and elapsed >= 60 * self.marks[0]:
            m = self.marks.pop(0)
            self.keep(m)
            self.log.append({"minutes": m, "steps": self.steps, "seconds": elapsed})
            print(f"snapshot at {m} min: step {self.steps}", flush=True)
        if not self.marks:
            raise Budget.Done


def train_diffusers(args, out: Path) -> tuple[dict, list]:
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from ddpm.data import load_idx

    torch.manual_seed(0)
    net = UNet2DModel(sample_size=28, in_channels=1, out_channels=1, layers_per_block=2,
                      block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), attention_head_dim=None,
                      norm_num_groups=32)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    x, _ = load_idx(args.data, "train")
    data = x.float() / 127.5 - 1
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    per_epoch = len(data) // BATCH
    lr = get_scheduler("cosine", optimizer=opt, num_warmup_steps=500, num_training_steps=per_epoch * 100)
    ema = EMAModel(net.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75,
                   model_cls=UNet2DModel, model_config=net.config)
    snaps = {}

    def keep(m):
        shadow = copy.deepcopy(net)
        ema.copy_to(shadow.parameters())
        snaps[m] = shadow.state_dict()

    budget = Budget(args.minutes, keep)
    g = torch.Generator().manual_seed(0)
    budget.start()
    net.train()
    try:
        while True:
            order = torch.randperm(len(data), generator=g)
            for i in range(per_epoch):
                x0 = data[order[i * BATCH:(i + 1) * BATCH]]
                noise = torch.randn(x0.shape, generator=g)
                t = torch.randint(0, 1000, (BATCH,), generator=g)
                loss = torch.nn.functional.mse_loss(net(sched.add_noise(x0, noise, t), t).sample, noise)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                opt.step()
                lr.step()
                opt.zero_grad()
                ema.step(net.parameters())
                budget.tick()
    except Budget.Done:
        pass

    from ddpm import GaussianDiffusion, beta_schedule
    from ddpm.sampling import run_sampler

    diffusion = GaussianDiffusion(beta_schedule("linear", 1000))

    def sampler(state, n, seed):
        net.load_state_dict(state)
        net.eval()
        out = []
        for k, b in enumerate(range(0, n, args.batch_size)):
            m = min(args.batch_size, n - b)
            gen = torch.Generator().manual_seed(seed * 1000 + k)
            x_T = torch.randn(m, 1, 28, 28, generator=gen)
            with torch.inference_mode():
                x = run_sampler("ddim", diffusion, lambda x, t: net(x, t).sample, x_T, steps=50, eta=1.0,
                                generator=gen)
            out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
        return torch.cat(out)

    return snaps, budget.log, sampler


def write_pngs(data_dir: str, folder: Path) -> None:
    from PIL import Image

    from ddpm.data import load_idx

    if folder.exists() and len(list(folder.glob("*.png"))) == 60000:
        return
    folder.mkdir(parents=True, exist_ok=True)
    x, _ = load_idx(data_dir, "train")
    for i, img in enumerate(x[:, 0].numpy()):
        Image.fromarray(img).save(folder / f"{i:05d}.png")


def train_lucidrains(args, out: Path):
    from denoising_diffusion_pytorch import GaussianDiffusion, Trainer, Unet

    pngs = out.parent / "fashion_train_png"
    write_pngs(args.data, pngs)
    torch.manual_seed(0)
    unet = Unet(dim=32, dim_mults=(1, 2, 2), channels=1)
    diffusion = GaussianDiffusion(unet, image_size=28, timesteps=1000)
    trainer = Trainer(diffusion, str(pngs), train_num_steps=10**9, save_and_sample_every=10**9,
                      calculate_fid=False, results_folder=str(out / "results"))
    snaps = {}

    def keep(m):
        snaps[m] = copy.deepcopy(trainer.ema.ema_model.state_dict())

    budget = Budget(args.minutes, keep)
    update = trainer.ema.update

    def update_and_tick():
        update()
        budget.tick()

    trainer.ema.update = update_and_tick
    budget.start()
    try:
        trainer.train()
    except Budget.Done:
        pass
    model = trainer.ema.ema_model

    def sampler(state, n, seed):
        model.load_state_dict(state)
        model.eval()
        model.sampling_timesteps, model.is_ddim_sampling, model.ddim_sampling_eta = 50, True, 1.0
        out = []
        for k, b in enumerate(range(0, n, args.batch_size)):
            torch.manual_seed(seed * 1000 + k)
            with torch.inference_mode():
                x = model.sample(batch_size=min(args.batch_size, n - b))  # in [0, 1]
            out.append((x.clamp(0, 1) * 255).round().to(torch.uint8))
        return torch.cat(out)

    return snaps, budget.log, sampler


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--peer", required=True, choices=["diffusers", "lucidrains"])
    p.add_argument("--minutes", type=float, nargs="+", default=[10, 20, 30], help="snapshot times of training")
    p.add_argument("--score", type=float, nargs="+",
                   help="score only the snapshots at these minutes (default: all); every one is saved to "
                        "--out/PEER/snapshots.pt")
    p.add_argument("--n", type=int, default=1000, help="samples per snapshot")
    p.add_argument("--batch-size", type=int, default=250, help="samples per network call")
    p.add_argument("--out", default="benchmarks/out/fashion_peers")
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    args = p.parse_args()
    out = Path(args.out) / args.peer
    out.mkdir(parents=True, exist_ok=True)
    snaps, log, sampler = (train_diffusers if args.peer == "diffusers" else train_lucidrains)(args, out)
    torch.save({"log": log, "snapshots": snaps}, out / "snapshots.pt")
    from ddpm.metrics.fashion import evaluate_fashion

    rows = []
    for entry in log:
        if args.score and entry["minutes"] not in args.score:
            continue
        t0 = time.perf_counter()
        images = sampler(snaps[entry["minutes"]], args.n, seed=1)
        sample_s = time.perf_counter() - t0
        np.savez_compressed(out / f"samples_{entry['minutes']:g}min.npz", arr_0=images.permute(0, 2, 3, 1).numpy())
        rep = evaluate_fashion(images, args.data)
        import dataclasses

        rows.append({**entry, "sample_seconds": sample_s, **dataclasses.asdict(rep)})
        print(json.dumps(rows[-1]), flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu(), "peer": args.peer, "threads": torch.get_num_threads(),
              "n": args.n, "rows": rows}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| date | CPU | peer | minutes | steps | Frechet | floor | ratio | precision | recall | confident |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {result['date']} | {result['cpu']} | {args.peer} | {r['minutes']:g} | {r['steps']} | "
              f"{r['frechet']:.2f} | {r['floor']:.2f} | {r['ratio']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | "
              f"{r['confident_fraction']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
