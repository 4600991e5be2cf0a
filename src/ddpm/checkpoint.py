"""Crash-safe checkpoints.

Layout: `ckpt_root/step_000001000/` holds `tensors.safetensors` (every tensor: weights, EMA, optimizer
moments, RNG states), `state.json` (plain JSON: step, configuration, counters, the optimizer's non-tensor
skeleton) and `MANIFEST.json`, written last (format version, step, each file's size and sha256).

How a save survives a crash at any instant (kill -9, power loss, a full disk):

1. everything is serialised in memory first, so a bad tensor or state writes nothing;
2. the files go into `ckpt_root/.tmp-step_000001000-<pid>/`, each through a temporary file beside it that is
   fsync'd and renamed, the folder fsync'd after each rename; the manifest comes last;
3. the folder is renamed to `step_000001000` and `ckpt_root` fsync'd. Re-saving a step first renames the old
   folder aside (`.old-step_000001000-<pid>`), which readers still accept until the new one is in place;
4. only then are older checkpoints removed (renamed out of sight first, then deleted).

A folder without a readable manifest is never loaded, and the step always comes from the manifest, never from
a folder's name. The next save cleans up after a killed one. Nothing here executes code from a file:
safetensors and JSON only, and `weights_only=True` for foreign PyTorch files.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
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
_TMP = ".tmp-"  # something being written or deleted; removed by the next save once its process is gone
_ASIDE = ".old-"  # a complete checkpoint moved aside while a re-save of its step takes its place
_GUARDED = ("model/", "ema/")  # tensors that must be finite to be saved
_NAMED = 5  # how many offending names an error message lists


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names its path."""


@dataclass
class Checkpoint:
    """A loaded checkpoint."""

    step: int  # from the manifest, never from the folder's name
    tensors: dict[str, torch.Tensor]  # every stored tensor, on the CPU
    state: dict[str, Any]  # the contents of state.json
    path: Path  # the checkpoint folder


def _folder_name(step: int) -> str:
    return f"{_PREFIX}{step:09d}"


def _listing(names: list[str]) -> str:
    more = f" ... ({len(names)} in all)" if len(names) > _NAMED else ""
    return ", ".join(names[:_NAMED]) + more


# ---------------------------------------------------------------------------------------------- writing


def _fsync_dir(path: Path) -> None:
    """Make renames and new entries in the folder durable (a file's own fsync does not cover its name)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    """Write data through a temporary file beside `path`: written, flushed, fsync'd, renamed, folder fsync'd."""
    tmp = path.with_name(f"{_TMP}{path.name}-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _for_safetensors(target: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that share no memory: safetensors refuses views and tensors sharing storage."""
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, value in tensors.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"cannot write {target}: entry {key!r} is a {type(value).__name__}, "
                                  "not a tensor under a string key")
        try:
            t = value.detach().to("cpu").contiguous()
        except (RuntimeError, NotImplementedError) as e:  # a meta or sparse tensor, say
            raise CheckpointError(f"cannot write {target}: tensor {key} cannot be copied to the CPU: {e}") from None
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        if ptr:  # empty tensors have no storage to share
            storages.add(ptr)
        out[key] = t
    return out


