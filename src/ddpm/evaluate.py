"""The paper's evaluations and figures on a trained run, each writing its numbers to JSON beside its pictures:
test-set bits/dim (Table 2) with the per-step terms, rate-distortion (Figure 5), progressive generation
(Figure 6), samples sharing a latent (Figure 7) and latent interpolation (Figure 8).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from ddpm.data import build_dataset, to_model_range
from ddpm.images import save_gif, save_grid
from ddpm.likelihood import BpdResult, rate_distortion
from ddpm.run import Run, sample_generator
from ddpm.sampling import ancestral, timestep_grid


def _plot(path: Path, xs, ys_list, labels, xlabel: str, ylabel: str, title: str, logy: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for ys, label in zip(ys_list, labels, strict=True):
        ax.plot(xs, ys, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    if any(labels):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def _eval_images(run: Run, split: str, n: int | None, data_path: str | None) -> torch.Tensor:
    """uint8 [N, C, H, W] of the run's data set split (the first n in its fixed order)."""
    cfg = run.config
    ds = build_dataset(cfg.data.dataset, data_path or cfg.data.path, cfg.model.resolution, split, cfg.model.in_channels)
    count = len(ds) if n is None else min(n, len(ds))
    images = getattr(ds, "images", None)
    if images is not None:
        return images[:count]
    return torch.stack([ds[i][0] for i in range(count)])


def bpd_of_images(run: Run, images_u8: torch.Tensor, batch_size: int = 64, seed: int = 0,
                  device: str | torch.device = "cpu", progress: bool = True) -> BpdResult:
    """The variational bound of every image (bits/dim), batched; sample i's noise is seeded by (seed, i)."""
    device = torch.device(device)
    results = []
    batches = range(0, images_u8.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="bits/dim batches")
    for s in batches:
        x0 = to_model_range(images_u8[s : s + batch_size]).to(device)
        gens = sample_generator(seed, "bpd", range(s, s + x0.shape[0]), device)
        results.append(run.diffusion.bpd(run.conditioned(batch=x0.shape[0]), x0, generator=gens))
    return BpdResult(*(torch.cat([getattr(r, f) for r in results]).cpu() for f in ("total", "prior", "terms", "x0_mse")))


def eval_bpd(run: Run, out_dir: str | Path, split: str = "test", n: int | None = None, batch_size: int = 64,
             seed: int = 0, device="cpu", data_path: str | None = None, progress: bool = True) -> dict:
    """Test-set NLL bound in bits/dim: bpd.json, terms.csv (mean L_t per t) and terms.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = _eval_images(run, split, n, data_path)
    res = bpd_of_images(run, images, batch_size, seed, device, progress)
    N = res.total.shape[0]
    terms = res.terms.mean(0)
    with open(out / "terms.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t", "L_t_bits_per_dim"])
        for t, v in enumerate(terms.tolist()):
            w.writerow([t, f"{v:.8g}"])
    _plot(out / "terms.png", list(range(len(terms))), [terms.clamp(min=1e-12).tolist()], [""], "t", "L_t (bits/dim)",
          f"bound terms, {split} split", logy=True)
    report = {
        "run": str(run.path), "step": run.step, "split": split, "n": N, "seed": seed,
        "bpd": float(res.total.mean()), "bpd_stderr": float(res.total.std() / N**0.5) if N > 1 else None,
        "prior_bpd": float(res.prior.mean()), "decoder_bpd": float(res.terms[:, 0].mean()),
        "kl_bpd": float(res.terms[:, 1:].sum(1).mean()),
        "var_type": run.config.diffusion.var_type, "num_timesteps": run.diffusion.num_timesteps,
    }
    _write_json(out / "bpd.json", report)
    return report


def eval_rate_distortion(run: Run, out_dir: str | Path, split: str = "test", n: int | None = None,
                         batch_size: int = 64, seed: int = 0, device="cpu", data_path: str | None = None,
                         progress: bool = True) -> dict:
    """Progressive lossy compression (Figure 5): rate_distortion.csv, three PNGs, rate_distortion.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = _eval_images(run, split, n, data_path)
    rd = rate_distortion(bpd_of_images(run, images, batch_size, seed, device, progress))
    with open(out / "rate_distortion.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t", "rate_bits_per_dim", "distortion_rmse_0_255"])
        for t, r, d in zip(rd.t.tolist(), rd.rate.tolist(), rd.distortion.tolist(), strict=True):
            w.writerow([t, f"{r:.8g}", f"{d:.8g}"])
    T = list(range(len(rd.t)))
    _plot(out / "rate_vs_t.png", T, [rd.rate.tolist()], [""], "t", "rate (bits/dim)", "rate")
    _plot(out / "distortion_vs_t.png", T, [rd.distortion.tolist()], [""], "t", "distortion (RMSE, 0..255)", "distortion")
    _plot(out / "distortion_vs_rate.png", rd.rate.tolist(), [rd.distortion.tolist()], [""], "rate (bits/dim)",
          "distortion (RMSE, 0..255)", "rate-distortion")
    report = {"run": str(run.path), "step": run.step, "split": split, "n": int(images.shape[0]),
              "final_rate_bpd": float(rd.rate[0]), "final_distortion_rmse": float(rd.distortion[0]),
              "rate_at_T": float(rd.rate[-1]), "distortion_at_T": float(rd.distortion[-1])}
    _write_json(out / "rate_distortion.json", report)
    return report


