"""The exported graph on onnxruntime or OpenVINO: (B, H, W, 3) uint8 images -> its outputs, in manifest order."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anomalygpt.runtime.bundle import IMAGE_INPUT, RuntimeBundleError

Engine = Callable[[np.ndarray], list[np.ndarray]]
ENGINE_PACKAGES = {"onnx": "onnxruntime", "openvino": "openvino"}


def missing_package(engine: str, error: ImportError) -> RuntimeBundleError:
    package = ENGINE_PACKAGES[engine]
    return RuntimeBundleError(f"the {engine} runtime needs {package} ({error}): pip install 'anomalygpt[export]'")


def onnx_engine(path: Path, outputs: Sequence[str], threads: int | None = None) -> Engine:
    """An onnxruntime CPU session of the model at path."""
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise missing_package("onnx", error) from error
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own Fail/InvalidProtobuf types, not one base class
        raise RuntimeBundleError(f"{path}: onnxruntime cannot load it ({str(error).splitlines()[0]})") from error
    names = list(outputs)

    def run(images: np.ndarray) -> list[np.ndarray]:
        return [np.asarray(out) for out in session.run(names, {IMAGE_INPUT: images})]

    return run


def openvino_model_engine(model: Any, outputs: Sequence[str], threads: int | None = None) -> Engine:
    """An ov.Model (read from IR, or quantised in memory) compiled for the CPU in float32.

    f32 is asked for explicitly: on CPUs with bf16 or AMX units OpenVINO's default precision is bf16, which moves
    scores by far more than the 1e-4 the export promises. An int8-quantised model keeps its int8 layers.
    """
    import openvino as ov

    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(model, "CPU", config)
    ports = [compiled.output(name) for name in outputs]

    def run(images: np.ndarray) -> list[np.ndarray]:
        result = compiled(images)
        return [np.asarray(result[port]) for port in ports]

    return run


def openvino_engine(path: Path, outputs: Sequence[str], threads: int | None = None) -> Engine:
    """OpenVINO on the CPU, from the IR at path (.xml with its .bin)."""
    try:
        import openvino as ov
    except ImportError as error:
        raise missing_package("openvino", error) from error
    try:
        model = ov.Core().read_model(str(path))
        return openvino_model_engine(model, outputs, threads)
    except RuntimeError as error:
        raise RuntimeBundleError(f"{path}: OpenVINO cannot load it ({str(error).splitlines()[0]})") from error


def open_engine(engine: str, path: Path, outputs: Sequence[str], threads: int | None = None) -> Engine:
    return onnx_engine(path, outputs, threads) if engine == "onnx" else openvino_engine(path, outputs, threads)
