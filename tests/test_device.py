"""--device on every command that inspects or trains; 'auto' as the default preset's device; CUDA parity."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import texture_crops, with_dark_blob
from PIL import Image

from anomalygpt.config import Device, Preset, load_preset
from anomalygpt.devices import DeviceError, available_device, device_name, with_device
from anomalygpt.inspection import Inspector
from anomalygpt.profile import profile_preset

NO_CUDA = "--device cuda: no CUDA device is available (torch.cuda.is_available() is False)"


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine as one without a GPU, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def run_main(module: str, argv: list[str]) -> tuple[int, str]:
    """A command's main(argv) (module 'anomalygpt.cli' for detect and fit); exit code and stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = importlib.import_module(module).main(argv)
        except SystemExit as stop:  # argparse's own parsers (demo, serve) exit on a usage error
            code = stop.code
    return int(code), err.getvalue()


def test_the_default_preset_runs_on_cuda_when_present(no_cuda: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Preset(name="x").device == "auto"
    assert json.loads(Path("anomalygpt/presets/default.json").read_text())["device"] == "auto"
    assert load_preset("default").device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert load_preset("default").device == "cuda"


def test_devices_are_resolved_and_checked(no_cuda: None) -> None:
    assert available_device("auto") == "cpu" and available_device("cpu") == "cpu"
    with pytest.raises(DeviceError, match=f"^{NO_CUDA.replace('(', '[(]').replace(')', '[)]')}$"):
        available_device("cuda")
    assert with_device(load_preset("default"), None).device == "cpu"
    assert with_device(Preset(name="x", device="cuda"), "cpu").device == "cpu"


def test_a_missing_gpu_index_names_the_ones_there(one_gpu: None) -> None:
    assert available_device("auto") == "cuda" and available_device("cuda:0") == "cuda:0"
    with pytest.raises(DeviceError, match=r"^--device cuda:1: this machine has 1 CUDA device\(s\), cuda:0 to cuda:0$"):
        available_device("cuda:1")


@pytest.mark.parametrize("gpus", [0, 2])
def test_a_preset_field_and_the_option_refuse_the_same_devices(gpus: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    devices = ("auto", "cpu", "cuda", "cuda:1", "cuda:2")
    refused_in_preset = [device for device in devices if Device().problem(device) is not None]
    assert [device for device in devices if option_refuses(device)] == refused_in_preset
    assert refused_in_preset == (["cuda:2"] if gpus else ["cuda", "cuda:1", "cuda:2"])


def option_refuses(device: str) -> bool:
    try:
        available_device(device)
    except DeviceError:
        return True
    return False


@pytest.mark.parametrize("text", ["gpu", "CUDA", "cuda:", "cuda:x", "cpu:0", ""])
def test_device_option_form(text: str) -> None:
    with pytest.raises(Exception, match="must be auto, cpu, cuda or cuda:N"):
        device_name(text)


def test_a_profile_fitted_on_a_gpu_loads_anywhere(no_cuda: None) -> None:
    header = {"preset": {"name": "fitted-on-gpu", "device": "cuda"}}
    assert profile_preset(header, "p.profile").device == "auto"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("device")
    paths = {}
    for name, image in zip(("ref", "query"), texture_crops(2, size=64), strict=True):
        paths[name] = root / f"{name}.png"
        Image.fromarray(image).save(paths[name])
    paths["out"] = root / "out"
    return paths


def command_lines(files: dict[str, Path]) -> dict[str, tuple[str, list[str]]]:
    """Each command that inspects or trains, with just enough arguments to reach its preset."""
    ref, query, out = str(files["ref"]), str(files["query"]), str(files["out"])
    return {
        "detect": ("anomalygpt.cli", ["detect", query, "--ref", ref]),
        "fit": ("anomalygpt.cli", ["fit", ref, "--out", str(files["out"] / "p.profile")]),
        "eval": ("eval.cli", ["--dataset", "elpv", "--shots", "1", "--seeds", "0", "--out", out]),
        "chat": ("chat.cli", [query, "--ref", ref, "--ask", "any defect?"]),
        "ui": ("chat.web", []),
        "demo": ("chat.demo", ["--out", out]),
        "train": ("train.cli", ["decoder", "--out", out]),
        "serve": ("anomalygpt.service.cli", ["--profiles", out]),
    }


@pytest.mark.parametrize("verb", ["detect", "fit", "eval", "chat", "ui", "demo", "train", "serve"])
def test_every_command_refuses_a_missing_gpu_in_one_line(verb: str, files: dict[str, Path], no_cuda: None) -> None:
    module, argv = command_lines(files)[verb]
    code, err = run_main(module, [*argv, "--device", "cuda"])
    assert code == 2
    assert err.count("\n") == 1 and err.rstrip().endswith(f"error: {NO_CUDA}")
    if verb in ("detect", "fit"):
        assert err == f"anomalygpt {verb}: error: {NO_CUDA}\n"
    assert not (files["out"] / "p.profile").exists()


@pytest.mark.parametrize("verb", ["detect", "eval", "train"])
def test_every_command_checks_the_option_form(verb: str, files: dict[str, Path]) -> None:
    module, argv = command_lines(files)[verb]
    code, err = run_main(module, [*argv, "--device", "gpu0"])
    assert code == 2 and "--device: must be auto, cpu, cuda or cuda:N, got 'gpu0'" in err


@pytest.mark.parametrize("batch_size", ["0", "-1", "two"])
def test_detect_batch_size_must_be_positive(batch_size: str, files: dict[str, Path]) -> None:
    code, err = run_main(
        "anomalygpt.cli", ["detect", str(files["query"]), "--ref", str(files["ref"]), "--batch-size", batch_size]
    )
    assert code == 2 and "--batch-size: must be a whole number of at least 1" in err


@pytest.mark.cuda
def test_inspect_many_on_cuda_matches_the_cpu(small_backbone: torch.nn.Module) -> None:
    """The GPU path (float32) gives the CPU's scores, verdicts and region boxes."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    preset = load_preset("default")
    goods = texture_crops(8, seed=5)
    queries = goods[4:6] + [with_dark_blob(image, (40, 60), 12) for image in goods[6:]]
    results = {}
    for device in ("cpu", "cuda"):
        inspector = Inspector(small_backbone.to(device), with_device(preset, device))
        references = inspector.fit(goods[:4])
        results[device] = list(inspector.inspect_many(queries, references, batch_size=3))
    small_backbone.to("cpu")
    for cpu, gpu in zip(results["cpu"], results["cuda"], strict=True):
        assert gpu.score == pytest.approx(cpu.score, abs=1e-4)
        assert gpu.is_anomalous == cpu.is_anomalous
        assert [r.box for r in gpu.regions] == [r.box for r in cpu.regions]
        assert gpu.anomaly_map is not None and cpu.anomaly_map is not None
        assert np.abs(gpu.anomaly_map - cpu.anomaly_map).max() < 1e-3


@pytest.mark.cuda
def test_a_profile_fitted_on_cuda_inspects_alike_on_the_cpu(small_backbone: torch.nn.Module, tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    preset = load_preset("default")
    goods = texture_crops(6, seed=7)
    query = with_dark_blob(goods[5], (60, 60), 12)
    gpu = Inspector(small_backbone.to("cuda"), with_device(preset, "cuda"))
    try:
        references = gpu.fit(goods[:4])
        on_gpu = gpu.inspect(query, references)
        gpu.save_profile(references, tmp_path / "p.profile")
    finally:
        small_backbone.to("cpu")
    cpu = Inspector(small_backbone, with_device(preset, "cpu"))
    on_cpu = cpu.inspect(query, cpu.load_profile(tmp_path / "p.profile"))
    assert on_cpu.score == pytest.approx(on_gpu.score, abs=1e-4) and on_cpu.is_anomalous == on_gpu.is_anomalous
