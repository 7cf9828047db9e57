"""Tests for anomalygpt.config: every preset field checked in one place, one-line errors naming file, field, range."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from anomalygpt import config
from anomalygpt.config import (
    FIELD_RULES,
    ConfigError,
    Preset,
    Range,
    check_config,
    known_presets,
    load_preset,
    numeric_fields,
    resolve_device,
)
from anomalygpt.memory import MemoryConfig


def test_every_numeric_field_declares_its_allowed_values() -> None:
    missing = [f"{cls.__name__}.{name}" for cls, name in numeric_fields(Preset) if name not in FIELD_RULES.get(cls, {})]
    assert missing == [], f"declare the allowed values of {', '.join(missing)} in anomalygpt/config.py FIELD_RULES"
    for cls, rules in FIELD_RULES.items():  # and every rule names a real field
        assert set(rules) <= {item.name for item in dataclasses.fields(cls)}, cls.__name__


def test_defaults_and_shipped_presets_are_valid() -> None:
    check_config(Preset(name="defaults"))
    for name in known_presets():
        check_config(load_preset(name), name)


BAD_PRESETS = {
    # case: (preset JSON text, the error after "<file>:")
    "a list": ("[1, 2]", " a preset is a JSON object {...}, got an array"),
    "null": ("null", " a preset is a JSON object {...}, got null"),
    "deeply nested": (
        '{"memory": ' + "[" * 100_000 + "]" * 100_000 + "}",
        " not a readable JSON preset (nested too deeply)",
    ),
    "z NaN": ('{"calibration": {"z": NaN}}', "calibration:z: must be a finite number, got nan"),
    "z Infinity": ('{"calibration": {"z": -Infinity}}', "calibration:z: must be a finite number, got -inf"),
    "z 1e308": ('{"calibration": {"z": 1e308}}', "calibration:z: must be a number from 0 to 20, got 1e+308"),
    "z 400 digits": ('{"calibration": {"z": ' + "9" * 400 + "}}", "calibration:z: must be a finite number, got 9999"),
    "spread_prior 1e308": (
        '{"calibration": {"spread_prior": 1e308}}',
        "calibration:spread_prior: must be a number from 0 to 5, got 1e+308",
    ),
    "false_alarm_rate 0": (
        '{"calibration": {"false_alarm_rate": 0}}',
        "calibration:false_alarm_rate: must be a number above 0 and at most 0.5, got 0.0",
    ),
    "false_alarm_rate 0.6": (
        '{"calibration": {"false_alarm_rate": 0.6}}',
        "calibration:false_alarm_rate: must be a number above 0 and at most 0.5, got 0.6",
    ),
    "pixel_quantile 1.5": (
        '{"calibration": {"pixel_quantile": 1.5}}',
        "calibration:pixel_quantile: must be a number from 0.5 to 1, got 1.5",
    ),
    "max_patches 0": (
        '{"memory": {"max_patches": 0}}',
        "memory:max_patches: must be a number from 1 to 10000000, got 0",
    ),
    "image_size 0": ('{"backbone": {"image_size": 0}}', "backbone:image_size: must be a number from 32 to 2048, got 0"),
    "image_size 7": ('{"backbone": {"image_size": 7}}', "backbone:image_size: must be a number from 32 to 2048, got 7"),
    "negative sigma": ('{"memory": {"sigma": -1}}', "memory:sigma: must be a number from 0 to 64, got -1.0"),
    "neighbourhood 0": (
        '{"memory": {"neighbourhood": 0}}',
        "memory:neighbourhood: must be an odd number from 1 to 15, got 0",
    ),
    "neighbourhood 2": (
        '{"memory": {"neighbourhood": 2}}',
        "memory:neighbourhood: must be an odd number from 1 to 15, got 2",
    ),
    "top_fraction 0": (
        '{"memory": {"top_fraction": 0}}',
        "memory:top_fraction: must be a number above 0 and at most 1, got 0.0",
    ),
    "top_fraction 2": (
        '{"memory": {"top_fraction": 2}}',
        "memory:top_fraction: must be a number above 0 and at most 1, got 2.0",
    ),
    "chunk_elements 0": (
        '{"memory": {"chunk_elements": 0}}',
        "memory:chunk_elements: must be a number from 65536 to 17179869184, got 0",
    ),
    "seed -1": ('{"memory": {"seed": -1}}', "memory:seed: must be a number from 0 to 4294967295, got -1"),
    "fusion_weight NaN": (
        '{"decoder": {"fusion_weight": NaN}}',
        "decoder:fusion_weight: must be a finite number, got nan",
    ),
    "cuda without a GPU": ('{"device": "cuda"}', "device: 'cuda' is not available: this machine has no CUDA GPU"),
    "invalid device": ('{"device": "gpu0"}', "device: must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got 'gpu0'"),
    "negative stage": ('{"backbone": {"stages": [4, -1]}}', "backbone:stages: every value must be a number from 0"),
    "unknown backbone": ('{"backbone": {"name": "nope"}}', "backbone:name: unknown 'nope'; known: clip, efficientnet"),
    "unknown dtype": ('{"llm": {"dtype": "int8"}}', "llm:dtype: unknown 'int8'; known: float32, bfloat16, float16"),
    "no LoRA modules": ('{"llm": {"lora": {"target_modules": []}}}', "llm:lora:target_modules: must list at least 1"),
    "LoRA dropout 1": (
        '{"llm": {"lora": {"dropout": 1}}}',
        "llm:lora:dropout: must be a number at least 0 and below 1",
    ),
    "no prompt channels": (
        '{"assistant": {"prompt_learner": {"channels": []}}}',
        "assistant:prompt_learner:channels: must list at least 1 value(s), got 0",
    ),
    "a megabyte of text": ('{"device": "' + "x" * 1_000_000 + '"}', "device: must be 'auto', 'cpu', 'cuda' or"),
    "1 for a bool": ('{"memory": {"augment": 1}}', "memory:augment: expected bool, got 1"),
    "memory as a list": ('{"memory": [1]}', "memory: expected an object for MemoryConfig, got an array"),
    "5000-digit integer": (
        '{"memory": {"seed": ' + "9" * 5000 + "}}",
        " not a readable JSON preset (Exceeds the limit",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_PRESETS))
def test_bad_preset_is_one_line_naming_file_field_and_range(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    text, expected = BAD_PRESETS[case]
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_preset(str(path))
    message = str(caught.value)
    assert message.startswith(f"{path}:{expected}") and "\n" not in message and len(message) < 300


def test_range_boundaries() -> None:
    unit = Range(0, 1, open_low=True)
    assert [unit.problem(v) is None for v in (0.0, 1e-9, 1.0, 1.0000001)] == [False, True, True, False]
    odd = Range(1, 15, odd=True)
    assert [odd.problem(v) is None for v in (-1, 1, 2, 3, 15, 17)] == [False, True, False, True, True, False]
    assert Range(0, 1, open_high=True).problem(1.0) == "must be a number at least 0 and below 1, got 1.0"


def test_accepted_edges_load(tmp_path: Path) -> None:
    path = tmp_path / "edges.json"
    edges = {"memory": {"top_fraction": 1, "neighbourhood": 1, "sigma": 0, "seed": 2**32 - 1}, "calibration": {"z": 0}}
    path.write_text(json.dumps(edges))
    preset = load_preset(str(path))
    assert preset.memory.top_fraction == 1.0 and preset.memory.seed == 2**32 - 1 and preset.calibration.z == 0.0


def test_device_auto_and_availability(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "auto.json"
    path.write_text('{"device": "auto"}')
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and load_preset(str(path)).device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == "cuda" and load_preset(str(path)).device == "cuda"
    assert resolve_device("cuda:1") == "cuda:1"
    device = config.Device()
    assert device.problem("cuda:1") is None and device.problem("cpu") is None
    assert device.problem(
        "cuda:2"
    ) == "'cuda:2' is not available: this machine has 2 CUDA GPU(s), cuda:0 to cuda:1; " + ("use 'cpu' or 'auto'")
    assert device.problem("CUDA") == "must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got 'CUDA'"


def test_check_config_finds_a_bad_value_in_a_preset_built_in_code() -> None:
    preset = Preset(name="code", memory=MemoryConfig(seed=-1))
    with pytest.raises(ConfigError, match="^preset:memory:seed: must be a number from 0 to 4294967295, got -1$"):
        check_config(preset)
