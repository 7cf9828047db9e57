"""Presets: named JSON files (anomalygpt/presets/*.json) parsed strictly into typed configs."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from anomalygpt.assistant import AssistantConfig
from anomalygpt.backbones import BackboneConfig
from anomalygpt.calibration import CalibrationConfig
from anomalygpt.decoder import DecoderConfig
from anomalygpt.llm import LLMConfig
from anomalygpt.memory import MemoryConfig
from anomalygpt.text import TextConfig

PRESET_DIR = Path(__file__).parent / "presets"
DEFAULT_PRESET = "default"

T = TypeVar("T")


class ConfigError(ValueError):
    """A preset is missing, malformed, or names an unknown option."""


@dataclass(frozen=True)
class Preset:
    name: str
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    text: TextConfig = field(default_factory=TextConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    assistant: AssistantConfig = field(default_factory=AssistantConfig)
    device: str = "cpu"  # "cpu", "cuda", "cuda:1"...


def known_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def preset_path(name_or_path: str) -> Path:
    """A preset name from anomalygpt/presets or a path to a JSON file."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise ConfigError(f"preset file not found: {path}")
        return path
    if name_or_path not in known_presets():
        raise ConfigError(f"unknown preset {name_or_path!r}; known: {', '.join(known_presets())} (or a .json path)")
    return PRESET_DIR / f"{name_or_path}.json"


def load_preset(name_or_path: str = DEFAULT_PRESET) -> Preset:
    path = preset_path(name_or_path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: not a readable JSON preset ({error})") from error
    data.setdefault("name", path.stem)
    return from_dict(Preset, data, where=str(path))


def from_dict(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass `cls` from plain JSON data; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    values = {key: convert(hints[key], value, f"{where}:{key}") for key, value in data.items()}
    return cls(**values)


def convert(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)  # type: ignore[arg-type]
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(convert(typing.get_args(hint)[0], v, where) for v in value)
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(hint, type) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
    return value


def to_dict(preset: Preset) -> dict[str, Any]:
    return dataclasses.asdict(preset)
