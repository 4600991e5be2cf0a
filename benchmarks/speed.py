"""Training-step and sampling speed of our U-Net against the peers on the same machine, interleaved, in one
process; FLOPs per image from torch's flop counter and the achieved rate against a measured 3x3-conv peak.

    .venv/bin/python benchmarks/speed.py [--network cifar10|fashion|digits] [--train-batch 16] [--train-steps 3]
        [--sample-batch 64] [--reps 3] [--bf16] [--keep-freed-memory] [--compile] [--only ours,diffusers,ddp]

--network: the paper's 35.7M CIFAR-10 network (default), or the fashion / digits presets' (src/ddpm/config.py).
Peers: diffusers' UNet2DModel in the same configuration (for cifar10 google/ddpm-cifar10-32's; one attention
head) with DDPMScheduler, and denoising-diffusion-pytorch's Unet at its closest configuration (each skipped with
a note when not installed: `pip install -e .[bench]`). The header names the CPU (lscpu's model and the vector
flags the kernels use). With --compile, ours and diffusers' also run through
torch.compile (ours through `ddpm.nn.compiled.compile_network`, which samples with CUDA graphs on a GPU;
diffusers' the same way: torch.compile for training, mode "reduce-overhead" for sampling on CUDA). On CUDA the
achieved rate against the measured conv peak is the MFU, with a channels_last row each (weights and input in
that layout; on the CPU our network chooses its layouts itself) and a cudnn.benchmark row each (cuDNN times its
algorithms per shape during the warm-up and keeps the fastest; off for every other row). Prints a markdown table
for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ddpm import GaussianDiffusion, UNet, beta_schedule
from ddpm.nn.compiled import compile_network
from ddpm.nn.fused import status as fused_status
from ddpm.nn.winograd import Conv3x3
from ddpm.runtime import keep_freed_memory
from ddpm.train import build_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion import cpu  # noqa: E402

# name -> (image shape, ours: UNet(in_channels, ch, ch_mult, num_res_blocks, attn_resolutions, dropout, resolution),
#          diffusers' UNet2DModel keywords, denoising-diffusion-pytorch's Unet keywords)
NETWORKS = {
    "cifar10": ((3, 32, 32), (3, 128, (1, 2, 2, 2), 2, (16,), 0.1, 32),
                dict(block_out_channels=(128, 256, 256, 256),
                     down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), dropout=0.1),
                dict(dim=128, dim_mults=(1, 2, 2, 2), dropout=0.1, full_attn=(False, True, False, False))),
    "fashion": ((1, 28, 28), (1, 32, (1, 2, 2), 2, (7,), 0.0, 28),
                dict(block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                     up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), dropout=0.0),
                dict(dim=32, dim_mults=(1, 2, 2), dropout=0.0, full_attn=(False, False, True))),
    "digits": ((1, 8, 8), (1, 32, (1, 2), 2, (4,), 0.0, 8),
               dict(block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                    up_block_types=("AttnUpBlock2D", "UpBlock2D"), dropout=0.0),
               dict(dim=32, dim_mults=(1, 2), dropout=0.0, full_attn=(False, True))),
}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def conv_peak(dtype, device, reps=5) -> float:
    """GFLOP/s of a large 3x3 convolution (the bulk of the U-Net's work): 16 x 256 x 32 x 32 and 64 x 256 x 16 x 16
    inputs, each in the contiguous and the channels-last layout, on CUDA also with cudnn.benchmark; the best is
    the machine's peak."""
    best = 0.0
    layouts = (torch.contiguous_format, torch.channels_last)
    benchmarks = (False, True) if device == "cuda" else (False,)
    for (b, hw), layout, benchmark in itertools.product(((16, 32), (64, 16)), layouts, benchmarks):
        torch.backends.cudnn.benchmark = benchmark
        x = torch.randn(b, 256, hw, hw, device=device, dtype=dtype).contiguous(memory_format=layout)
        w = torch.randn(256, 256, 3, 3, device=device, dtype=dtype).contiguous(memory_format=layout)
        for _ in range(2):
            F.conv2d(x, w, padding=1)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            F.conv2d(x, w, padding=1)
        sync(device)
        dt = (time.perf_counter() - t0) / reps
        best = max(best, 2 * b * 256 * 256 * 9 * hw * hw / dt / 1e9)
    torch.backends.cudnn.benchmark = False
    return best


def flops_per_image(model_fn, model, x, t) -> tuple[float, float]:
    """(forward, forward+backward) FLOPs per image: the network's own count, i.e. direct 3x3 convolutions (our
    Winograd path is switched off while counting: it does fewer multiplications for the same function, and
    the achieved rate is stated against the work the network defines, as for the peers)."""
    flags = {m: m.winograd for m in model.modules() if isinstance(m, Conv3x3)}
    for m in flags:
        m.winograd = False
    with FlopCounterMode(display=False) as fc:
        model_fn(x, t)
    fwd = fc.get_total_flops() / x.shape[0]
    with FlopCounterMode(display=False) as fc:
        model_fn(x, t).float().pow(2).mean().backward()
    for m, flag in flags.items():
        m.winograd = flag
    return fwd, fc.get_total_flops() / x.shape[0]


def unwrap(f):
    """diffusers' model returns an output object: its tensor."""
    return lambda x, t: f(x, t).sample


def channels_last(fn):
    return lambda x, t: fn(x.contiguous(memory_format=torch.channels_last), t)


BENCHMARKED = ", cudnn.benchmark"  # the rows measured with torch.backends.cudnn.benchmark on (CUDA only)


def make_models(device, compile_too: bool, only: set[str], network: str = "cifar10"):
    """name -> (module, training callable, sampling callable), each callable (x, t) -> eps."""
    models = {}
    torch.manual_seed(0)
    (c, r, _), args, diffusers_kw, ddp_kw = NETWORKS[network]

    def ours(**kw):
        return UNet(*args, **kw).to(device)

    if "ours" in only:
        m = ours()
        models["ddpm (ours)"] = (m, m, m)
        if device == "cpu":  # our CPU kernels, each switched off in turn (on CUDA neither applies)
            for flag in ("winograd", "fused_norm"):
                m = ours(**{flag: False})
                models[f"ddpm (ours), {flag}=False"] = (m, m, m)
        if device == "cuda":  # our network keeps the caller's layout on CUDA: a channels-last copy measures that
            m = ours().to(memory_format=torch.channels_last)
            models["ddpm (ours), channels_last"] = (m, channels_last(m), channels_last(m))
            m = ours()
            models["ddpm (ours)" + BENCHMARKED] = (m, m, m)
        if compile_too:
            m = ours()
            models["ddpm (ours), torch.compile"] = (m, compile_network(m), compile_network(m, sampling=True))
    if "diffusers" in only:
        try:
            from diffusers import UNet2DModel
        except ImportError:
            print("diffusers not installed: skipped")
        else:
            net = UNet2DModel(sample_size=r, in_channels=c, out_channels=c, layers_per_block=2,
                              attention_head_dim=None, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False,
                              freq_shift=1, **diffusers_kw)
            m = net.to(device)
            models["diffusers UNet2DModel"] = (m, unwrap(m), unwrap(m))
            if device == "cuda":
                c = copy.deepcopy(m).to(memory_format=torch.channels_last)
                models["diffusers UNet2DModel, channels_last"] = (c, channels_last(unwrap(c)),
                                                                  channels_last(unwrap(c)))
                c = copy.deepcopy(m)
                models["diffusers UNet2DModel" + BENCHMARKED] = (c, unwrap(c), unwrap(c))
            if compile_too:
                c = copy.deepcopy(m)
                sampled = torch.compile(c, mode="reduce-overhead") if device == "cuda" else torch.compile(c)
                models["diffusers UNet2DModel, torch.compile"] = (c, unwrap(torch.compile(c)), unwrap(sampled))
    if "ddp" in only:
        try:
            from denoising_diffusion_pytorch import Unet

            m = Unet(channels=c, attn_heads=1, **ddp_kw).to(device)
            models["denoising-diffusion-pytorch Unet"] = (m, m, m)
        except ImportError:
            print("denoising-diffusion-pytorch not installed: skipped")
        except TypeError as e:
            print(f"denoising-diffusion-pytorch: {e}: skipped")
    return models


def train_step(fn, opt, B, device, amp, shape=(3, 32, 32)):
    """One step, with no host sync (the caller syncs once after the timed steps)."""
    x = torch.randn(B, *shape, device=device)
    t = torch.randint(0, 1000, (B,), device=device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
        loss = (fn(x, t).float() - x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--network", choices=list(NETWORKS), default="cifar10", help="whose network: the paper's CIFAR-10 "
                   "one, or the fashion / digits presets'")
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--sample-batch", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=3, help="training steps timed per measurement")
    p.add_argument("--sample-steps", type=int, default=5, help="reverse steps timed per sampling measurement")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--compile", action="store_true", help="also ours and diffusers' through torch.compile")
    p.add_argument("--only", default="ours,diffusers,ddp",
                   help="which models: ours, diffusers, ddp (denoising-diffusion-pytorch), comma-separated")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="the allocator setting the ddpm commands make (ddpm.runtime), for every model in the process")
    args = p.parse_args()
    if args.keep_freed_memory and not keep_freed_memory():
        p.error("--keep-freed-memory: not applied (Linux with glibc only; DDPM_KEEP_FREED_MEMORY=0 or a "
                "GLIBC_TUNABLES malloc setting turns it off)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = make_models(device, args.compile, set(args.only.split(",")), args.network)
    shape = NETWORKS[args.network][0]
    peak = conv_peak(torch.float32, device)
    peak_bf16 = conv_peak(torch.bfloat16, device)
    diff = GaussianDiffusion(beta_schedule("linear", 1000))
    try:
        from diffusers import DDPMScheduler

        sched = DDPMScheduler(num_train_timesteps=1000, variance_type="fixed_large")
    except ImportError:
        sched = None
    rows = {n: {"train": [], "sample": []} for n in models}
    # ours: the optimizer `ddpm train` builds (fused Adam on the CPU and CUDA); the peers: foreach Adam, faster on
    # the CPU than torch's default there (the per-parameter loop)
    opts = {n: build_optimizer(m.parameters(), 2e-4, 1e-8, torch.device(device)) if n.startswith("ddpm")
            else torch.optim.Adam(m.parameters(), lr=2e-4, foreach=True) for n, (m, _, _) in models.items()}
    amp = dict(device_type=device, dtype=torch.bfloat16, enabled=args.bf16)

    def sample(n, fn, x):
        for i in range(999, 999 - args.sample_steps, -1):
            tt = torch.full((x.shape[0],), i, device=device, dtype=torch.long)
            if n.startswith("diffusers") and sched is not None:
                x = sched.step(fn(x, tt), i, x).prev_sample
            else:
                p_ = diff.p_mean_variance(fn, x, tt)
                x = p_.mean + (0.5 * p_.log_variance).exp() * torch.randn_like(x)
        return x

    flops, compile_s = {}, {}
    for n, (m, train_fn, sample_fn) in models.items():
        torch.backends.cudnn.benchmark = n.endswith(BENCHMARKED)  # read by every convolution, backward's too
        x = torch.randn(2, *shape, device=device)
        eager = unwrap(m) if n.startswith("diffusers") else m
        flops[n] = flops_per_image(eager, m, x, torch.tensor([1, 2], device=device))
        m.zero_grad(set_to_none=True)
        # warm-up at the timed batch sizes: oneDNN and cuDNN pick kernels per shape, torch.compile compiles on
        # the first call, and CUDA graphs are recorded on the second and replayed from the third
        calls = 3 if device == "cuda" else 2
        t0 = time.perf_counter()
        for _ in range(calls):
            train_step(train_fn, opts[n], args.train_batch, device, args.bf16, shape)
        m.eval()
        x = torch.randn(args.sample_batch, *shape, device=device)
        with torch.inference_mode(), torch.autocast(**amp):
            for _ in range(calls):
                sample_fn(x, torch.full((x.shape[0],), 999, device=device))
        sync(device)
        compile_s[n] = time.perf_counter() - t0
    for _ in range(args.reps):  # interleaved: each rep times every model once
        for n, (m, train_fn, sample_fn) in models.items():
            torch.backends.cudnn.benchmark = n.endswith(BENCHMARKED)
            m.train()
            # an untimed step first: right after another model's work, the first step pays for fresh memory
            # (measured: identical networks 20% apart depending on which came first in a repetition)
            train_step(train_fn, opts[n], args.train_batch, device, args.bf16, shape)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.train_steps):  # back to back, as in a training loop
                train_step(train_fn, opts[n], args.train_batch, device, args.bf16, shape)
            sync(device)
            rows[n]["train"].append(args.train_steps * args.train_batch / (time.perf_counter() - t0))
            m.eval()
            x = torch.randn(args.sample_batch, *shape, device=device)
            with torch.inference_mode(), torch.autocast(**amp):
                sample_fn(x, torch.full((x.shape[0],), 999, device=device))  # untimed, as above
                sync(device)
                t0 = time.perf_counter()
                sample(n, sample_fn, x)
                sync(device)
            rows[n]["sample"].append(args.sample_batch * args.sample_steps / (time.perf_counter() - t0))
    dtype = "bf16 autocast" if args.bf16 else "float32"
    if device == "cuda":
        tf32 = (f"TF32 convolutions {'on' if torch.backends.cudnn.allow_tf32 else 'off'}, matmuls "
                f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}")
        where = f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
        extra = tf32
    else:
        where = f"{cpu()}, {torch.get_num_threads()} threads"
        alloc = "freed memory kept (ddpm.runtime)" if args.keep_freed_memory else "default allocator"
        fused_on, fused_why = fused_status()
        extra = alloc + "; fused group-norm kernel: " + ("on" if fused_on else f"off ({fused_why})")
    print(f"\n{time.strftime('%Y-%m-%d')}, {args.network} network, {where}, torch {torch.__version__}, {dtype}, {extra}; "
          f"3x3-conv peak {peak:.0f} GFLOP/s fp32, {peak_bf16:.0f} bf16\n")
    print(f"| model | params | GFLOP/img fwd | train img/s (batch {args.train_batch}) | train GFLOP/s | % of conv peak "
          f"| sample img-steps/s (batch {args.sample_batch}) | train, sample x diffusers | per-rep x diffusers, "
          f"train; sample | warm-up s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    med = {n: {k: sorted(v)[len(v) // 2] for k, v in r.items()} for n, r in rows.items()}
    peer = med.get("diffusers UNet2DModel")
    for n, r in med.items():
        tr, sm = r["train"], r["sample"]
        gf = tr * flops[n][1] / 1e9
        ref = peak_bf16 if args.bf16 else peak
        params = sum(p.numel() for p in models[n][0].parameters())
        vs = f"{tr / peer['train']:.2f}, {sm / peer['sample']:.2f}" if peer else "-"
        print(f"| {n} | {params:,} | {flops[n][0] / 1e9:.2f} | {tr:.2f} | {gf:.0f} | {100 * gf / ref:.0f}% | {sm:.1f} "
              f"| {vs} | {paired(rows, n)} | {compile_s[n]:.0f} |")


def paired(rows: dict, n: str, peer: str = "diffusers UNet2DModel") -> str:
    """Model n's ratio to the peer within each repetition (the two timed minutes apart at most, so a host that
    slows down for a while moves both): 'median (min-max)' for training, then sampling; '-' without the peer."""
    if peer not in rows:
        return "-"
    out = []
    for k in ("train", "sample"):
        r = sorted(a / b for a, b in zip(rows[n][k], rows[peer][k], strict=True))
        out.append(f"{r[len(r) // 2]:.2f} ({r[0]:.2f}-{r[-1]:.2f})")
    return "; ".join(out)


if __name__ == "__main__":
    main()
