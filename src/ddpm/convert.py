"""Foreign checkpoints in and out: diffusers' UNet2DModel folders and the PyTorch port of the paper's
TensorFlow checkpoints in; diffusers pipeline folders out. Every mapping is strict: a missing, extra or
mis-shaped tensor is refused by name. Nothing here executes code from a file.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch

from ddpm.checkpoint import CheckpointError, safe_torch_load
from ddpm.modes import BetaSchedule, LossType, MeanType, VarType, parse_enum
from ddpm.nn import UNet
from ddpm.run import save_run

DIFFUSERS_VERSION = "0.30.0"  # the config format written; any later diffusers reads it

# diffusers' UNet2DModel constructor defaults (facts of its signature): a config.json that lacks a key gets these
_DIFFUSERS_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D", "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu",
    "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
    "num_train_timesteps": None,
}
# the settings under which UNet2DModel computes the paper's network; any other value is a different network
_PAPER_SETTINGS = {
    "act_fn": "silu", "norm_num_groups": 32, "flip_sin_to_cos": False, "freq_shift": 1, "downsample_padding": 0,
    "time_embedding_type": "positional", "resnet_time_scale_shift": "default", "center_input_sample": False,
    "mid_block_type": "UNetMidBlock2D", "mid_block_scale_factor": 1, "downsample_type": "conv",
    "upsample_type": "conv", "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
}
# DDPMScheduler's constructor arguments (facts of its signature); export refuses other keys (typos)
_SCHEDULER_KEYS = frozenset({
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "variance_type", "clip_sample",
    "prediction_type", "thresholding", "dynamic_thresholding_ratio", "clip_sample_range", "sample_max_value",
    "timestep_spacing", "steps_offset", "rescale_betas_zero_snr",
})
_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
_MAX_LISTED = 10  # tensors named per kind of problem in an error message


class ConversionError(ValueError):
    """A foreign file that does not hold the paper's network; the message names the file and tensors."""


# ---------------------------------------------------------------------------------------------- strict checks


def check_tensors(expected: dict[str, tuple[int, ...]], found: dict[str, torch.Tensor], source: str) -> None:
    """Refuse `found` unless it has exactly the names of `expected` with those shapes. The message lists the
    missing, unexpected and mis-shaped tensors by name (up to 10 of each, then a count)."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    shapes = sorted(f"{k} {tuple(found[k].shape)} (expected {expected[k]})"
                    for k in set(expected) & set(found) if tuple(found[k].shape) != expected[k])
    problems = []
    for label, items in (("missing", missing), ("unexpected", extra), ("mis-shaped", shapes)):
        if items:
            more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
            problems.append(f"{label}: {', '.join(items[:_MAX_LISTED])}{more}")
    if problems:
        raise ConversionError(f"{source} does not fit the network: " + "; ".join(problems))


def _skeleton(kwargs: dict) -> UNet:
    """A UNet on the meta device: its names and shapes, without the time an initialisation takes that loaded
    weights replace (3 s for the 256x256 network)."""
    with torch.device("meta"):
        return UNet(**kwargs)


def _filled(skeleton: UNet, state: dict[str, torch.Tensor], source: str) -> UNet:
    """The skeleton holding `state` (our names) as float32 CPU tensors, in eval mode; missing, unexpected or
    mis-shaped tensors are refused by name. A float16 file loads into the float32 network."""
    check_tensors({k: tuple(v.shape) for k, v in skeleton.state_dict().items()}, state, source)
    skeleton.load_state_dict({k: v.to(device="cpu", dtype=torch.float32) for k, v in state.items()}, assign=True)
    return skeleton.eval()


def _read_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    """safetensors, or a PyTorch pickle read with weights_only=True (no code runs; a file that needs code is
    a ConversionError); a {"state_dict": ...} wrapper is unwrapped."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = safe_torch_load(path)
        except CheckpointError as e:  # e.g. a pickle that would run code: refused unexecuted
            raise ConversionError(str(e)) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ConversionError(f"{path} is not a state dict of named tensors")
    return state


# ---------------------------------------------------------------------------------------------- diffusers names

_RESNET_LEAF = {"temb_proj": "time_emb_proj", "nin_shortcut": "conv_shortcut"}  # norm1, conv1, ... keep their names
_ATTN_LEAF = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_OLD_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # files of diffusers < 0.14
_OLD_ATTN_RE = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")
_OUR_NAME_RE = re.compile(r"^(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(\w+)\.(weight|bias)$")


