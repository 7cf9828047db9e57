"""Presets: named JSON files (anomalygpt/presets/*.json) parsed strictly into typed configs.

Every field is checked in one place: its JSON type against the dataclass annotation (floats must be finite), then
its value against FIELD_RULES, the table of allowed values of every config dataclass. A new numeric field
declares its range there (tests/test_config.py fails until it does).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from anomalygpt.assistant import AssistantConfig
from anomalygpt.backbones import BACKBONES, BackboneConfig
from anomalygpt.calibration import MAX_FALSE_ALARM_RATE, CalibrationConfig
from anomalygpt.decoder import DecoderConfig
from anomalygpt.devices import DEVICE_PATTERN, gpus_lacking, resolve_device
from anomalygpt.llm import DTYPES, LLMConfig, LoraConfig
from anomalygpt.memory import THINNINGS, MemoryConfig
from anomalygpt.prompt_learner import PromptLearnerConfig
from anomalygpt.text import TEXT_ENCODERS, TextConfig

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
    device: str = "auto"  # "auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:1"...; resolved by load_preset


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


def with_false_alarm_rate(preset: Preset, rate: float | None) -> Preset:
    """The preset with a profile's own false-alarm rate (fit's --false-alarm-rate, the service's false_alarm_rate,
    range-checked there) in its calibration; None keeps the preset's."""
    if rate is None:
        return preset
    return dataclasses.replace(preset, calibration=dataclasses.replace(preset.calibration, false_alarm_rate=rate))


def load_preset(name_or_path: str = DEFAULT_PRESET) -> Preset:
    """The preset, every field checked (ConfigError naming the file, the field and its allowed values)."""
    path = preset_path(name_or_path)
    try:
        data = json.loads(path.read_text())
    except RecursionError as error:
        raise ConfigError(f"{path}: not a readable JSON preset (nested too deeply)") from error
    except (OSError, ValueError) as error:  # JSONDecodeError, UnicodeDecodeError, an over-long integer
        raise ConfigError(f"{path}: not a readable JSON preset ({' '.join(str(error).split())})") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a preset is a JSON object {{...}}, got {json_type(data)}")
    preset = from_dict(Preset, {"name": path.stem, **data}, where=str(path))
    return dataclasses.replace(preset, device=resolve_device(preset.device))


def json_type(value: Any) -> str:
    """The JSON name of a parsed JSON value's type."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def from_dict(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass `cls` from plain JSON data; unknown keys, wrong types and values out of range raise."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object for {cls.__name__}, got {json_type(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    values = {key: convert(hints[key], value, f"{where}:{key}") for key, value in data.items()}
    config = cls(**values)
    check_fields(config, where)
    return config


def convert(hint: Any, value: Any, where: str) -> Any:
    """A JSON value as the annotated type: nested dataclasses built, lists made tuples, ints widened to float."""
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)  # type: ignore[arg-type]
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {short_repr(value)}")
        return tuple(convert(typing.get_args(hint)[0], v, where) for v in value)
    if origin in (typing.Union, types.UnionType):
        return convert_optional(hint, value, where)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return finite_float(value, where)
    if isinstance(hint, type) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {short_repr(value)}")
    return value


def convert_optional(hint: Any, value: Any, where: str) -> Any:
    """`X | None` (the only unions configs use): null, or a value converted as X."""
    options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if value is None and len(options) < len(typing.get_args(hint)):
        return None
    if len(options) != 1:
        raise TypeError(f"{where}: configs may only use `X | None` unions, not {hint}")
    return convert(options[0], value, where)


def finite_float(value: float, where: str) -> float:
    try:
        number = float(value)
    except OverflowError:  # an integer with hundreds of digits
        number = math.inf
    if not math.isfinite(number):
        raise ConfigError(f"{where}: must be a finite number, got {short_repr(value)}")
    return number


def short_repr(value: Any) -> str:
    """repr cut to 60 characters: a hostile preset may hold a megabyte-long value."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


# --- allowed values -------------------------------------------------------------------------------


class Rule(Protocol):
    def problem(self, value: Any) -> str | None:
        """None when value is allowed, else what is wrong, saying what is allowed."""


def number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e16 else f"{value:g}"


@dataclass(frozen=True)
class Range:
    """Numbers from low to high (either end excluded when open); odd integers only when odd."""

    low: float
    high: float
    open_low: bool = False
    open_high: bool = False
    odd: bool = False

    def problem(self, value: Any) -> str | None:
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        if above and below and not (self.odd and value % 2 != 1):
            return None
        return f"must be {self.describe()}, got {short_repr(value)}"

    def describe(self) -> str:
        low, high = number_text(self.low), number_text(self.high)
        if not (self.open_low or self.open_high):
            span = f"from {low} to {high}"
        else:
            lower = f"above {low}" if self.open_low else f"at least {low}"
            upper = f"below {high}" if self.open_high else f"at most {high}"
            span = f"{lower} and {upper}"
        return f"{'an odd number' if self.odd else 'a number'} {span}"


