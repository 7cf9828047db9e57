"""An exported runtime folder: its manifest (runtime.json), memory arrays (memory.safetensors) and model files.

The folder is what `anomalygpt export` writes and the only thing the runtime reads; every file is listed in the
manifest with its sha256, so a folder with a missing, cut or swapped file is refused before anything runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from anomalygpt.io import file_sha256
from anomalygpt.verdict import Calibration, FitStatistics

RUNTIME_FORMAT = "anomalygpt-runtime"
RUNTIME_VERSION = 1  # bump when the layout changes; a newer folder is refused by older code
MANIFEST = "runtime.json"
MEMORY = "memory.safetensors"
ENGINES = ("onnx", "openvino")  # --format values, and the engine each folder's model runs on
MODEL_FILES = {"onnx": ("backbone.onnx",), "openvino": ("backbone.xml", "backbone.bin")}
IMAGE_INPUT = "image"  # the model's one input: (B, H, W, 3) uint8 at the profile's image size


class RuntimeBundleError(ValueError):
    """A runtime folder is missing, incomplete, corrupt or newer than this code; the message is one line."""


@dataclass(frozen=True)
class MemorySettings:
    """The preset's memory fields the scoring reads (the rest shaped the memory when it was fitted)."""

    standardize: bool  # grey levels standardised before the model (references and queries alike)
    retrieve: int  # more references than this: each query against its nearest `retrieve` (0: all)
    descriptor_grid: int  # global descriptor: last stage averaged over a g x g grid (for retrieval)
    chunk_elements: int  # bound on query x bank similarities held at once
    sigma: float  # Gaussian smoothing of the fused map, in image pixels
    top_fraction: float  # image score = mean of the highest fraction of map pixels


@dataclass(frozen=True)
class Bundle:
    """A runtime folder, read and checked."""

    folder: Path
    manifest: dict[str, Any]
    arrays: dict[str, np.ndarray]
    memory: MemorySettings
    calibration: Calibration
    fit_stats: FitStatistics  # the references' own spacing and brightness, for the reference-fit check

    @property
    def engine(self) -> str:
        return str(self.manifest["engine"])

    @property
    def image_size(self) -> tuple[int, int]:
        height, width = self.manifest["image_size"]
        return int(height), int(width)

    @property
    def n_stages(self) -> int:
        return len(self.manifest["outputs"]["features"])

    def model_path(self) -> Path:
        """The file the engine opens (the .onnx, or the IR's .xml beside its .bin)."""
        return self.folder / MODEL_FILES[self.engine][0]


# What the scoring reads from the manifest besides the memory settings.
MANIFEST_KEYS = (
    "image_size",
    "backbone",
    "outputs",
    "calibration",
    "fit_stats",
    "references",
    "warnings",
    "class_name",
    "index_ms",
)
PER_STAGE_ARRAYS = ("features", "reference", "up_rows", "up_cols")


def read_manifest(folder: Path) -> dict[str, Any]:
    """The folder's manifest, checked for format and version."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise RuntimeBundleError(f"{folder}: runtime folder not found")
    if not path.is_file():
        raise RuntimeBundleError(f"{folder}: not an anomalygpt runtime folder (no {MANIFEST}); export it again")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RuntimeBundleError(f"{path}: unreadable manifest ({error.__class__.__name__}); export again") from error
    if not isinstance(manifest, dict) or manifest.get("format") != RUNTIME_FORMAT:
        raise RuntimeBundleError(f"{path}: not an anomalygpt runtime manifest")
    found = manifest.get("version")
    if not isinstance(found, int) or found > RUNTIME_VERSION:
        raise RuntimeBundleError(
            f"{path}: runtime format version {found} is newer than this anomalygpt reads ({RUNTIME_VERSION}); "
            "upgrade anomalygpt or export the profile again"
        )
    if manifest.get("engine") not in ENGINES:
        raise RuntimeBundleError(f"{path}: unknown engine {manifest.get('engine')!r}; known: {', '.join(ENGINES)}")
    return manifest


def check_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists is there with its sha256 (the model's and the memory's)."""
    files = manifest.get("files")
    expected = {*MODEL_FILES[manifest["engine"]], MEMORY}
    if not isinstance(files, dict) or set(files) != expected:
        raise RuntimeBundleError(f"{folder / MANIFEST}: lists {sorted(files or {})}, expected {sorted(expected)}")
    for name, digest in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            raise RuntimeBundleError(f"{path}: missing; the runtime folder is incomplete, export it again")
        if file_sha256(path) != digest:
            raise RuntimeBundleError(f"{path}: does not match its sha256 in {MANIFEST} (corrupt or replaced)")


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise RuntimeBundleError(f"{path}: unreadable memory file ({error})") from error


def read_bundle(folder: str | Path) -> Bundle:
    """The runtime folder, checked: manifest format and version, every file's sha256, the arrays scoring needs."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    check_files(folder, manifest)
    missing = [key for key in (*MANIFEST_KEYS, "memory") if key not in manifest]
    try:
        settings = MemorySettings(**manifest["memory"])
        calibration = Calibration(**manifest["calibration"])
        fit_stats = FitStatistics(**manifest["fit_stats"])
        n_stages = len(manifest["outputs"]["features"])
    except (KeyError, TypeError, ValueError) as error:  # ValueError: a reference score that is not a number
        missing = missing or [f"valid memory, calibration, fit_stats and outputs sections ({error})"]
    if missing:
        raise RuntimeBundleError(f"{folder / MANIFEST}: lacks {', '.join(missing)}; export again")
    arrays = read_arrays(folder / MEMORY)
    needed = ["descriptors", "appearances"] + [f"{kind}{s}" for s in range(n_stages) for kind in PER_STAGE_ARRAYS]
    absent = [name for name in needed if name not in arrays]
    if absent:
        raise RuntimeBundleError(f"{folder / MEMORY}: lacks {', '.join(absent)}; export again")
    return Bundle(folder, manifest, arrays, settings, calibration, fit_stats)
