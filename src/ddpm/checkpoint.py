"""Crash-safe checkpoints.

Layout: `ckpt_root/step_000001000/` holds `tensors.safetensors` (every tensor: weights, EMA, optimizer
moments), `state.json` (plain JSON: step, configuration, counters, the optimizer's non-tensor skeleton) and
`MANIFEST.json`, written last (format version, step, each file's size and sha256). A checkpoint is written
into a temporary folder beside its target, every file fsync'd, then renamed into place and the parent folder
fsync'd; a folder without a manifest is never loaded. Old checkpoints go only after the new one is complete.
Nothing here executes code from a file: safetensors and JSON only, and `weights_only=True` for foreign
PyTorch files.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT_VERSION = 1
MANIFEST, TENSORS, STATE = "MANIFEST.json", "tensors.safetensors", "state.json"
_PREFIX = "step_"
_GUARDED = ("model/", "ema/")  # tensors that must be finite to be saved


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names its path."""


@dataclass
class Checkpoint:
    step: int
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]
    path: Path


# ---------------------------------------------------------------------------------------------- writing


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> str:
    """Write bytes to path (a temp file beside it, fsync'd, renamed); returns the sha256."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def _folder_name(step: int) -> str:
    return f"{_PREFIX}{step:09d}"


def save_checkpoint(ckpt_root: str | Path, step: int, tensors: dict[str, torch.Tensor], state: dict,
                    keep: int = 3) -> Path:
    """Write checkpoint `step` atomically under ckpt_root and keep the newest `keep` (<= 0: all).

    Raises CheckpointError, writing nothing, when a model or EMA tensor is not finite; on an OSError (a
    full disk, say) the partial folder is removed and the previous checkpoints stay as they were."""
    root = Path(ckpt_root)
    bad = [k for k, v in tensors.items() if k.startswith(_GUARDED) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"refusing to write {root / _folder_name(step)}: non-finite values in {', '.join(bad[:5])}")
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    target = root / _folder_name(step)
    tmp = root / f".tmp-{_folder_name(step)}-{os.getpid()}"
    try:
        tmp.mkdir()
        blob = st_save({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()})
        state = {**state, "step": int(step)}
        files = {TENSORS: blob, STATE: (json.dumps(state, indent=1) + "\n").encode()}
        manifest = {"format": FORMAT_VERSION, "step": int(step), "files": {}}
        for name, data in files.items():
            manifest["files"][name] = {"size": len(data), "sha256": _write_file(tmp / name, data)}
        _write_file(tmp / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
        _fsync_dir(tmp)
        if target.exists():  # re-saving a step: swap the old folder out only once the new one is complete
            old = root / f".tmp-old-{_folder_name(step)}-{os.getpid()}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        hint = " (disk full?)" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise CheckpointError(f"could not write checkpoint {target}{hint}: {e}; earlier checkpoints are intact") from e
    if keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------- reading


def _read_manifest(path: Path) -> dict:
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint: {MANIFEST} is missing")
    try:
        manifest = json.loads(mpath.read_text())
        int(manifest["step"])
        manifest["files"][TENSORS], manifest["files"][STATE]  # noqa: B018 - presence check
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"unreadable manifest {mpath}: {e}") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{mpath}: unsupported checkpoint format {manifest.get('format')!r}")
    return manifest


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Complete checkpoints (with a readable manifest) under ckpt_root, by ascending step from the manifest."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found, incomplete = [], []
    for p in root.iterdir():
        if not p.is_dir() or p.name.startswith("."):
            continue
        try:
            found.append((int(_read_manifest(p)["step"]), p))
        except CheckpointError:
            incomplete.append(p.name)
    if incomplete:
        warnings.warn(f"ignoring incomplete checkpoint folder(s) in {root}: {', '.join(sorted(incomplete))}", stacklevel=2)
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step (read from its manifest), or None."""
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def load_checkpoint(path: str | Path, verify: bool = True) -> Checkpoint:
    """Read a checkpoint folder; with verify, sizes and sha256 must match the manifest. Any damage is a
    CheckpointError naming the file."""
    path = Path(path)
    manifest = _read_manifest(path)
    blobs = {}
    for name in (TENSORS, STATE):
        fpath = path / name
        try:
            data = fpath.read_bytes()
        except OSError as e:
            raise CheckpointError(f"cannot read {fpath}: {e}") from None
        want = manifest["files"][name]
        if verify and (len(data) != want["size"] or hashlib.sha256(data).hexdigest() != want["sha256"]):
            raise CheckpointError(f"{fpath} is corrupt: its size or checksum differs from {path / MANIFEST} "
                                  f"({len(data)} bytes, expected {want['size']})")
        blobs[name] = data
    try:
        tensors = st_load(blobs[TENSORS])
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"cannot parse {path / TENSORS}: {e}") from None
    try:
        state = json.loads(blobs[STATE])
    except ValueError as e:
        raise CheckpointError(f"cannot parse {path / STATE}: {e}") from None
    return Checkpoint(step=int(manifest["step"]), tensors=tensors, state=state, path=path)


# ---------------------------------------------------------------------------------------------- nested state


def flatten_state(obj: Any, prefix: str) -> tuple[dict[str, torch.Tensor], Any]:
    """Nested dicts/lists holding tensors (an optimizer's state_dict) -> (flat tensors under prefix,
    a JSON skeleton). Tensors become {"__tensor__": key}; int dict keys are kept as {"__int_keys__": ...}."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(o: Any, path: str) -> Any:
        if isinstance(o, torch.Tensor):
            tensors[path] = o
            return {"__tensor__": path}
        if isinstance(o, dict):
            int_keys = all(isinstance(k, int) for k in o) and len(o) > 0
            body = {str(k): walk(v, f"{path}/{k}") for k, v in o.items()}
            return {"__int_keys__": body} if int_keys else body
        if isinstance(o, (list, tuple)):
            return {"__list__": [walk(v, f"{path}/{i}") for i, v in enumerate(o)], "__tuple__": isinstance(o, tuple)}
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        raise CheckpointError(f"cannot store {type(o).__name__} at {path} in a checkpoint")

    return tensors, walk(obj, prefix)


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton: Any, prefix: str) -> Any:
    """The inverse of `flatten_state`."""

    def walk(o: Any) -> Any:
        if isinstance(o, dict):
            if "__tensor__" in o:
                key = o["__tensor__"]
                if key not in tensors:
                    raise CheckpointError(f"checkpoint lacks tensor {key}")
                return tensors[key]
            if "__int_keys__" in o:
                return {int(k): walk(v) for k, v in o["__int_keys__"].items()}
            if "__list__" in o:
                items = [walk(v) for v in o["__list__"]]
                return tuple(items) if o.get("__tuple__") else items
            return {k: walk(v) for k, v in o.items()}
        return o

    if not (isinstance(skeleton, (dict, list)) or skeleton is None):
        raise CheckpointError(f"bad state skeleton for {prefix}")
    return walk(skeleton)


# ---------------------------------------------------------------------------------------------- foreign files


def safe_torch_load(path: str | Path) -> Any:
    """Load a foreign PyTorch file without executing code: `weights_only=True` (safe from torch 2.6)."""
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 6):
        raise CheckpointError(f"loading {path} safely needs torch >= 2.6 (weights_only); this is {torch.__version__}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise CheckpointError(f"refused {path}: it is not a plain tensor file (it may try to load code): {e}") from None
