"""Trainer: the paper's training loop (Adam, warm-up, gradient clipping, EMA), checkpoints, exact resume,
signals, non-finite steps, and DistributedDataParallel under torchrun. The run's format, its builders and its
seeds live in `ddpm.run`.

Determinism: every random choice of step k (data order, flips, class dropout, t, noise, dropout) comes from
generators seeded by (seed, k) and drawn for the whole global batch, each rank taking its slice. So a resumed
run repeats an uninterrupted one bit for bit, and the same run on 1 or N ranks sees the same examples with the
same t and noise. (With diffusion.timestep_sampler importance, t also depends on the loss history of the earlier
steps, which every rank keeps alike and the checkpoints hold.)
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ddpm import checkpoint as ckpt
from ddpm.conditional import concatenated, condition, condition_from_clean
from ddpm.config import Config, ConfigError, diff_configs
from ddpm.data import build_dataset, check_enough, to_model_range
from ddpm.diffusion import randn
from ddpm.importance import ImportanceSampler
from ddpm.lock import LOCK_FILE
from ddpm.modes import Preview, TimestepSampler
from ddpm.nn.compiled import compile_network
from ddpm.run import (
    DistInfo,
    amp_dtype,
    build_diffusion,
    build_model,
    build_operator,
    checkpoint_contents,
    conditioned,
    derived_seed,
    generator,
    init_distributed,
    lock_for_writing,
    resolve_device,
    save_run,
    split_state,
    with_labels,
)
from ddpm.sampling import run_sampler

# Changing these makes old weights or optimizer state meaningless for the run: refuse such a resume.
INCOMPATIBLE_ON_RESUME = (
    "model.in_channels", "model.ch", "model.ch_mult", "model.num_res_blocks", "model.attn_resolutions",
    "model.resolution", "model.num_classes", "model.cond_channels", "data.task", "data.mask", "diffusion.schedule", "diffusion.num_timesteps",
    "diffusion.beta_start", "diffusion.beta_end", "diffusion.mean_type", "diffusion.var_type",
    "diffusion.zero_terminal_snr",
    "train.batch_size",
)
EXIT_SIGTERM, EXIT_SIGINT = 143, 130


class TrainingError(RuntimeError):
    """A run that cannot start or go on as asked (an incompatible resume, a missing checkpoint); the message
    says why."""


class TrainingDiverged(TrainingError):
    """Training stopped by train.max_bad_steps non-finite steps in a row; the last good checkpoint is intact."""


def trim_log(path: Path, step: int) -> None:
    """Keeps the lines of the run's log.jsonl up to `step`, the step training goes on from: after a kill -9 the
    log holds steps past the last checkpoint (and perhaps half a line), which the resumed run trains again. The
    log is rewritten whole (a temporary file, then a rename), so an interruption leaves the old one."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short by the kill
    if kept != lines:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)


def build_optimizer(params, lr: float, eps: float, device: torch.device) -> torch.optim.Adam:
    """Adam with its fused kernel (the whole update in one pass per parameter) on CUDA and on the CPU, the
    foreach implementation elsewhere. On the CPU the fused step of the CIFAR-10 network takes 26.5 ms against
    87 ms for foreach (benchmarks/RESULTS.md)."""
    if device.type in ("cuda", "cpu"):
        return torch.optim.Adam(params, lr=lr, eps=eps, fused=True)
    return torch.optim.Adam(params, lr=lr, eps=eps, foreach=True)


