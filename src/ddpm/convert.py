"""Foreign checkpoints in and out: diffusers' UNet2DModel folders and the PyTorch port of the paper's
TensorFlow checkpoints in; diffusers pipeline folders out. Every mapping is strict: a missing, extra or
mis-shaped tensor is refused by name. Nothing here executes code from a file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ddpm.checkpoint import safe_torch_load
from ddpm.nn import UNet

DIFFUSERS_VERSION = "0.30.0"  # the config format written; any later diffusers reads it

# diffusers' settings that the paper's network has; anything else is a different network
_REQUIRED = {
    "act_fn": "silu", "norm_num_groups": 32, "flip_sin_to_cos": False, "freq_shift": 1, "downsample_padding": 0,
    "time_embedding_type": "positional", "resnet_time_scale_shift": "default", "center_input_sample": False,
}


class ConversionError(ValueError):
    """A foreign file that does not hold the paper's network; the message names the file and tensors."""


# ---------------------------------------------------------------------------------------------- strict loading


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load state into model, refusing missing, unexpected or mis-shaped tensors (named, up to 10 each)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = sorted(f"{k} {tuple(state[k].shape)} (expected {tuple(own[k].shape)})"
                    for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
    problems = []
    for label, items in (("missing", missing), ("unexpected", extra), ("mis-shaped", shapes)):
        if items:
            more = f" and {len(items) - 10} more" if len(items) > 10 else ""
            problems.append(f"{label}: {', '.join(items[:10])}{more}")
    if problems:
        raise ConversionError(f"{source} does not fit the network: " + "; ".join(problems))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


# ---------------------------------------------------------------------------------------------- diffusers


def _ours_to_diffusers_names(num_levels: int) -> list[tuple[str, str]]:
    """(our prefix, diffusers prefix) pairs, longest first; up levels are numbered in reverse in diffusers."""
    pairs = [("temb.dense.0.", "time_embedding.linear_1."), ("temb.dense.1.", "time_embedding.linear_2."),
             ("norm_out.", "conv_norm_out."), ("mid.block_1.", "mid_block.resnets.0."),
             ("mid.block_2.", "mid_block.resnets.1."), ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(num_levels):
        pairs += [(f"down.{i}.block.", f"down_blocks.{i}.resnets."), (f"down.{i}.attn.", f"down_blocks.{i}.attentions."),
                  (f"down.{i}.downsample.conv.", f"down_blocks.{i}.downsamplers.0.conv."),
                  (f"up.{i}.block.", f"up_blocks.{num_levels - 1 - i}.resnets."),
                  (f"up.{i}.attn.", f"up_blocks.{num_levels - 1 - i}.attentions."),
                  (f"up.{i}.upsample.conv.", f"up_blocks.{num_levels - 1 - i}.upsamplers.0.conv.")]
    return pairs


_LEAF = {"temb_proj.": "time_emb_proj.", "nin_shortcut.": "conv_shortcut.", "norm.": "group_norm.", "q.": "to_q.",
         "k.": "to_k.", "v.": "to_v.", "proj_out.": "to_out.0."}
_OLD_ATTN = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}


def _rename(name: str, pairs: list[tuple[str, str]], leaf: dict[str, str]) -> str:
    for a, b in pairs:
        if name.startswith(a):
            rest = name[len(a):]
            m = re.match(r"(\d+\.)?(.*)", rest)
            idx, tail = m.group(1) or "", m.group(2)
            for la, lb in leaf.items():
                if tail.startswith(la):
                    tail = lb + tail[len(la):]
                    break
            return b + idx + tail
    return name


def _is_attn(name: str) -> bool:
    return ".attn." in name or ".attn_1." in name or ".attentions." in name


def unet_kwargs_from_diffusers(config: dict, source: str) -> dict:
    """UNet arguments for a diffusers UNet2DModel config of the paper's network (or a ConversionError)."""
    cls = config.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise ConversionError(f"{source}: a {cls}, not a UNet2DModel")
    for key, want in _REQUIRED.items():
        if key in config and config[key] != want:
            raise ConversionError(f"{source}: {key} = {config[key]!r}; the paper's network has {want!r}")
    if config.get("class_embed_type") or config.get("num_class_embeds"):
        raise ConversionError(f"{source}: class-conditional diffusers models are not supported")
    if "norm_eps" in config and abs(config["norm_eps"] - 1e-6) > 1e-12:
        raise ConversionError(f"{source}: norm_eps = {config['norm_eps']}; the paper's network uses 1e-6")
    blocks = list(config["block_out_channels"])
    ch = blocks[0]
    if any(b % ch for b in blocks):
        raise ConversionError(f"{source}: block_out_channels {blocks} are not multiples of {ch}")
    down = list(config["down_block_types"])
    if len(down) != len(blocks) or any(t not in ("DownBlock2D", "AttnDownBlock2D") for t in down):
        raise ConversionError(f"{source}: down_block_types {down} are not the paper's")
    head_dim = config.get("attention_head_dim")
    if head_dim is not None:
        # one head: the head dimension must equal every attention layer's width
        attn_widths = {blocks[i] for i, t in enumerate(down) if t == "AttnDownBlock2D"} | {blocks[-1]}
        if any(w != head_dim for w in attn_widths):
            raise ConversionError(f"{source}: attention_head_dim {head_dim} means several heads; the paper's network "
                                  "has one (attention_head_dim None)")
    res = int(config["sample_size"]) if not isinstance(config["sample_size"], (list, tuple)) else int(config["sample_size"][0])
    return dict(in_channels=int(config.get("in_channels", 3)), ch=ch, ch_mult=tuple(b // ch for b in blocks),
                num_res_blocks=int(config.get("layers_per_block", 2)),
                attn_resolutions=tuple(res // 2**i for i, t in enumerate(down) if t == "AttnDownBlock2D"),
                dropout=float(config.get("dropout", 0.0)), resolution=res,
                out_channels=int(config.get("out_channels", config.get("in_channels", 3))))


def load_diffusers_unet(folder: str | Path) -> tuple[UNet, dict]:
    """A diffusers UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors or .bin; also a
    pipeline folder holding unet/) -> (our UNet with its weights, the diffusers config)."""
    folder = Path(folder)
    if (folder / "unet" / "config.json").is_file():
        folder = folder / "unet"
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers model folder: {cfg_path} is missing")
    config = json.loads(cfg_path.read_text())
    kwargs = unet_kwargs_from_diffusers(config, str(cfg_path))
    st, binf = folder / "diffusion_pytorch_model.safetensors", folder / "diffusion_pytorch_model.bin"
    if st.is_file():
        from safetensors.torch import load_file

        state = load_file(str(st))
        source = str(st)
    elif binf.is_file():
        state = safe_torch_load(binf)
        source = str(binf)
    else:
        raise FileNotFoundError(f"no weights in {folder}: expected diffusion_pytorch_model.safetensors or .bin")
    model = UNet(**kwargs)
    pairs = [(b, a) for a, b in _ours_to_diffusers_names(model.num_levels)]
    inverse_leaf = {v: k for k, v in _LEAF.items()} | {v: k for k, v in _OLD_ATTN.items()}
    ours = {}
    for name, tensor in state.items():
        new = _rename(name, pairs, inverse_leaf)
        if _is_attn(new) and new.endswith(".weight") and tensor.ndim == 2 and not new.endswith("norm.weight"):
            tensor = tensor[:, :, None, None]  # diffusers' attention projections are Linear; ours are 1x1 convs
        ours[new] = tensor
    load_strict(model, ours, source)
    return model, config


# ---------------------------------------------------------------------------------------------- the PyTorch port


def unet_kwargs_from_port(state: dict[str, torch.Tensor], resolution: int | None, source: str) -> dict:
    """Infer the U-Net's arguments from a port-named state dict (resolution: 32 for 4 levels, else 256)."""
    try:
        ch, in_ch = state["conv_in.weight"].shape[:2]
        out_ch = state["conv_out.weight"].shape[0]
        levels = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("down."))
        ch_mult = tuple(state[f"down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
        nrb = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("down.0.block."))
    except (KeyError, ValueError) as e:
        raise ConversionError(f"{source} does not look like the paper's network (port naming): {e}") from None
    res = resolution or (32 if levels == 4 else 256)
    attn = tuple(res // 2**i for i in range(levels) if f"down.{i}.attn.0.q.weight" in state)
    return dict(in_channels=int(in_ch), ch=int(ch), ch_mult=ch_mult, num_res_blocks=nrb, attn_resolutions=attn,
                dropout=0.0, resolution=res, out_channels=int(out_ch))


def load_port_state_dict(path: str | Path, resolution: int | None = None, **unet_kwargs) -> UNet:
    """The PyTorch port of the paper's TensorFlow checkpoints (`temb.dense.0`, `down.0.block.0`, `mid.attn_1`,
    ... names; EMA or not), read with weights_only=True. Arguments not given are inferred from the shapes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = safe_torch_load(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path} is not a state dict of tensors")
    kwargs = unet_kwargs_from_port(state, resolution, str(path)) | unet_kwargs
    model = UNet(**kwargs)
    load_strict(model, state, str(path))
    return model


# ---------------------------------------------------------------------------------------------- export


def diffusers_unet_config(model: UNet) -> dict:
    """The UNet2DModel config.json of our network (one attention head: attention_head_dim None)."""
    c = model.config
    if c["num_classes"] is not None:
        raise ConversionError("class-conditional models cannot be exported to diffusers' UNet2DModel layout")
    res = c["resolution"]
    down = ["AttnDownBlock2D" if res // 2**i in c["attn_resolutions"] else "DownBlock2D" for i in range(len(c["ch_mult"]))]
    return {
        "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu", "add_attention": True,
        "attention_head_dim": None, "block_out_channels": [c["ch"] * m for m in c["ch_mult"]],
        "center_input_sample": False, "down_block_types": down, "downsample_padding": 0, "dropout": c["dropout"],
        "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": c["in_channels"], "layers_per_block": c["num_res_blocks"],
        "mid_block_scale_factor": 1, "norm_eps": 1e-6, "norm_num_groups": 32, "out_channels": c["out_channels"],
        "resnet_time_scale_shift": "default", "sample_size": res, "time_embedding_type": "positional",
        "up_block_types": [t.replace("Down", "Up") for t in reversed(down)],
    }


def diffusers_state_dict(model: UNet) -> dict[str, torch.Tensor]:
    pairs = _ours_to_diffusers_names(model.num_levels)
    out = {}
    for name, tensor in model.state_dict().items():
        new = _rename(name, pairs, _LEAF)
        if _is_attn(name) and name.endswith(".weight") and tensor.ndim == 4:
            tensor = tensor[:, :, 0, 0]
        out[new] = tensor.detach().cpu().contiguous().clone()
    return out


def export_diffusers(model: UNet, out_dir: str | Path, scheduler_config: dict) -> Path:
    """Write a DDPMPipeline folder: model_index.json, unet/ (config + safetensors), scheduler/."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    (out / "unet").mkdir(parents=True, exist_ok=True)
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "unet" / "config.json").write_text(json.dumps(diffusers_unet_config(model), indent=2) + "\n")
    save_file(diffusers_state_dict(model), str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    sched = {"_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION, **scheduler_config}
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
    index = {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
             "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def scheduler_config_for(diffusion_cfg) -> dict:
    """diffusers' DDPMScheduler settings equal to a run's DiffusionConfig (refusing what it cannot express)."""
    d = diffusion_cfg
    schedules = {"linear": "linear", "quad": "scaled_linear", "cosine": "squaredcos_cap_v2"}
    if d.schedule not in schedules:
        raise ConversionError(f"diffusers' DDPMScheduler has no {d.schedule!r} beta schedule")
    variance = {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small", "learned_range": "learned_range"}[d.var_type]
    prediction = {"eps": "epsilon", "x0": "sample"}.get(d.mean_type)
    if prediction is None:
        raise ConversionError(f"diffusers' DDPMScheduler cannot use mean_type {d.mean_type!r}")
    return {"num_train_timesteps": d.num_timesteps, "beta_start": d.beta_start, "beta_end": d.beta_end,
            "beta_schedule": schedules[d.schedule], "variance_type": variance, "clip_sample": True,
            "clip_sample_range": 1.0, "prediction_type": prediction, "trained_betas": None}


# ---------------------------------------------------------------------------------------------- run directories


def write_run(source: str | Path, run_dir: str | Path, preset_name: str | None = None, step: int = 0,
              resolution: int | None = None, force: bool = False) -> Path:
    """Convert released weights into a run directory (config.json + a checkpoint whose raw and EMA weights
    are both the file's), so `ddpm sample` and the evaluations work on it unchanged. The diffusion settings
    come from the preset: fixedlarge for CIFAR-10, fixedsmall for the 256x256 models."""
    from ddpm.checkpoint import save_checkpoint
    from ddpm.config import preset

    source, run_dir = Path(source), Path(run_dir)
    if (run_dir / "config.json").exists() and not force:
        raise FileExistsError(f"{run_dir} already holds a run; pass --force to replace it")
    if source.is_dir():
        model, _ = load_diffusers_unet(source)
    else:
        model = load_port_state_dict(source, resolution=resolution)
    c = model.config
    name = preset_name or ("cifar10" if c["resolution"] == 32 else "lsun-church")
    cfg = preset(name)
    cfg.model.in_channels, cfg.model.ch, cfg.model.ch_mult = c["in_channels"], c["ch"], c["ch_mult"]
    cfg.model.num_res_blocks, cfg.model.attn_resolutions = c["num_res_blocks"], c["attn_resolutions"]
    cfg.model.resolution = c["resolution"]
    if c["out_channels"] == 2 * c["in_channels"]:
        cfg.diffusion.var_type, cfg.diffusion.loss_type = "learned_range", "hybrid"
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.json")
    sd = model.state_dict()
    tensors = {f"model/{k}": v for k, v in sd.items()} | {f"ema/{k}": v for k, v in sd.items()}
    state = {"format": 1, "step": step, "config": cfg.to_dict(), "optimizer": None, "converted_from": str(source)}
    return save_checkpoint(run_dir / "checkpoints", step, tensors, state, keep=1)