def _leaf(kind: str, module: str, ours: str) -> str:
    table = _ATTN_LEAF if kind in ("attn", "attn_1") else _RESNET_LEAF
    if kind in ("attn", "attn_1") and module not in table:
        raise KeyError(ours)
    return table.get(module, module)


def diffusers_name(ours: str, num_levels: int) -> str:
    """Our tensor name (the port's) -> diffusers' UNet2DModel name. Up levels count the other way in diffusers
    (our up.i is their up_blocks.{num_levels - 1 - i}). A name outside the paper's network is a KeyError."""
    fixed = {"temb.dense.0": "time_embedding.linear_1", "temb.dense.1": "time_embedding.linear_2",
             "conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out"}
    module, _, param = ours.rpartition(".")
    if module in fixed:
        return f"{fixed[module]}.{param}"
    m = _OUR_NAME_RE.match(ours)
    if m:
        side, i, kind, j, leaf, param = m.groups()
        level = int(i) if side == "down" else num_levels - 1 - int(i)
        group = "resnets" if kind == "block" else "attentions"
        return f"{side}_blocks.{level}.{group}.{j}.{_leaf(kind, leaf, ours)}.{param}"
    m = re.match(r"^(down|up)\.(\d+)\.(downsample|upsample)\.conv\.(weight|bias)$", ours)
    if m:
        side, i, what, param = m.groups()
        level = int(i) if side == "down" else num_levels - 1 - int(i)
        return f"{side}_blocks.{level}.{what}rs.0.conv.{param}"
    m = re.match(r"^mid\.(block_1|attn_1|block_2)\.(\w+)\.(weight|bias)$", ours)
    if m:
        part, leaf, param = m.groups()
        where = {"block_1": "resnets.0", "attn_1": "attentions.0", "block_2": "resnets.1"}[part]
        return f"mid_block.{where}.{_leaf(part, leaf, ours)}.{param}"
    raise KeyError(f"{ours} has no diffusers counterpart")


def _diffusers_layout(model: UNet) -> dict[str, tuple[str, tuple[int, ...]]]:
    """diffusers name -> (our name, the tensor's shape in diffusers). Attention q/k/v/proj_out weights are
    Linear [C, C] there and 1x1 convolutions [C, C, 1, 1] here."""
    layout = {}
    for ours, tensor in model.state_dict().items():
        shape = tuple(tensor.shape)
        if (".attn" in ours) and tensor.ndim == 4:
            shape = shape[:2]
        layout[diffusers_name(ours, model.num_levels)] = (ours, shape)
    return layout


def _sample_size(config: dict, source: str) -> int:
    size = config.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ConversionError(f"{source}: sample_size {size} is not square; the network takes square images")
        size = size[0]
    if not isinstance(size, int) or size < 1:
        raise ConversionError(f"{source}: sample_size must be a positive integer (the image size); got {size!r}")
    return size