@dataclass(frozen=True)
class OneOf:
    """One of a fixed set of names."""

    names: tuple[str, ...]

    def problem(self, value: Any) -> str | None:
        return None if value in self.names else f"unknown {short_repr(value)}; known: {', '.join(self.names)}"


@dataclass(frozen=True)
class Items:
    """A list of at least min_items values, each allowed by item (None: any value of the annotated type)."""

    item: Rule | None
    min_items: int = 0

    def problem(self, value: Any) -> str | None:
        if len(value) < self.min_items:
            return f"must list at least {self.min_items} value(s), got {len(value)}"
        problems = [self.item.problem(entry) for entry in value] if self.item is not None else []
        return next((f"every value {problem}" for problem in problems if problem), None)


@dataclass(frozen=True)
class Device:
    """'auto', 'cpu', 'cuda' or 'cuda:N', with the GPU present."""

    def problem(self, value: Any) -> str | None:
        if not DEVICE_PATTERN.fullmatch(value):
            return f"must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {short_repr(value)}"
        count = gpus_lacking(value)
        if count is None:
            return None
        found = "no CUDA GPU" if count == 0 else f"{count} CUDA GPU(s), cuda:0 to cuda:{count - 1}"
        return f"{value!r} is not available: this machine has {found}; use 'cpu' or 'auto'"


SEED = Range(0, 2**32 - 1)
FIELD_RULES: dict[type, dict[str, Rule]] = {
    # The allowed values of every config dataclass's fields; free text (paths, names of files) and bools have none.
    Preset: {"device": Device()},
    BackboneConfig: {
        "name": OneOf(tuple(sorted(BACKBONES))),
        "image_size": Range(32, 2048),  # EfficientNet's stride-16 features need 32 px; CLIP uses its own size
        "stages": Items(Range(0, 999)),  # the builder checks them against the network's blocks
    },
    MemoryConfig: {
        "neighbourhood": Range(1, 15, odd=True),  # a window centred on its patch
        "max_patches": Range(1, 10_000_000),
        "thinning": OneOf(THINNINGS),
        "retrieve": Range(0, 100_000),  # 0: every reference
        "descriptor_grid": Range(1, 32),
        "chunk_elements": Range(1 << 16, 1 << 34),
        "sigma": Range(0, 64),  # 0: no smoothing
        "top_fraction": Range(0, 1, open_low=True),
        "seed": SEED,
    },
    CalibrationConfig: {
        "z": Range(0, 20),  # in normal spreads above the mean
        "spread_prior": Range(0, 5),  # relative to the mean held-out score
        "false_alarm_rate": Range(0, MAX_FALSE_ALARM_RATE, open_low=True),  # of the conformal threshold
        "pixel_quantile": Range(0.5, 1),
        "max_held_out": Range(1, 100_000),
        "seed": SEED,
    },
    TextConfig: {"name": OneOf(tuple(sorted(TEXT_ENCODERS)))},
    DecoderConfig: {"fusion_weight": Range(0, 10)},
    LLMConfig: {"dtype": OneOf(tuple(DTYPES))},
    LoraConfig: {
        "rank": Range(1, 1024),
        "alpha": Range(1, 4096),
        "dropout": Range(0, 1, open_high=True),
        "target_modules": Items(None, min_items=1),
    },
    AssistantConfig: {
        "max_new_tokens": Range(1, 4096),
        "max_question_chars": Range(1, 100_000),
        "history_turns": Range(0, 64),
        "seed": SEED,
    },
    PromptLearnerConfig: {
        "grid": Range(1, 16),
        "base_prompts": Range(0, 256),
        "map_size": Range(8, 1024),
        "channels": Items(Range(1, 4096), min_items=1),
        "clip": Range(0, 1000, open_low=True),
    },
}


def check_fields(config: Any, where: str) -> None:
    """Check one config dataclass's own fields against FIELD_RULES (nested configs are checked when built)."""
    rules = FIELD_RULES.get(type(config), {})
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        problem = rules[item.name].problem(value) if item.name in rules and value is not None else None
        if problem:
            raise ConfigError(f"{where}:{item.name}: {problem}")


def check_config(config: Any, where: str = "preset") -> None:
    """Check a config built in code (a Preset or any config in it), every nested config included."""
    check_fields(config, where)
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if dataclasses.is_dataclass(value):
            check_config(value, f"{where}:{item.name}")


def numeric_fields(cls: type) -> Iterable[tuple[type, str]]:
    """(dataclass, field name) of every int, float or tuple-of-number field reachable from cls: each needs a rule."""
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        hint = hints[item.name]
        if dataclasses.is_dataclass(hint):
            yield from numeric_fields(hint)  # type: ignore[arg-type]
        elif hint in (int, float) or (typing.get_origin(hint) is tuple and typing.get_args(hint)[0] in (int, float)):
            yield cls, item.name


def to_dict(preset: Preset) -> dict[str, Any]:
    return dataclasses.asdict(preset)
