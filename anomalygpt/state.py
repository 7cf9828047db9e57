"""Checkpoints and caches as one safetensors file each: tensors, plus their nesting and plain values as JSON.

A state is any tree of dicts, lists, tuples, tensors and plain values (str, int, float, bool, None): a model's
and an optimizer's state_dict, RNG states, histories. The tensors go into the safetensors body, the tree (with
each tensor replaced by a reference to it) into the header's metadata as JSON. Nothing is ever unpickled, so a
file planted in a run folder cannot run code: at worst it is refused with a one-line StateError. One file per
state means one atomic rename per save.

Runs also clean up after a kill: `remove_orphaned_temps` deletes the temp files that this project's atomic
writers (anomalygpt.io, anomalygpt.weights, save_assistant) leave behind when a process dies mid-write.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors

from anomalygpt.io import write_bytes_atomic

log = logging.getLogger(__name__)

STATE_FORMAT = "anomalygpt-state/1"
# Markers in the JSON tree; a dict whose keys are not all plain strings is stored as a DICT list of pairs.
TENSOR, TUPLE, DICT, FLOAT = "$tensor", "$tuple", "$dict", "$float"
NON_FINITE = ("nan", "inf", "-inf")
TEMP_TOKEN = "[0-9a-f]{12}"  # secrets.token_hex(6), as every atomic writer here names its temps


class StateError(ValueError):
    """A state file is missing, corrupt or not one this project wrote; the message is one line."""


def save_state(path: str | Path, tree: Any) -> Path:
    """Write tree atomically as one safetensors file; TypeError (nothing written) on a value it cannot hold."""
    return write_bytes_atomic(path, state_bytes(tree))


def state_bytes(tree: Any) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(tree, tensors, set())
    metadata = {"format": STATE_FORMAT, "tree": json.dumps(skeleton, allow_nan=False, separators=(",", ":"))}
    return save_safetensors(tensors, metadata=metadata)


def load_state(path: str | Path, *, with_tensors: bool = True) -> Any:
    """The tree saved at path (tensors on the CPU); StateError when it is not a state file (never unpickled).

    with_tensors=False reads the header alone and leaves None where each tensor was."""
    path = Path(path)
    if not path.is_file():
        raise StateError(f"{path}: state file not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != STATE_FORMAT:
                raise StateError(f"{path}: not a state file written by anomalygpt (format {metadata.get('format')!r})")
            tensors = {key: handle.get_tensor(key) if with_tensors else None for key in handle.keys()}  # noqa: SIM118
        return _decode(json.loads(metadata["tree"]), tensors)
    except StateError:
        raise
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as error:
        if path.stat().st_size == 0:
            raise StateError(f"{path}: an empty file, not a state file") from error
        raise StateError(
            f"{path}: not a readable state file (cut short, or not written by anomalygpt: {_one_line(error)})"
        ) from error


def load_cache(path: str | Path) -> Any | None:
    """The tree of a cache file; None when there is none, or (with a one-line note) when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return load_state(path)
    except StateError as error:
        log.warning("%s; computing it again", error)
        return None


def note_ignored_pickles(folder: str | Path, names: Iterable[str], consequence: str) -> None:
    """One note per old pickle-format file found: it is never loaded, since unpickling a file can run code."""
    for name in names:
        path = Path(folder) / name
        if path.exists():
            log.warning("%s: old pickle format, not loaded (unpickling can run code); %s", path, consequence)


def _encode(value: Any, tensors: dict[str, torch.Tensor], storages: set[int]) -> Any:
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = _own_storage(value, storages)
        return {TENSOR: key}
    if isinstance(value, np.generic):
        return _encode(value.item(), tensors, storages)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {FLOAT: repr(value)}
    if isinstance(value, tuple):
        return {TUPLE: [_encode(item, tensors, storages) for item in value]}
    if isinstance(value, list):
        return [_encode(item, tensors, storages) for item in value]
    if isinstance(value, Mapping):
        if all(isinstance(key, str) and not key.startswith("$") for key in value):
            return {key: _encode(item, tensors, storages) for key, item in value.items()}
        return {DICT: [[_encode(k, tensors, storages), _encode(v, tensors, storages)] for k, v in value.items()]}
    raise TypeError(f"a state file cannot hold a {type(value).__name__}")


def _own_storage(tensor: torch.Tensor, storages: set[int]) -> torch.Tensor:
    """A detached CPU tensor that owns its whole storage (safetensors refuses views and shared storage)."""
    tensor = tensor.detach().cpu()
    storage = tensor.untyped_storage()
    whole = tensor.is_contiguous() and tensor.storage_offset() == 0
    if not whole or storage.nbytes() != tensor.numel() * tensor.element_size() or storage.data_ptr() in storages:
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        storage = tensor.untyped_storage()
    if tensor.numel():
        storages.add(storage.data_ptr())
    return tensor


def _decode(node: Any, tensors: dict[str, torch.Tensor | None]) -> Any:
    if isinstance(node, list):
        return [_decode(item, tensors) for item in node]
    if not isinstance(node, dict):
        return node
    if len(node) == 1:
        ((marker, content),) = node.items()
        if marker == TENSOR:
            return tensors[content]
        if marker == TUPLE:
            return tuple(_decode(item, tensors) for item in content)
        if marker == DICT:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in content}
        if marker == FLOAT and content in NON_FINITE:
            return float(content)
    if any(key.startswith("$") for key in node):
        raise ValueError(f"unknown marker in {sorted(node)[:3]}")
    return {key: _decode(item, tensors) for key, item in node.items()}


def remove_orphaned_temps(folder: str | Path, names: Iterable[str]) -> list[Path]:
    """Delete the temp files (and save_assistant's temp folders) that writers of `names` in folder left behind
    when killed mid-write; the paths removed. Only this project's temp naming is matched, nothing else."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    patterns = [_temp_pattern(name) for name in names]
    removed = []
    for entry in sorted(folder.iterdir()):
        if any(pattern.fullmatch(entry.name) for pattern in patterns):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _temp_pattern(name: str) -> re.Pattern[str]:
    """`.NAME.<token>.tmp` (io's atomic writes, save_assistant's folder), `.NAME.<token>.pair` (a weights pair's
    staged half) and `..NAME.<token>.pair.<token>.tmp` (that half being written)."""
    plain = re.escape(name)
    return re.compile(rf"\.{plain}\.{TEMP_TOKEN}\.(tmp|pair)|\.\.{plain}\.{TEMP_TOKEN}\.pair\.{TEMP_TOKEN}\.tmp")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