def ema_decay(decay: float, warmup: bool, updates: int) -> float:
    """The EMA decay of update number `updates` (0-based): `decay`, or with warm-up min(decay, (1 + n) / (10 + n))
    (TensorFlow's ExponentialMovingAverage with num_updates), so that after n steps the average spans about
    n / 10 of them instead of holding (decay ** n) of the initial weights: 0.999 ** 1500 is still 22%."""
    return min(decay, (1 + updates) / (10 + updates)) if warmup else decay


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for every parameter; buffers are copied."""
    e_params = [p for p in ema.parameters()]
    m_params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(e_params, m_params, 1.0 - decay)
    for eb, mb in zip(ema.buffers(), model.buffers(), strict=True):
        eb.copy_(mb)


def lr_at(cfg: Config, step: int) -> float:
    """Linear warm-up to train.lr over train.warmup steps (step 0 gets lr / warmup, not 0), then constant."""
    t = cfg.train
    return t.lr * min(1.0, (step + 1) / t.warmup) if t.warmup > 0 else t.lr


# ---------------------------------------------------------------------------------------------- data order


class BatchOrder:
    """Which examples micro-batch k of the run uses: epoch-wise permutations seeded by (seed, epoch), cut into
    global micro-batches (the last partial one dropped). Derived from k alone, so resuming needs no state."""

    def __init__(self, n: int, micro_batch: int, seed: int):
        self.n, self.micro_batch, self.seed = n, micro_batch, seed
        self.per_epoch = n // micro_batch
        self._epoch, self._perm = -1, None

    def indices(self, k: int) -> torch.Tensor:
        epoch, pos = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            self._perm = torch.randperm(self.n, generator=generator(self.seed, "epoch", epoch))
            self._epoch = epoch
        return self._perm[pos * self.micro_batch : (pos + 1) * self.micro_batch]


class Batches:
    """uint8 images [b, C, H, W], labels and (paired data: `PairedFolderDataset.inputs`, else None) the degraded
    inputs [b, c, h, w] for a list of indices; in-memory data is indexed directly."""

    def __init__(self, dataset, num_workers: int):
        self.dataset = dataset
        self.images = getattr(dataset, "images", None)
        self.labels = getattr(dataset, "labels", None)
        self.inputs = getattr(dataset, "inputs", None)
        self.pool = None
        if self.images is None and num_workers > 0:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(num_workers)

    def get(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        inputs = None if self.inputs is None else self.inputs[idx]
        if self.images is not None:
            labels = self.labels[idx] if self.labels is not None else torch.full((len(idx),), -1)
            return self.images[idx], labels, inputs
        items = list(self.pool.map(self.dataset.__getitem__, idx.tolist())) if self.pool else [
            self.dataset[i] for i in idx.tolist()
        ]
        return torch.stack([im for im, _ in items]), torch.tensor([int(y) for _, y in items]), inputs


# ---------------------------------------------------------------------------------------------- the trainer


class Trainer:
    """Runs `cfg` into `run_dir` (config.json, checkpoints/, tb/, grids/, log.jsonl).

    One writer per run: rank 0 holds RUN/.lock (`ddpm.lock`) from construction to the end of `train()` (or
    `close()`); a second Trainer on the directory is refused with a LockedError before it reads or changes
    anything there.

    Args:
        resume: continue from the newest complete checkpoint (an error if there is none).
        force: start afresh in a directory that already holds a run (its checkpoints are moved aside).
        weights_only: with resume, accept a checkpoint without optimizer state (weights and EMA only).
    """

    def __init__(self, cfg: Config, run_dir: str | Path, resume: bool = False, force: bool = False,
                 weights_only: bool = False, dist_info: DistInfo | None = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.dist = dist_info or init_distributed(cfg.train.device)
        self.device = resolve_device(cfg.train.device, "train.device")
        t = cfg.train
        per_rank, rem = divmod(t.batch_size, self.dist.world * t.grad_accum)
        if rem or per_rank < 1:
            raise ConfigError(f"train.batch_size {t.batch_size} must split evenly over {self.dist.world} rank(s) x "
                              f"{t.grad_accum} accumulation step(s)")
        self.micro_global = t.batch_size // t.grad_accum  # examples per micro-batch over all ranks
        self.per_rank = per_rank
        self.amp_dtype = amp_dtype(t.precision, self.device, "train.precision")

        self.ckpt_dir = self.run_dir / "checkpoints"
        # one writer per run: taken before anything in the directory is read or changed, released by train()
        self._lock = lock_for_writing(self.run_dir / LOCK_FILE, f"run directory {self.run_dir}", self.dist)
        try:
            self._setup(resume, force, weights_only)
        except BaseException:
            self.close()
            raise

    def _setup(self, resume: bool, force: bool, weights_only: bool) -> None:
        """The run directory, data, networks, optimizer and resumed state (under the lock)."""
        cfg, t = self.cfg, self.cfg.train
        self._check_run_dir(resume, force)

        data = cfg.data
        self.op = build_operator(cfg)  # trained on pairs: the task's degradation A (None: unconditional)
        pairs = None if self.op is None else self.op.degraded_shape(self.op.shape)
        self.dataset = build_dataset(data.dataset, data.path, cfg.model.resolution, "train", cfg.model.in_channels,
                                     input_shape=pairs)
        check_enough(self.dataset, self.micro_global, data.path or data.dataset)
        self._write_run_dir(resume, force)  # only now: a data set that fails to load leaves the directory as it was
        self.order = BatchOrder(len(self.dataset), self.micro_global, t.seed)
        self.batches = Batches(self.dataset, data.num_workers)

        torch.manual_seed(t.seed)
        self.diffusion = build_diffusion(cfg)
        # loss-aware t (improved DDPM sec. 3.3); None: t uniform, as the paper
        self.importance = (ImportanceSampler(self.diffusion.num_timesteps)
                           if cfg.diffusion.timestep_sampler is TimestepSampler.IMPORTANCE else None)
        self.model = build_model(cfg).to(self.device)
        self.ema = build_model(cfg).to(self.device)
        self.ema.load_state_dict(self.model.state_dict())
        self.ema.eval().requires_grad_(False)
        self.opt = build_optimizer(self.model.parameters(), t.lr, t.adam_eps, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=t.precision == "fp16")
        self.step = 0
        self.bad_in_a_row = 0
        self.bad_total = 0
        if resume:
            self._resume(weights_only)
        self.ddp = None
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        # what a step calls: the model, or DDP over it; compiled when asked (the checkpoints keep self.model's keys)
        self.net = self.model if self.ddp is None else self.ddp
        if t.compile:
            self.net = compile_network(self.net)
        self._stop_signal: int | None = None

    def close(self) -> None:
        """Release the run directory for another writer (train() does at its end; nothing if already done)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ------------------------------------------------------------------ run directory

    def _check_run_dir(self, resume: bool, force: bool) -> None:
        """Refuse, before anything is loaded, what the run directory cannot take."""
        cfg_path = self.run_dir / "config.json"
        if self.dist.main:
            if cfg_path.exists() and not (resume or force):
                raise ConfigError(f"{self.run_dir} already holds a run: pass --resume to continue it or --force to replace it")
            if resume and ckpt.latest_checkpoint(self.ckpt_dir) is None:
                raise TrainingError(f"--resume: no complete checkpoint in {self.ckpt_dir}; nothing to resume "
                                    "(a fresh run needs no --resume)")
            if resume and cfg_path.exists():
                old = Config.load(cfg_path)
                changed = diff_configs(old, self.cfg, INCOMPATIBLE_ON_RESUME)
                if changed:
                    raise TrainingError(f"cannot resume {self.run_dir} with a different set-up:\n  " + "\n  ".join(changed))

    def _write_run_dir(self, resume: bool, force: bool) -> None:
        """Move a replaced run aside (--force) and write config.json, once the data set has loaded."""
        if self.dist.main:
            if force and not resume:  # the old run's files go aside (replacing an older aside), not mixed in
                aside = self.run_dir / "replaced"
                olds = [self.run_dir / n for n in ("checkpoints", "log.jsonl", "tb", "grids", "config.json")]
                if any(p.exists() for p in olds):
                    shutil.rmtree(aside, ignore_errors=True)
                    aside.mkdir(parents=True)
                    for p in olds:
                        if p.exists():
                            p.rename(aside / p.name)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.cfg.save(self.run_dir / "config.json")
        if self.dist.world > 1:
            dist.barrier()

    # ------------------------------------------------------------------ checkpoints

    def _contents(self) -> dict:
        """The whole training state, as `ddpm.run.checkpoint_contents` takes it."""
        extra = {
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "ema_updates": self.step,
            "bad_steps_total": self.bad_total,
            "rng": "every random stream is derived from (train.seed, step); nothing else to restore",
            "world_size": self.dist.world,
        }
        more = {} if self.importance is None else {f"importance/{k}": v for k, v in self.importance.state_dict().items()}
        return dict(cfg=self.cfg, step=self.step, model=self.model.state_dict(), ema=self.ema.state_dict(),
                    optimizer=ckpt.flatten_state(self.opt.state_dict(), "optim"), extra=extra, more=more)

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, state) that `save` writes."""
        return checkpoint_contents(**self._contents())

    def save(self) -> Path | None:
        """A checkpoint of the whole training state (rank 0 writes it; every rank waits for it)."""
        path = None
        if self.dist.main:
            path = save_run(self.run_dir, **self._contents(), keep=self.cfg.train.keep_checkpoints)
        if self.dist.world > 1:
            dist.barrier()
        return path

    def _resume(self, weights_only: bool) -> None:
        path = ckpt.latest_checkpoint(self.ckpt_dir)
        if path is None:
            raise TrainingError(f"--resume: no complete checkpoint in {self.ckpt_dir}")
        c = ckpt.load_checkpoint(path)
        model_sd, ema_sd = split_state(c.tensors, "model"), split_state(c.tensors, "ema")
        missing = [name for name, sd in (("model", model_sd), ("ema", ema_sd)) if not sd]
        has_opt = any(k.startswith("optim/") for k in c.tensors) and c.state.get("optimizer") is not None
        if not has_opt and not weights_only:
            missing.append("optimizer")
        if missing:
            raise TrainingError(f"checkpoint {path} lacks {', '.join(missing)} state; "
                                "pass --weights-only to resume from its weights alone" if "optimizer" in missing
                                else f"checkpoint {path} lacks {', '.join(missing)} weights")
        self.model.load_state_dict(model_sd)
        self.ema.load_state_dict(ema_sd)
        if has_opt:
            self.opt.load_state_dict(ckpt.unflatten_state(c.tensors, c.state["optimizer"], "optim"))
        if c.state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(c.state["scaler"])
        if self.importance is not None and split_state(c.tensors, "importance"):  # else: a fresh warm-up
            self.importance.load_state_dict(split_state(c.tensors, "importance"))
        self.step = int(c.state["step"])
        self.bad_total = int(c.state.get("bad_steps_total", 0))
        if self.dist.main:
            print(f"resumed from {path} at step {self.step}", file=sys.stderr)

    # ------------------------------------------------------------------ one step

    def _micro_batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None,
                                            torch.Tensor | None]:
        """Micro-batch k of the whole run: this rank's x0 [b, C, H, W] in [-1, 1], t [b], noise, labels, and for a
        run trained on pairs the condition [b, C, H, W] (`ddpm.conditional`: of the paired input, else of A x0)."""
        cfg, B = self.cfg, self.micro_global
        idx = self.order.indices(k)
        lo, hi = self.dist.rank * self.per_rank, (self.dist.rank + 1) * self.per_rank
        images, labels, inputs = self.batches.get(idx[lo:hi])
        x0 = to_model_range(images)
        y_in = None if inputs is None else to_model_range(inputs)
        if cfg.data.hflip:  # a pair is flipped together (A commutes with the flip: blocks, channels, a symmetric blur)
            flip = (torch.rand(B, generator=generator(cfg.train.seed, "flip", k))[lo:hi] < 0.5)[:, None, None, None]
            x0 = torch.where(flip, x0.flip(-1), x0)
            y_in = None if y_in is None else torch.where(flip, y_in.flip(-1), y_in)
        x0 = x0.to(self.device, non_blocking=True)
        cond = None
        if self.op is not None:
            cond = (condition_from_clean(self.op, x0) if y_in is None
                    else condition(self.op, y_in.to(self.device, non_blocking=True)))
        g = generator(cfg.train.seed, "diffusion", k)
        t = (torch.randint(0, self.diffusion.num_timesteps, (B,), generator=g) if self.importance is None
             else self.importance.sample(B, g))[lo:hi].to(self.device)
        noise = torch.randn((B, *x0.shape[1:]), generator=g)[lo:hi].to(self.device)
        y = None
        if cfg.model.num_classes is not None:
            drop = torch.rand(B, generator=generator(cfg.train.seed, "class_dropout", k))[lo:hi] < cfg.train.class_dropout
            y = torch.where(drop, torch.full_like(labels, cfg.model.num_classes), labels).to(self.device)
        return x0, t, noise, y, cond

    def train_step(self) -> dict:
        """One optimizer step over train.grad_accum micro-batches; a non-finite loss or gradient is skipped."""
        cfg = self.cfg.train
        lr = lr_at(self.cfg, self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        dropout_seed = derived_seed(cfg.seed, f"dropout/{self.dist.rank}", self.step)
        torch.manual_seed(dropout_seed)  # the dropout masks of this step on this rank
        self.opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            x0, t, noise, y, cond = self._micro_batch(self.step * cfg.grad_accum + micro)
            sync = micro == cfg.grad_accum - 1 or self.dist.world == 1
            ctx = self.ddp.no_sync() if not sync and self.ddp is not None else _null()
            with ctx, torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                fn = self.net if y is None else with_labels(self.net, y)
                fn = fn if cond is None else concatenated(fn, cond)  # SR3: x_t and the condition stacked
                losses = self.diffusion.training_losses(fn, x0, t=t, noise=noise)
                if self.importance is not None:
                    losses = self._importance_weighted(t, losses)
                loss = losses.float().mean() / cfg.grad_accum
            self.scaler.scale(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.opt)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if self.dist.world > 1:  # the mean loss over ranks, for logging
            dist.all_reduce(total)
            total /= self.dist.world
        loss_value, norm_value = float(total), float(grad_norm)  # one host sync per step
        finite = math.isfinite(loss_value) and math.isfinite(norm_value)
        if finite:
            self.scaler.step(self.opt)
            self.scaler.update()
            ema_update(self.ema, self.model, ema_decay(cfg.ema_decay, cfg.ema_warmup, self.step))
            self.bad_in_a_row = 0
        else:
            # weights, EMA and optimizer are left untouched; fp16's scaler lowers its scale and tries again
            if self.scaler.is_enabled():
                self.scaler.update()
            self.bad_in_a_row += 1
            self.bad_total += 1
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss": loss_value, "grad_norm": norm_value, "lr": lr, "finite": finite}

    def _importance_weighted(self, t: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """This rank's losses [b] times 1 / (T p_t), p the one t was drawn from; then the loss history takes the
        whole global batch's (unweighted) losses, gathered from every rank in the global batch's order, so that
        each rank's copy of it stays the same."""
        w = self.importance.weights(t).to(losses.dtype)
        seen_t, seen = t, losses.detach()
        if self.dist.world > 1:
            seen_t, seen = (_all_gather(v, self.dist.world) for v in (seen_t, seen))
        self.importance.update(seen_t, seen)
        return losses * w

    # ------------------------------------------------------------------ the loop

    def _out_of_time(self, deadline: float) -> bool:
        """train.minutes is spent (rank 0's clock decides, so every rank stops after the same step)."""
        done = torch.tensor([float(time.perf_counter() >= deadline)])
        if self.dist.world > 1:
            done = done.to(self.device)
            dist.broadcast(done, 0)
        return bool(done.item())

    def _on_signal(self, signum, frame) -> None:  # only sets a flag: the step in flight finishes first
        self._stop_signal = signum

    def train(self, progress: bool = True) -> int:
        """Train to train.steps; returns the process exit code (0, or 143/130 after SIGTERM/SIGINT)."""
        cfg = self.cfg.train
        writer = None
        log = None
        if self.dist.main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.run_dir / "tb"))
            log_path = self.run_dir / "log.jsonl"
            trim_log(log_path, self.step)
            log = open(log_path, "a", buffering=1)  # a line per step, on disk as it is written
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        bar = None
        if progress and self.dist.main:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", dynamic_ncols=True)
        try:
            t_last, n_last = time.perf_counter(), self.step
            deadline = t_last + 60 * cfg.minutes if cfg.minutes > 0 else None
            while self.step < cfg.steps:
                info = self.train_step()
                s = self.step
                if not info["finite"]:
                    msg = f"step {s}: non-finite loss or gradient (loss {info['loss']}, grad norm {info['grad_norm']}); step skipped"
                    if self.dist.main:
                        print(msg, file=sys.stderr)
                    if self.bad_in_a_row >= cfg.max_bad_steps:
                        raise TrainingDiverged(f"{self.bad_in_a_row} non-finite steps in a row; stopping. The last good "
                                            f"checkpoint in {self.ckpt_dir} is intact")
                if self.dist.main:
                    log.write(json.dumps({"step": s, **info}) + "\n")
                    if cfg.log_every and s % cfg.log_every == 0:
                        now = time.perf_counter()
                        ips = (s - n_last) * cfg.batch_size / max(now - t_last, 1e-9)
                        t_last, n_last = now, s
                        writer.add_scalar("loss", info["loss"], s)
                        writer.add_scalar("lr", info["lr"], s)
                        writer.add_scalar("grad_norm", info["grad_norm"], s)
                        writer.add_scalar("images_per_sec", ips, s)
                        if bar is not None:
                            bar.set_postfix(loss=f"{info['loss']:.4f}", img_s=f"{ips:.1f}")
                    if bar is not None:
                        bar.update(1)
                if cfg.sample_every and s % cfg.sample_every == 0:
                    self.sample_grid()
                if self._stop_signal is None and cfg.ckpt_every and s % cfg.ckpt_every == 0:
                    self.save()
                if self._stop_signal is not None:
                    break
                if deadline is not None and self._out_of_time(deadline):
                    break
            path = self.save()
            if self._stop_signal is not None:
                name = signal.Signals(self._stop_signal).name
                if self.dist.main:
                    print(f"\n{name}: stopped at step {self.step}; checkpoint {path}. Resume with:\n  ddpm train --out "
                          f"{self.run_dir} --resume", file=sys.stderr)
                return EXIT_SIGTERM if self._stop_signal == signal.SIGTERM else EXIT_SIGINT
            if cfg.sample_every and self.step % cfg.sample_every != 0:
                self.sample_grid()
            return 0
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
            if log is not None:
                log.close()
            self.close()

    @torch.no_grad()
    def sample_grid(self, n: int = 64) -> Path | None:
        """A preview grid of EMA samples (fixed seed) in grids/, drawn by train.preview (DDIM with eta 1 on
        train.preview_steps steps by default, seconds; "ancestral": all T steps, minutes on a CPU); never
        touches the training weights or RNG streams."""
        if not self.dist.main:
            return None
        from ddpm.images import save_grid

        n = n if self.cfg.model.resolution <= 32 else 16
        m = self.cfg.model
        fn = conditioned(self.ema, m.num_classes, batch=n, device=self.device)  # the null label: unconditional
        shown = []
        if self.op is not None:  # trained on pairs: restore the first training images, shown beside it
            n = min(n // 4, len(self.dataset))
            images, _, inputs = self.batches.get(torch.arange(n))
            x0 = to_model_range(images).to(self.device)
            cond = condition_from_clean(self.op, x0) if inputs is None else condition(
                self.op, to_model_range(inputs).to(self.device))
            fn, shown = concatenated(fn, cond), [cond, x0]
        g = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed)
        rng_state = torch.get_rng_state()
        x_T = randn((n, m.in_channels, m.resolution, m.resolution), g, self.device)
        t = self.cfg.train
        if t.preview == Preview.ANCESTRAL:
            x = run_sampler("ancestral", self.diffusion, fn, x_T, generator=g)
        else:  # eta 1: on digits the nearest of the fast samplers to the 1000-step quality (benchmarks/RESULTS.md)
            steps = min(t.preview_steps, self.diffusion.num_timesteps)
            x = run_sampler("ddim", self.diffusion, fn, x_T, steps=steps, eta=1.0, generator=g)
        torch.set_rng_state(rng_state)
        path = self.run_dir / "grids" / f"step_{self.step:09d}.png"
        save_grid(torch.cat([*shown[:1], x, *shown[1:]]), path, nrow=n if shown else None)  # pairs: c, x, x0 rows
        return path


def _all_gather(v: torch.Tensor, world: int) -> torch.Tensor:
    """The ranks' tensors [b] concatenated in rank order [world * b]."""
    parts = [torch.empty_like(v) for _ in range(world)]
    dist.all_gather(parts, v.contiguous())
    return torch.cat(parts)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