def _serialise(target: Path, step: int, tensors: dict[str, torch.Tensor], state: dict) -> dict[str, bytes]:
    """The checkpoint's files as bytes, before anything touches the disk."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"cannot write {target}: the step must be an int >= 0, not {step!r}")
    if not isinstance(tensors, dict) or not isinstance(state, dict):
        raise CheckpointError(f"cannot write {target}: tensors and state must be dicts")
    cpu = _for_safetensors(target, tensors)
    bad = [k for k, v in cpu.items()
           if k.startswith(_GUARDED) and (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"refusing to write {target}: non-finite values in {_listing(bad)}")
    try:
        blob = st_save(cpu)
    except Exception as e:  # safetensors' own error types: an unsupported dtype, say
        raise CheckpointError(f"cannot write {target}: safetensors refused the tensors: {e}") from None
    try:
        text = json.dumps({**state, "step": step}, indent=1)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot write {target}: the state is not plain JSON ({e}); "
                              "store tensors in `tensors` (see flatten_state)") from None
    return {TENSORS: blob, STATE: (text + "\n").encode()}


def _pid_alive(pid: int | None) -> bool:
    if pid is None or pid == os.getpid():  # our own leftovers are never in progress
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _owner(name: str) -> int | None:
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _recover(root: Path) -> None:
    """Clean up after saves killed midway: put back a checkpoint moved aside whose replacement never arrived,
    delete temporary folders. Leftovers of live processes (another saver) are left alone."""
    changed = False
    for p in sorted(root.iterdir()):
        if not p.name.startswith((_TMP, _ASIDE)) or _pid_alive(_owner(p.name)):
            continue
        if p.name.startswith(_ASIDE):
            original = root / p.name[len(_ASIDE):].rsplit("-", 1)[0]
            if not original.exists():
                os.replace(p, original)
                changed = True
                continue
        _discard(p)
        changed = True
    if changed:
        _fsync_dir(root)


def _discard(path: Path) -> None:
    """Delete a folder so that no reader ever sees half of it: rename it out of sight first."""
    if not path.name.startswith(_TMP):
        hidden = path.with_name(f"{_TMP}del-{path.name}-{os.getpid()}")
        try:
            os.replace(path, hidden)
            path = hidden
        except OSError:  # delete in place, the manifest first so that the folder stops counting at once
            (path / MANIFEST).unlink(missing_ok=True)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def save_checkpoint(ckpt_root: str | Path, step: int, tensors: dict[str, torch.Tensor], state: dict,
                    keep: int = 3) -> Path:
    """Write checkpoint `step` atomically under ckpt_root and keep the newest `keep` (<= 0: all).

    tensors: name -> tensor (any device, views and shared storage allowed); keys under "model/" and "ema/" must
    be finite. state: plain JSON; its "step" is set to `step`. Returns the checkpoint folder. The one just
    written is never pruned, even when older folders hold higher steps.

    Raises CheckpointError: a non-finite model/EMA tensor or a state that is not JSON (nothing is written), or
    an OSError while writing (the message says "disk full?" for ENOSPC/EDQUOT) - then no partial folder is
    left and the earlier checkpoints are as they were."""
    root = Path(ckpt_root)
    name = _folder_name(step) if isinstance(step, int) else str(step)
    target = root / name
    files = _serialise(target, step, tensors, state)
    manifest = {"format": FORMAT_VERSION, "step": step,
                "files": {n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()}}
    tmp = root / f"{_TMP}{name}-{os.getpid()}"
    aside = root / f"{_ASIDE}{name}-{os.getpid()}"
    moved_aside = committed = False
    try:
        if not root.is_dir():
            root.mkdir(parents=True)
            _fsync_dir(root.parent)
        _recover(root)
        tmp.mkdir()
        for fname, data in files.items():
            _write_file(tmp / fname, data)
        _write_file(tmp / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())  # last: marks completion
        if target.exists():  # a re-save of this step: the old folder stays readable aside until the swap
            os.replace(target, aside)
            moved_aside = True
        os.replace(tmp, target)
        committed = True
        _fsync_dir(root)
    except BaseException as e:
        _roll_back(root, tmp, target, aside, moved_aside, committed)
        if isinstance(e, OSError):
            hint = " (disk full?)" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
            raise CheckpointError(f"could not write checkpoint {target}{hint}: {e}; "
                                  "the earlier checkpoints are as they were") from e
        raise
    # The new checkpoint is complete and durable: what follows is housekeeping and cannot undo it.
    try:
        if moved_aside:
            _discard(aside)
        if keep > 0:
            older = [p for _, p in _scan(root)[0] if p != target]
            for p in older[:max(0, len(older) - (keep - 1))]:
                _discard(p)
    except OSError as e:
        warnings.warn(f"checkpoint {target} is complete, but removing old checkpoints failed: {e}", stacklevel=2)
    return target


def _roll_back(root: Path, tmp: Path, target: Path, aside: Path, moved_aside: bool, committed: bool) -> None:
    """Undo a failed save: the new folder goes, the old one of the same step comes back. Best effort: what a
    second failure leaves behind, the next save's `_recover` and the readers' fallback to aside folders handle."""
    try:
        if committed:
            os.replace(target, tmp)
        if moved_aside:
            os.replace(aside, target)
    except OSError:
        pass
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _fsync_dir(root)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------- reading


def _read_manifest(path: Path) -> dict:
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint: {MANIFEST} is missing")
    try:
        manifest = json.loads(mpath.read_text())
        step, files = manifest["step"], manifest["files"]
        ok = isinstance(step, int) and not isinstance(step, bool) and step >= 0 and all(
            isinstance(files[n]["size"], int) and isinstance(files[n]["sha256"], str) for n in (TENSORS, STATE))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"unreadable manifest {mpath}: {e!r}") from None
    if not ok:
        raise CheckpointError(f"unreadable manifest {mpath}: bad step or file entries")
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{mpath}: unsupported checkpoint format {manifest.get('format')!r}")
    return manifest


def _scan(root: Path) -> tuple[list[tuple[int, Path]], list[tuple[int, Path]], list[str]]:
    """(complete checkpoints, complete folders set aside by a re-save, incomplete folder names); by step."""
    found, aside, incomplete = [], [], []
    for p in root.iterdir():
        hidden = p.name.startswith(".")
        if not p.is_dir() or (hidden and not p.name.startswith(_ASIDE)):
            continue
        try:
            entry = (_read_manifest(p)["step"], p)
        except CheckpointError:
            if not hidden:
                incomplete.append(p.name)
            continue
        (aside if hidden else found).append(entry)
    return sorted(found), sorted(aside), sorted(incomplete)


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Complete checkpoints (with a readable manifest) under ckpt_root, by ascending step from the manifest.

    Folders without one are skipped with a warning that names them. A checkpoint that a re-save of its step
    moved aside counts while no folder holds that step (a save killed between its two renames)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found, aside, incomplete = _scan(root)
    if incomplete:
        warnings.warn(f"ignoring incomplete checkpoint folder(s) in {root} (no readable {MANIFEST}): "
                      f"{_listing(incomplete)}", stacklevel=2)
    steps = {s for s, _ in found}
    found += [(s, p) for s, p in aside if s not in steps]
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step (read from its manifest), or None."""
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def load_checkpoint(path: str | Path, verify: bool = True) -> Checkpoint:
    """Read a checkpoint folder. With verify, every file's size and sha256 must match the manifest.

    Any damage (a missing manifest or file, a size or checksum mismatch, an unparsable file, a state whose step
    disagrees with the manifest) is a CheckpointError naming the file."""
    path = Path(path)
    manifest = _read_manifest(path)
    blobs = {}
    for name in (TENSORS, STATE):
        fpath = path / name
        try:
            data = fpath.read_bytes()
        except OSError as e:
            raise CheckpointError(f"cannot read {fpath}: {e.strerror or e}") from None
        want = manifest["files"][name]
        if verify and len(data) != want["size"]:
            raise CheckpointError(f"{fpath} is truncated or damaged: size mismatch, {len(data)} bytes where "
                                  f"{path / MANIFEST} says {want['size']}")
        if verify and hashlib.sha256(data).hexdigest() != want["sha256"]:
            raise CheckpointError(f"{fpath} is corrupt: sha256 checksum mismatch with {path / MANIFEST}")
        blobs[name] = data
    try:
        tensors = st_load(blobs[TENSORS])
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"cannot parse {path / TENSORS} as safetensors: {e}") from None
    try:
        state = json.loads(blobs[STATE])
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"cannot parse {path / STATE} as JSON: {e}") from None
    if not isinstance(state, dict) or state.get("step", manifest["step"]) != manifest["step"]:
        raise CheckpointError(f"{path / STATE} does not match {path / MANIFEST} (not a dict, or another step)")
    return Checkpoint(step=manifest["step"], tensors=tensors, state=state, path=path)


