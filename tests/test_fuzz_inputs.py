"""The fast subset of bench/fuzz_inputs.py: every malformed input, option, preset and --out is one clean line."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

import anomalygpt.cli as cli
import anomalygpt.io as aio

FUZZ = Path(__file__).resolve().parent.parent / "bench" / "fuzz_inputs.py"


@pytest.fixture(scope="module")
def fuzz() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_inputs", FUZZ)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_inputs"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_fast_fuzz_subset_is_all_clean_one_line_errors(fuzz: ModuleType, tmp_path: Path) -> None:
    results = fuzz.run(tmp_path, fast=True)
    assert len(results) >= 80
    groups = {judged.case.group for judged in results}
    assert {"PNG bit flip, CRC stale", "cut file (7 formats)", "TIFF value ranges", "--out safety", "presets"} <= groups
    assert fuzz.failures(results) == []
    assert all(judged.run.outcome == "clean error" for judged in results)


def test_fuzz_notices_a_corrupt_file_accepted_and_an_input_overwritten(
    fuzz: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without the PNG checks and the output checks, the fuzz must report what the issue found.
    monkeypatch.setattr(aio, "_check_png", lambda stream, label: None)
    monkeypatch.setattr(cli, "check_outputs", lambda *args: None)
    results = fuzz.run(tmp_path, fast=True)
    wrong = {judged.case.group for judged in fuzz.failures(results) if judged.wrong}
    assert {"PNG short pixel data, checksums valid", "--out safety"} <= wrong