def unet_kwargs_from_diffusers(config: dict, source: str = "config") -> dict:
    """UNet arguments equal to a diffusers UNet2DModel config, or a ConversionError naming the field that the
    paper's network cannot represent (multi-head attention, other block types, scale-shift norm, ...).

    Keys missing from the config take diffusers' defaults, as diffusers would, with one exception: a missing
    `attention_head_dim` is read as one head (None). diffusers' default (8) would split the attention into
    heads, but configs that lack the key were written by hand for converted weights of the paper's
    single-head network (the 2022 google/ddpm-* folders)."""
    cls = config.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise ConversionError(f"{source}: a {cls}, not a UNet2DModel")
    c = _DIFFUSERS_DEFAULTS | {"attention_head_dim": None} | config
    for key, want in _PAPER_SETTINGS.items():
        if c[key] != want:
            raise ConversionError(f"{source}: {key} = {c[key]!r}; the paper's network has {want!r}")
    if abs(float(c["norm_eps"]) - 1e-6) > 1e-12:
        raise ConversionError(f"{source}: norm_eps = {c['norm_eps']}; the paper's network uses 1e-6")
    if c["attn_norm_num_groups"] not in (None, 32):
        raise ConversionError(f"{source}: attn_norm_num_groups = {c['attn_norm_num_groups']}; the paper's network "
                              "uses 32 groups")
    blocks = [int(b) for b in c["block_out_channels"]]
    ch = blocks[0]
    if ch < 32 or ch % 32 or any(b % ch for b in blocks):
        raise ConversionError(f"{source}: block_out_channels {blocks} must be multiples of the first, itself a "
                              "multiple of 32")
    if c["time_embedding_dim"] not in (None, 4 * ch):
        raise ConversionError(f"{source}: time_embedding_dim = {c['time_embedding_dim']}; the paper's network "
                              f"uses 4 x {ch} = {4 * ch}")
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    if len(down) != len(blocks) or any(t not in ("DownBlock2D", "AttnDownBlock2D") for t in down):
        raise ConversionError(f"{source}: down_block_types {down}: the paper's network has one DownBlock2D or "
                              f"AttnDownBlock2D per entry of block_out_channels ({len(blocks)})")
    mirrored = [t.replace("Down", "Up") for t in reversed(down)]
    if up != mirrored:
        raise ConversionError(f"{source}: up_block_types {up} must mirror down_block_types: {mirrored}")
    head_dim = c["attention_head_dim"]
    if head_dim is not None:
        # diffusers splits C channels into C / attention_head_dim heads: one head only if it equals every width
        widths = {blocks[i] for i, t in enumerate(down) if t == "AttnDownBlock2D"} | {blocks[-1]}
        if any(w != head_dim for w in widths):
            raise ConversionError(f"{source}: attention_head_dim {head_dim} means several heads; the paper's "
                                  "network has one (attention_head_dim null)")
    res = _sample_size(c, source)
    return dict(in_channels=int(c["in_channels"]), ch=ch, ch_mult=tuple(b // ch for b in blocks),
                num_res_blocks=int(c["layers_per_block"]),
                attn_resolutions=tuple(res // 2**i for i, t in enumerate(down) if t == "AttnDownBlock2D"),
                dropout=float(c["dropout"]), resolution=res, out_channels=int(c["out_channels"]))


def load_diffusers_unet(folder: str | Path) -> tuple[UNet, dict]:
    """A diffusers UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors, or .bin read with
    weights_only=True; a DDPMPipeline folder holding unet/ also works) -> (our UNet with its weights, in eval
    mode; the diffusers config as read). The tensors must match the config exactly: a missing, unexpected or
    mis-shaped tensor is a ConversionError naming it (diffusers' names). Old attention names (query, key,
    value, proj_attn) are read as to_q, to_k, to_v, to_out.0."""
    folder = Path(folder)
    if (folder / "unet" / "config.json").is_file():
        folder = folder / "unet"
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers model folder: {cfg_path} is missing")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{cfg_path} is not valid JSON: {e}") from None
    skeleton = _skeleton(unet_kwargs_from_diffusers(config, str(cfg_path)))
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            path = folder / name
            break
    else:
        raise FileNotFoundError(f"no weights in {folder}: expected diffusion_pytorch_model.safetensors or .bin")
    state = {}
    for name, tensor in _read_tensor_file(path).items():
        m = _OLD_ATTN_RE.match(name)
        state[f"{m[1]}{_OLD_ATTN[m[2]]}.{m[3]}" if m else name] = tensor
    layout = _diffusers_layout(skeleton)
    check_tensors({k: shape for k, (_, shape) in layout.items()}, state, str(path))  # names the file's tensors
    shapes = {k: v.shape for k, v in skeleton.state_dict().items()}
    ours = {mine: state[theirs].reshape(shapes[mine]) for theirs, (mine, _) in layout.items()}
    return _filled(skeleton, ours, str(path)), config


# ---------------------------------------------------------------------------------------------- the PyTorch port


def unet_kwargs_from_port(state: dict[str, torch.Tensor], resolution: int | None = None,
                          source: str = "state dict") -> dict:
    """Infer the U-Net's arguments from a port-named state dict. Widths, levels and blocks come from the
    shapes; the image size is not in the weights: without `resolution`, the attention level is taken to
    work at 16x16 as in every released model (so 32 for CIFAR-10's 4 levels, 256 for the 6-level models).
    Dropout is not in the weights either: 0.0 (pass dropout= to fine-tune)."""
    levels = 1 + max((int(m[1]) for k in state if (m := re.match(r"down\.(\d+)\.", k))), default=-1)
    blocks = 1 + max((int(m[1]) for k in state if (m := re.match(r"down\.0\.block\.(\d+)\.", k))), default=-1)
    needed = ["conv_in.weight", "conv_out.weight"] + [f"down.{i}.block.0.conv1.weight" for i in range(levels)]
    absent = [k for k in needed if k not in state]
    if levels < 1 or blocks < 1 or absent:
        raise ConversionError(f"{source} does not look like the paper's network in the port's naming: "
                              f"no {', '.join(absent[:_MAX_LISTED]) or 'down.0.block.0'}")
    ch, in_ch = state["conv_in.weight"].shape[:2]
    out_ch = state["conv_out.weight"].shape[0]
    ch_mult = tuple(state[f"down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
    attn_levels = [i for i in range(levels) if f"down.{i}.attn.0.q.weight" in state]
    if resolution is None:
        if not attn_levels:
            raise ConversionError(f"{source}: no attention level to infer the image size from; pass resolution=")
        resolution = 16 * 2 ** attn_levels[0]
    return dict(in_channels=int(in_ch), ch=int(ch), ch_mult=ch_mult, num_res_blocks=blocks,
                attn_resolutions=tuple(resolution // 2**i for i in attn_levels), dropout=0.0, resolution=resolution,
                out_channels=int(out_ch))


def load_port_state_dict(path: str | Path, resolution: int | None = None, **unet_kwargs) -> UNet:
    """The PyTorch port of the paper's TensorFlow checkpoints (pesser/pytorch_diffusion .ckpt/.pth; names
    `temb.dense.0`, `down.0.block.0.nin_shortcut`, `mid.attn_1.q`, ..., which are ours), read with
    weights_only=True, or the same names in a .safetensors file. UNet arguments not given are inferred (see
    unet_kwargs_from_port); every tensor must fit exactly. Returns the network in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    state = _read_tensor_file(path)
    return _filled(_skeleton(unet_kwargs_from_port(state, resolution, str(path)) | unet_kwargs), state, str(path))


# ---------------------------------------------------------------------------------------------- export


def diffusers_unet_config(model: UNet) -> dict:
    """The UNet2DModel config.json of our network (one attention head: attention_head_dim None)."""
    c = model.config
    if c.num_classes is not None:
        raise ConversionError("class-conditional models cannot be exported: diffusers' UNet2DModel has no null "
                              "class for classifier-free guidance")
    res = c.resolution
    down = ["AttnDownBlock2D" if res // 2**i in c.attn_resolutions else "DownBlock2D" for i in range(len(c.ch_mult))]
    return {
        "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
        "add_attention": True, "attention_head_dim": None, "attn_norm_num_groups": None,
        "block_out_channels": [c.ch * m for m in c.ch_mult], "center_input_sample": False,
        "class_embed_type": None, "down_block_types": down, "downsample_padding": 0, "downsample_type": "conv",
        "dropout": c.dropout, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": c.in_channels,
        "layers_per_block": c.num_res_blocks, "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2D",
        "norm_eps": 1e-6, "norm_num_groups": 32, "num_class_embeds": None, "num_train_timesteps": None,
        "out_channels": model.out_channels, "resnet_time_scale_shift": "default", "sample_size": res,
        "time_embedding_dim": None, "time_embedding_type": "positional",
        "up_block_types": [t.replace("Down", "Up") for t in reversed(down)], "upsample_type": "conv",
    }


def diffusers_state_dict(model: UNet) -> dict[str, torch.Tensor]:
    """Our weights under diffusers' names and shapes (CPU, contiguous, ready for safetensors)."""
    own = model.state_dict()
    return {theirs: own[ours].detach().reshape(shape).cpu().contiguous()
            for theirs, (ours, shape) in _diffusers_layout(model).items()}


def export_diffusers(unet: UNet, out_dir: str | Path, scheduler_config: dict) -> Path:
    """Write a diffusers DDPMPipeline folder: model_index.json, unet/ (config.json and
    diffusion_pytorch_model.safetensors) and scheduler/scheduler_config.json (DDPMScheduler with the given
    settings: num_train_timesteps, beta_start, beta_end, beta_schedule, variance_type ("fixed_large" for the
    CIFAR-10 model, "fixed_small" for the 256x256 ones), clip_sample, prediction_type, ...). Unknown scheduler
    keys and variance types are refused. diffusers is not needed to write it. Returns out_dir."""
    from safetensors.torch import save_file

    unknown = sorted(set(scheduler_config) - _SCHEDULER_KEYS)
    if unknown:
        raise ConversionError(f"scheduler_config: DDPMScheduler has no setting {', '.join(unknown)}")
    variance = scheduler_config.get("variance_type", "fixed_small")
    if variance not in _VARIANCE_TYPES:
        raise ConversionError(f"scheduler_config: variance_type {variance!r} is not one of {', '.join(_VARIANCE_TYPES)}")
    unet_config = diffusers_unet_config(unet)  # refuses what diffusers cannot hold before anything is written
    out = Path(out_dir)
    (out / "unet").mkdir(parents=True, exist_ok=True)
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "unet" / "config.json").write_text(json.dumps(unet_config, indent=2) + "\n")
    save_file(diffusers_state_dict(unet), str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    sched = {"_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION, **scheduler_config}
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
    index = {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
             "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def scheduler_config_for(diffusion_cfg) -> dict:
    """diffusers' DDPMScheduler settings equal to a run's DiffusionConfig (refusing what it cannot express)."""
    d = diffusion_cfg
    schedule = parse_enum(BetaSchedule, d.schedule, "diffusion.schedule")
    mean_type = parse_enum(MeanType, d.mean_type, "diffusion.mean_type")
    schedules = {BetaSchedule.LINEAR: "linear", BetaSchedule.QUAD: "scaled_linear",
                 BetaSchedule.COSINE: "squaredcos_cap_v2"}
    if schedule not in schedules:
        raise ConversionError(f"diffusers' DDPMScheduler has no {schedule.value!r} beta schedule")
    variance = {VarType.FIXED_LARGE: "fixed_large", VarType.FIXED_SMALL: "fixed_small",
                VarType.LEARNED_RANGE: "learned_range"}[parse_enum(VarType, d.var_type, "diffusion.var_type")]
    prediction = {MeanType.EPS: "epsilon", MeanType.X0: "sample", MeanType.V: "v_prediction"}.get(mean_type)
    if prediction is None:
        raise ConversionError(f"diffusers' DDPMScheduler cannot use mean_type {mean_type.value!r}")
    out = {"num_train_timesteps": d.num_timesteps, "beta_start": d.beta_start, "beta_end": d.beta_end,
           "beta_schedule": schedules[schedule], "variance_type": variance, "clip_sample": True,
           "clip_sample_range": 1.0, "prediction_type": prediction, "trained_betas": None}
    if getattr(d, "zero_terminal_snr", False):  # the same Algorithm 1 of Lin et al. (beta_1 equal to rounding)
        out["rescale_betas_zero_snr"] = True
    return out


# ---------------------------------------------------------------------------------------------- run directories


def write_run(source: str | Path, run_dir: str | Path, preset_name: str | None = None, step: int = 0,
              resolution: int | None = None, force: bool = False) -> Path:
    """Convert released weights into a run directory (config.json + a checkpoint whose raw and EMA weights
    are both the file's), so `ddpm sample` and the evaluations work on it unchanged. The diffusion settings
    come from the preset: fixedlarge for CIFAR-10, fixedsmall for the 256x256 models."""
    from ddpm.config import preset

    source, run_dir = Path(source), Path(run_dir)
    if (run_dir / "config.json").exists() and not force:
        raise FileExistsError(f"{run_dir} already holds a run; pass --force to replace it")
    if source.is_dir():
        model, _ = load_diffusers_unet(source)
    else:
        model = load_port_state_dict(source, resolution=resolution)
    name = preset_name or ("cifar10" if model.config.resolution == 32 else "lsun-church")
    cfg = preset(name)
    # the network's fields; dropout (not in the weights) and num_classes (none converts) stay the preset's
    cfg.model = dataclasses.replace(model.config, dropout=cfg.model.dropout, num_classes=cfg.model.num_classes)
    if model.out_channels == 2 * model.config.in_channels:
        cfg.diffusion.var_type, cfg.diffusion.loss_type = VarType.LEARNED_RANGE, LossType.HYBRID
    sd = model.state_dict()  # both the raw and the EMA weights are the file's
    return save_run(run_dir, cfg, step, sd, sd, extra={"converted_from": str(source)}, keep=1, write_config=True)