# ---------------------------------------------------------------------------------------------- nested state

# Skeleton placeholders (JSON objects with one of these keys stand for what JSON cannot hold directly):
_TENSOR = "__tensor__"  # {"__tensor__": key}: the tensor stored under `key`
_INT_KEYS = "__int_keys__"  # {"__int_keys__": {"0": ...}}: a dict whose keys are all ints (optimizer state)
_ITEMS = "__items__"  # {"__items__": [[key, value], ...]}: any other dict whose keys are not plain strings
_LIST = "__list__"  # {"__list__": [...], "__tuple__": bool}: a list or tuple
_TUPLE = "__tuple__"
_MARKERS = {_TENSOR, _INT_KEYS, _ITEMS, _LIST, _TUPLE}
_SCALARS = (type(None), bool, int, float, str)


def flatten_state(obj: Any, prefix: str) -> tuple[dict[str, torch.Tensor], Any]:
    """Split nested state (dicts, lists, tuples, scalars and tensors, e.g. an optimizer's state_dict) into
    (tensors under `prefix`, a JSON-able skeleton). `unflatten_state` inverts it exactly: tensors come back
    under their places, tuples as tuples, int (or bool, float, None) dict keys with their types.

    A tensor at obj[a][b] is stored as f"{prefix}/{a}/{b}". Raises CheckpointError for any other type, or when
    two places would share a tensor key (string keys with a "/")."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(o: Any, path: str) -> Any:
        if isinstance(o, torch.Tensor):
            if path in tensors:
                raise CheckpointError(f"two places in the state map to the tensor key {path}")
            tensors[path] = o
            return {_TENSOR: path}
        if isinstance(o, dict):
            keys = list(o)
            if keys and all(type(k) is int for k in keys):
                return {_INT_KEYS: {str(k): walk(v, f"{path}/{k}") for k, v in o.items()}}
            if all(type(k) is str for k in keys) and not _MARKERS & set(keys):
                return {k: walk(v, f"{path}/{k}") for k, v in o.items()}
            bad = [k for k in keys if not isinstance(k, _SCALARS)]
            if bad:
                raise CheckpointError(f"cannot store the dict key {bad[0]!r} at {path} in a checkpoint")
            return {_ITEMS: [[k, walk(v, f"{path}/{k}")] for k, v in o.items()]}
        if isinstance(o, (list, tuple)):
            return {_LIST: [walk(v, f"{path}/{i}") for i, v in enumerate(o)], _TUPLE: isinstance(o, tuple)}
        if isinstance(o, _SCALARS):
            return o
        raise CheckpointError(f"cannot store a {type(o).__name__} at {path} in a checkpoint")

    return tensors, walk(obj, prefix)


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton: Any, prefix: str) -> Any:
    """The inverse of `flatten_state`: rebuild the nested state from the skeleton and the stored tensors.

    Raises CheckpointError when a placeholder names a tensor that is missing or lies outside `prefix`."""

    def walk(o: Any) -> Any:
        if isinstance(o, list):  # flatten_state wraps lists; a bare one is left as it is, items rebuilt
            return [walk(v) for v in o]
        if not isinstance(o, dict):
            return o
        if _TENSOR in o:
            key = o[_TENSOR]
            if not isinstance(key, str) or not (key == prefix or key.startswith(prefix + "/")):
                raise CheckpointError(f"the {prefix} skeleton points outside {prefix}/: {key!r}")
            if key not in tensors:
                raise CheckpointError(f"the checkpoint lacks tensor {key}")
            return tensors[key]
        if _INT_KEYS in o:
            return {int(k): walk(v) for k, v in o[_INT_KEYS].items()}
        if _ITEMS in o:
            return {k: walk(v) for k, v in o[_ITEMS]}
        if _LIST in o:
            items = [walk(v) for v in o[_LIST]]
            return tuple(items) if o.get(_TUPLE) else items
        return {k: walk(v) for k, v in o.items()}

    return walk(skeleton)


# ---------------------------------------------------------------------------------------------- foreign files


def safe_torch_load(path: str | Path) -> Any:
    """Load a foreign PyTorch file (torch.save) onto the CPU without executing code from it.

    Uses `weights_only=True`, which is safe from torch 2.6 on (CheckpointError on older versions). A file whose
    pickle names anything but tensors and plain containers is a CheckpointError naming the path; a missing file
    is a FileNotFoundError."""
    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    if m is None or (int(m[1]), int(m[2])) < (2, 6):
        raise CheckpointError(f"refused to load {path}: safe loading (weights_only) needs torch >= 2.6, "
                              f"this is {torch.__version__}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        # torch's message opens with advice to retry with weights_only=False: keep only what was refused
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if ln.startswith(("Trying to load", "Unsupported"))), "unpickling error")
        raise CheckpointError(f"refused {path}: the file tries to load code or objects other than tensors and "
                              f"plain containers, or is no PyTorch file ({detail})") from None
    except Exception as e:  # torch's zip reader, a truncated file, ...
        raise CheckpointError(f"cannot read {path} as a PyTorch file: {e}") from None