def progressive(run: Run, out_dir: str | Path, n: int = 8, seed: int = 0, frames: int = 10, device="cpu") -> dict:
    """Figure 6: the predicted x_0 at `frames` evenly spaced steps of one reverse run, as a strip
    (rows: samples, columns: t from T-1 down to 0) and an animated GIF."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    T = run.diffusion.num_timesteps
    keep = sorted({round(i * (T - 1) / (frames - 1)) for i in range(frames)}, reverse=True)
    shots: dict[int, torch.Tensor] = {}

    def grab(t: int, x_t: torch.Tensor, pred_x0: torch.Tensor) -> None:
        if t in keep:
            shots[t] = pred_x0.detach().cpu()

    m = run.config.model
    gens = sample_generator(seed, "sample", range(n), device)
    x_T = gens.randn((n, m.in_channels, m.resolution, m.resolution), device)
    ancestral(run.diffusion, run.conditioned(batch=n), x_T, timestep_grid(run.diffusion), generator=gens,
              callback=grab)
    cols = [shots[t] for t in keep]
    strip = torch.stack(cols, 1).reshape(-1, *cols[0].shape[1:])  # [n * frames, C, H, W], row-major
    save_grid(strip, out / "progressive.png", nrow=len(keep))
    save_gif(cols, out / "progressive.gif")  # the last frame (t = 0) is the sample itself, up to rounding
    info = {"run": str(run.path), "step": run.step, "timesteps": keep, "n": n, "seed": seed}
    _write_json(out / "progressive.json", info)
    return info


def share_from(run: Run, out_dir: str | Path, ts: list[int], k: int = 4, seed: int = 0, device="cpu") -> dict:
    """Figure 7: one reverse run is stopped at each t in ts; from each stored x_t, k samples continue with
    fresh noise. Row j of the grid holds the k samples that share x_{ts[j]}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    T = run.diffusion.num_timesteps
    bad = [t for t in ts if not 0 <= t < T]
    if bad:
        raise ValueError(f"--share-from times must lie in 0..{T - 1}; got {bad}")
    stored: dict[int, torch.Tensor] = {}

    def grab(t: int, x_t: torch.Tensor, pred_x0: torch.Tensor) -> None:
        if t in ts:
            stored[t] = x_t.detach().clone()

    m = run.config.model
    g = sample_generator(seed, "share", [0], device)
    x_T = g.randn((1, m.in_channels, m.resolution, m.resolution), device)
    model = run.conditioned(batch=k)
    ancestral(run.diffusion, model, x_T, timestep_grid(run.diffusion), generator=g, callback=grab)
    rows = []
    for t in sorted(ts, reverse=True):
        gens = sample_generator(seed, f"share/{t}", range(k), device)
        x_t = stored[t].expand(k, -1, -1, -1).clone()
        rows.append(ancestral(run.diffusion, model, x_t, timestep_grid(run.diffusion, t_start=t), generator=gens).cpu())
    save_grid(torch.cat(rows), out / "share_from.png", nrow=k)
    info = {"run": str(run.path), "step": run.step, "timesteps": sorted(ts, reverse=True), "k": k, "seed": seed}
    _write_json(out / "share_from.json", info)
    return info


def interpolate(run: Run, out_dir: str | Path, a_u8: torch.Tensor, b_u8: torch.Tensor, t: int = 500,
                steps: int = 8, seed: int = 0, device="cpu") -> dict:
    """Figure 8: encode images a, b ([C, H, W] uint8) to x_t with q(x_t | x_0) (the same noise for both),
    decode (1 - lam) x_t^a + lam x_t^b for lam = 0 .. 1 with the reverse process from t, the reverse noise
    fixed across lam. The first and last columns are the reconstructions of a and b."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    T = run.diffusion.num_timesteps
    if not 0 <= t < T:
        raise ValueError(f"--t must lie in 0..{T - 1}; got {t}")
    x0 = to_model_range(torch.stack([a_u8, b_u8])).to(device)
    tt = torch.full((2,), t, device=device, dtype=torch.long)
    enc = sample_generator(seed, "encode", [0], device)
    noise = enc.randn((1, *x0.shape[1:]), device).expand(2, -1, -1, -1)
    x_t = run.diffusion.q_sample(x0, tt, noise)
    lams = torch.linspace(0, 1, steps, device=device)
    latents = (1 - lams)[:, None, None, None] * x_t[0] + lams[:, None, None, None] * x_t[1]
    gens = sample_generator(seed, "decode", [0] * steps, device)  # the same reverse noise at every lambda
    decoded = ancestral(run.diffusion, run.conditioned(batch=steps), latents, timestep_grid(run.diffusion, t_start=t),
                        generator=gens).cpu()
    save_grid(torch.cat([x0.cpu()[:1], decoded, x0.cpu()[1:]]), out / "interpolation.png", nrow=steps + 2)
    rec_err = [float((decoded[0] - x0[0].cpu()).pow(2).mean().sqrt() * 127.5),
               float((decoded[-1] - x0[1].cpu()).pow(2).mean().sqrt() * 127.5)]
    info = {"run": str(run.path), "step": run.step, "t": t, "steps": steps, "seed": seed, "lambdas": lams.tolist(),
            "reconstruction_rmse_0_255": rec_err}
    _write_json(out / "interpolation.json", info)
    return info
