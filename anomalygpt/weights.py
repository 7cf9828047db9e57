"""Save and load trained parts: `<stem>.safetensors` (tensors) beside `<stem>.json` (config), strictly checked."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from anomalygpt.backbones import WeightsError
from anomalygpt.io import file_sha256, write_bytes_atomic
from anomalygpt.state import remove_orphaned_temps

NAMES_SHOWN = 3  # keys named in a mismatch message before "..."
TENSORS_SHA256 = "safetensors_sha256"  # config key: sha256 of the tensor file saved with it


def module_paths(path_stem: str | Path) -> tuple[Path, Path]:
    """`<stem>.safetensors` and `<stem>.json`; the stem may itself contain dots (decoder.v2)."""
    stem = Path(path_stem)
    return stem.with_name(f"{stem.name}.safetensors"), stem.with_name(f"{stem.name}.json")


def save_module(path_stem: str | Path, state: Mapping[str, torch.Tensor], config: dict[str, Any]) -> tuple[Path, Path]:
    """Write the tensors and the config as a pair: both go to temp names first, then both are renamed, the config
    first. The config records the tensor file's sha256, so a kill between the two renames (new config, old
    tensors) is caught by load_module instead of pairing weights with another run's config."""
    tensors_path, config_path = module_paths(path_stem)
    if TENSORS_SHA256 in config:
        raise ValueError(f"{config_path}: config key {TENSORS_SHA256!r} is reserved for the pair's checksum")
    # Serialise both before touching the disk, so bad input leaves nothing behind.
    tensors = save_safetensors(_plain_tensors(state))
    checked = {**config, TENSORS_SHA256: hashlib.sha256(tensors).hexdigest()}
    payloads = {config_path: _json_bytes(checked, config_path), tensors_path: tensors}
    remove_orphaned_temps(tensors_path.parent, [tensors_path.name, config_path.name])  # left by a killed save
    temps = {path: path.with_name(f".{path.name}.{secrets.token_hex(6)}.pair") for path in payloads}
    try:
        for path, data in payloads.items():
            write_bytes_atomic(temps[path], data)
        for path, temp in temps.items():
            os.replace(temp, path)
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)
    return tensors_path, config_path


def _plain_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies; copies also untie shared storage, which safetensors refuses."""
    plain = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TypeError(f"state must map str to torch.Tensor; {key!r} holds {type(value).__name__}")
        plain[key] = value.detach().cpu().contiguous().clone()
    return plain


def _json_bytes(config: dict[str, Any], path: Path) -> bytes:
    try:
        text = json.dumps(config, indent=2, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: config is not plain JSON ({error})") from error
    return (text + "\n").encode("utf-8")


def load_module(
    path_stem: str | Path, expected_keys: set[str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors (on CPU) and config of a saved part; with expected_keys, any missing or extra key is an error.
    A config that records the tensor file's sha256 must match it (files saved before the checksum load as-is)."""
    tensors_path, config_path = module_paths(path_stem)
    data = _read_bytes(tensors_path, "weights")
    config = _read_config(config_path)
    state = _read_tensors(tensors_path, data)
    recorded = config.pop(TENSORS_SHA256, None)
    if recorded is not None and recorded != hashlib.sha256(data).hexdigest():
        raise WeightsError(
            f"{tensors_path}: not the tensor file {config_path.name} was saved with (sha256 differs): the pair is "
            "torn, e.g. by a save killed between its two renames; save or copy both files again"
        )
    if expected_keys is not None:
        check_keys(set(state), expected_keys, str(tensors_path))
    return state, config


def _read_bytes(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise WeightsError(f"{path}: {what} file not found")
    return path.read_bytes()


def _read_tensors(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(data)
    except SafetensorError as error:
        raise WeightsError(f"{path}: corrupt safetensors file ({_one_line(error)})") from error


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(_read_bytes(path, "config"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WeightsError(f"{path}: corrupt JSON config ({_one_line(error)})") from error
    if not isinstance(config, dict):
        raise WeightsError(f"{path}: config must be a JSON object, got {type(config).__name__}")
    return config


def check_keys(found: set[str], expected: set[str], where: str) -> None:
    """One-line WeightsError naming the first few missing and unexpected keys, if the sets differ."""
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise WeightsError(f"{where}: keys do not match: missing {_names(missing)}; unexpected {_names(unexpected)}")


def _names(keys: list[str]) -> str:
    return f"{len(keys)} ({_first_few(keys)})" if keys else "0"


def _first_few(items: list[str]) -> str:
    return ", ".join(items[:NAMES_SHOWN]) + (", ..." if len(items) > NAMES_SHOWN else "")


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], where: str = "weights") -> None:
    """load_state_dict(strict=True), with key and shape mismatches reported on one line."""
    target = module.state_dict()
    check_keys(set(state), set(target), where)
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in state.items() if v.shape != target[k].shape
    ]
    if wrong:
        raise WeightsError(f"{where}: {len(wrong)} shape mismatch(es), saved vs model: {_first_few(wrong)}")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise WeightsError(f"{where}: {_one_line(error)}") from error


def file_record(path: str | Path) -> dict[str, Any]:
    """sha256 and size of a file, for weights/MANIFEST.json."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: file not found")
    return {"sha256": file_sha256(path), "size_bytes": path.stat().st_size}


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
