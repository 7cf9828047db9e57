"""`anomalygpt export`: a profile as a runtime folder that inspects with onnxruntime or OpenVINO, without torch.

The static part of the inspection becomes one graph: uint8 image at the profile's size -> resize to the backbone's
input (torch's antialiased bilinear resize as two constant matrices) -> normalisation -> backbone -> the memory's
patch embedding (n x n average, L2 norm) -> per-stage features (and the fused decoder prior when the profile's
preset fuses one). The memory bank, the upsampling matrices of the map, the calibration and the preset fields
the scoring reads go beside it (memory.safetensors + runtime.json, never pickled); anomalygpt.runtime does the
rest in numpy. The folder is built in a temporary folder beside --out and renamed into place, so a failed
export leaves nothing behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anomalygpt.backbones import VisionBackbone
from anomalygpt.decoder import AnomalyDecoder
from anomalygpt.inspection import Inspector, References, build_inspector
from anomalygpt.io import file_sha256, safe_text, write_json_atomic
from anomalygpt.memory import embed_patches
from anomalygpt.profile import profile_preset, read_profile, references_from
from anomalygpt.prompts import text_anchors
from anomalygpt.runtime.bundle import (
    ENGINES,
    IMAGE_INPUT,
    MANIFEST,
    MEMORY,
    MODEL_FILES,
    RUNTIME_FORMAT,
    RUNTIME_VERSION,
    RuntimeBundleError,
    read_manifest,
)
from anomalygpt.runtime.inspector import RuntimeInspector

PROG = "anomalygpt export"
OPSET = 17
PROBE_TOLERANCE = 1e-4  # the exported graph's features may differ from torch's by float rounding only
ENGINE_PACKAGE = {"onnx": "onnxruntime", "openvino": "openvino"}  # what each --format runs on


class ExportError(ValueError):
    """An export that cannot be done as asked; the message is one line naming the file or option."""


@dataclass(frozen=True)
class ExportOptions:
    profile: Path
    format: str  # "onnx" or "openvino"
    out: Path  # the runtime folder to write
    overwrite: bool  # replace an existing runtime folder at out


@dataclass(frozen=True)
class ExportReport:
    out: Path
    engine: str
    files: dict[str, int]  # name -> bytes
    n_references: int
    n_patches: int  # bank rows over all stages
    probe_max_difference: float  # largest |exported - torch| feature on the probe image

    def lines(self) -> list[str]:
        sizes = ", ".join(f"{name} ({size / 1e6:.1f} MB)" for name, size in self.files.items())
        return [
            f"runtime: {safe_text(self.out)} ({self.engine})",
            f"files: {sizes}",
            f"memory: {self.n_references} references, {self.n_patches:,} patches",
            f"probe: exported features within {self.probe_max_difference:.1e} of torch's",
        ]


def resize_matrix(n_in: int, n_out: int, antialias: bool) -> torch.Tensor:
    """(n_out, n_in) weights of torch's bilinear resize along one axis (align_corners=False), taken from torch
    itself by resizing an identity: bilinear resizing is separable, so an image resize is R @ x @ C.T."""
    eye = torch.eye(n_in, dtype=torch.float32)[None, None]
    return F.interpolate(eye, size=(n_out, n_in), mode="bilinear", antialias=antialias, align_corners=False)[0, 0]


class WeightedPrior(nn.Module):
    """The fused decoder's prior for a fixed class name: weight x abnormal probability per stage."""

    anchors: torch.Tensor

    def __init__(self, decoder: AnomalyDecoder, anchors: torch.Tensor, weight: float) -> None:
        super().__init__()
        self.decoder = decoder.eval()
        self.register_buffer("anchors", anchors)  # (2, D) unit normal/abnormal text anchors
        self.weight = weight

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self.weight * a for a in self.decoder(feats, self.anchors).abnormal]


class ExportGraph(nn.Module):
    """(B, H, W, 3) uint8 images at the profile's size -> per-stage embedded features (B, C, h, w), then the
    weighted prior (B, h, w) per stage when the profile fuses one: what Inspector.inspect_few_shot computes with
    torch before the nearest-patch search."""

    rows: torch.Tensor
    cols: torch.Tensor

    def __init__(
        self, backbone: VisionBackbone, size: tuple[int, int], neighbourhood: int, prior: WeightedPrior | None
    ) -> None:
        super().__init__()
        self.backbone = backbone.eval()
        side = backbone.image_size
        self.register_buffer("rows", resize_matrix(size[0], side, antialias=True))  # (S, H)
        self.register_buffer("cols", resize_matrix(size[1], side, antialias=True).T.contiguous())  # (W, S)
        self.neighbourhood = neighbourhood
        self.prior = prior

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = images.permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)
        # Normalised before the resize (its rows sum to 1, so the order only moves float rounding): OpenVINO's CPU
        # plugin fails to compile a per-channel subtraction fused after a MatMul.
        x = (x - self.backbone.mean) / self.backbone.std
        x = self.rows @ x @ self.cols  # (B, 3, S, S)
        feats = embed_patches(self.backbone(x.contiguous(), embedding=False).patches, self.neighbourhood)
        priors = self.prior(feats) if self.prior is not None else []
        return (*feats, *priors)


def open_for_export(path: Path) -> tuple[Inspector, References, dict[str, Any]]:
    """The profile's inspector (its own preset, on the CPU), references and header; ProfileError when unreadable."""
    header, tensors = read_profile(path)
    preset = dataclasses.replace(profile_preset(header, path), device="cpu")
    if preset.backbone.name == "clip" and preset.backbone.pretrained == "random":
        raise ExportError(
            f"{path}: fitted with a randomly initialised CLIP backbone (pretrained 'random'), whose weights cannot "
            "be rebuilt; export a profile fitted with a weights file"
        )
    inspector = build_inspector(preset)
    return inspector, references_from(header, tensors, inspector, path), header


def build_graph(inspector: Inspector, references: References) -> ExportGraph:
    prior = None
    if references.memory.prior is not None and inspector.prior is not None:
        decoder = inspector.preset.decoder
        anchors = text_anchors(inspector.prior.encoder, references.class_name or decoder.class_name or None)
        prior = WeightedPrior(inspector.prior.decoder.cpu(), anchors.cpu(), decoder.fusion_weight)
    size = references.memory.image_size
    return ExportGraph(inspector.backbone.cpu(), size, inspector.preset.memory.neighbourhood, prior).eval()


def probe_image(size: tuple[int, int]) -> np.ndarray:
    """(1, H, W, 3) uint8: a fixed smooth texture with noise, on which the export checks itself."""
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[: size[0], : size[1]]
    wave = 128 + 60 * np.sin(rows / 7.0) * np.cos(cols / 11.0)
    pixels = wave[..., None] + rng.normal(0, 20, (*size, 3))
    return pixels.clip(0, 255).astype(np.uint8)[None]


def output_names(graph: ExportGraph, n_stages: int) -> tuple[list[str], list[str]]:
    features = [f"features{s}" for s in range(n_stages)]
    return features, [f"prior{s}" for s in range(n_stages)] if graph.prior is not None else []


def memory_arrays(references: References, grids: Sequence[tuple[int, int]]) -> dict[str, np.ndarray]:
    """The bank as the profile holds it (float16 rows, their reference), descriptors, appearances, and each stage's
    (H, h) and (W, w) bilinear matrices for fusing the maps at image size."""
    memory = references.memory
    height, width = memory.image_size
    arrays = {
        "descriptors": memory.descriptors.float().cpu().numpy(),
        "appearances": memory.appearances.float().cpu().numpy(),
    }
    for stage, (bank, (h, w)) in enumerate(zip(memory.banks, grids, strict=True)):
        arrays[f"features{stage}"] = bank.features.half().cpu().numpy()
        arrays[f"reference{stage}"] = bank.reference.int().cpu().numpy()
        arrays[f"up_rows{stage}"] = resize_matrix(h, height, antialias=False).numpy()
        arrays[f"up_cols{stage}"] = resize_matrix(w, width, antialias=False).numpy()
    return {name: np.ascontiguousarray(array) for name, array in arrays.items()}


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def export_onnx(graph: ExportGraph, probe: np.ndarray, path: Path, outputs: Sequence[str]) -> None:
    """The graph as ONNX with a dynamic batch axis (TorchScript exporter: it keeps EfficientNet's graph static and
    exports in about a second)."""
    axes = {name: {0: "batch"} for name in [IMAGE_INPUT, *outputs]}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        # CLIP's attention otherwise runs as one fused kernel that has no ONNX equivalent
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            torch.onnx.export(
                graph,
                (torch.from_numpy(probe),),
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=[IMAGE_INPUT],
                output_names=list(outputs),
                dynamic_axes=axes,
            )
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)


def export_openvino(onnx_path: Path, xml_path: Path) -> None:
    """The ONNX graph converted to OpenVINO IR, weights kept in float32 (the default halves them)."""
    import openvino as ov

    ov.save_model(ov.convert_model(str(onnx_path)), str(xml_path), compress_to_fp16=False)


def check_packages(engine: str) -> None:
    from importlib.util import find_spec

    needed = ENGINE_PACKAGE[engine]
    if find_spec(needed) is None:
        raise ExportError(
            f"--format {engine}: needs {needed}, which is not installed: pip install 'anomalygpt[export]'"
        )


def write_runtime(folder: Path, profile: Path, engine: str) -> ExportReport:
    """Everything into `folder` (empty), the manifest last; checked by running the written model on the probe."""
    inspector, references, header = open_for_export(profile)
    graph = build_graph(inspector, references)
    probe = probe_image(references.memory.image_size)
    with torch.inference_mode():
        expected = [out.numpy() for out in graph(torch.from_numpy(probe))]
    n_stages = len(references.memory.banks)
    features, priors = output_names(graph, n_stages)
    onnx_path = folder / MODEL_FILES["onnx"][0]
    export_onnx(graph, probe, onnx_path, [*features, *priors])
    if engine == "openvino":
        export_openvino(onnx_path, folder / MODEL_FILES["openvino"][0])
        onnx_path.unlink()
    grids = [tuple(out.shape[-2:]) for out in expected[:n_stages]]
    save_arrays(memory_arrays(references, grids), folder / MEMORY)
    files = [*MODEL_FILES[engine], MEMORY]
    manifest = runtime_manifest(inspector, references, header, profile, engine)
    manifest["outputs"] = {"features": features, "prior": priors}
    manifest["files"] = {name: file_sha256(folder / name) for name in files}
    write_json_atomic(folder / MANIFEST, manifest)
    difference = probe_difference(folder, probe, expected)
    manifest["probe_max_difference"] = difference
    write_json_atomic(folder / MANIFEST, manifest)
    n_patches = sum(int(bank.features.shape[0]) for bank in references.memory.banks)
    sizes = {name: (folder / name).stat().st_size for name in files}
    return ExportReport(folder, engine, sizes, references.memory.n_references, n_patches, difference)


def save_arrays(arrays: dict[str, np.ndarray], path: Path) -> None:
    from safetensors.numpy import save_file

    save_file(arrays, str(path), metadata={"format": RUNTIME_FORMAT})


def runtime_manifest(
    inspector: Inspector, references: References, header: dict[str, Any], profile: Path, engine: str
) -> dict[str, Any]:
    memory = inspector.preset.memory
    return {
        "format": RUNTIME_FORMAT,
        "version": RUNTIME_VERSION,
        "engine": engine,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {name: package_version(name) for name in ("anomalygpt", "torch", ENGINE_PACKAGE[engine])},
        "profile": {"file": profile.name, "sha256": file_sha256(profile), "preset": inspector.preset.name},
        "image_size": list(references.memory.image_size),
        # the backbone's input side and stage strides: the map's finest cell is the smallest region kept
        "backbone": {"image_size": inspector.backbone.image_size, "strides": list(inspector.backbone.strides)},
        "memory": {
            "standardize": memory.standardize,
            "retrieve": memory.retrieve,
            "descriptor_grid": memory.descriptor_grid,
            "chunk_elements": memory.chunk_elements,
            "sigma": memory.sigma,
            "top_fraction": memory.top_fraction,
        },
        "augment": references.memory.augment,
        "class_name": references.class_name,
        "calibration": references.calibration.to_dict(scores=True),
        "fit_stats": references.fit_stats.to_dict(),
        "references": list(references.names),
        "warnings": list(references.warnings),
        "index_ms": references.index_ms,
        "profile_created": header.get("created"),
    }


def probe_difference(folder: Path, probe: np.ndarray, expected: Sequence[np.ndarray]) -> float:
    """Largest difference between the written model's outputs and torch's on the probe; ExportError beyond
    PROBE_TOLERANCE (the written folder is also read back and checked as the runtime will read it)."""
    runtime = RuntimeInspector.open(folder)
    found = runtime.engine(probe)
    difference = max(float(np.abs(a - b).max()) for a, b in zip(found, expected, strict=True))
    if not difference <= PROBE_TOLERANCE:
        raise ExportError(
            f"{folder}: the exported model's features differ from torch's by {difference:.2e} on the probe image "
            f"(more than {PROBE_TOLERANCE:g}); nothing written"
        )
    return difference


def check_out(out: Path, overwrite: bool) -> None:
    """--out must not exist, or (with --overwrite) be a runtime folder or an empty folder: nothing else is replaced."""
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise ExportError(f"{out}: already exists; pass --overwrite to replace it, or choose another --out")
    if not out.is_dir() or out.is_symlink():
        raise ExportError(f"{out}: exists and is not a folder; --overwrite replaces only a runtime folder")
    if any(out.iterdir()):
        try:
            read_manifest(out)
        except RuntimeBundleError as error:
            raise ExportError(
                f"{out}: not an anomalygpt runtime folder; --overwrite replaces only a runtime folder"
            ) from error


def place(built: Path, out: Path) -> None:
    """Rename the built folder to out; an existing out is moved aside first and removed once the new one is in."""
    if not os.path.lexists(out):
        os.rename(built, out)
        return
    aside = out.parent / f".{out.name}.replaced-{secrets.token_hex(6)}"
    os.rename(out, aside)
    try:
        os.rename(built, out)
    except OSError:
        os.rename(aside, out)
        raise
    shutil.rmtree(aside)


def export_profile(options: ExportOptions) -> ExportReport:
    """Write the runtime folder for a profile; on any failure nothing is left behind and out is untouched."""
    if options.format not in ENGINES:
        raise ExportError(f"--format: unknown format {options.format!r}; known: {', '.join(ENGINES)}")
    if not options.profile.is_file():
        raise ExportError(f"{options.profile}: --profile file not found")
    check_out(options.out, options.overwrite)
    check_packages(options.format)
    parent = options.out.parent
    if not parent.is_dir():
        raise ExportError(f"{options.out}: its folder {parent} does not exist")
    built = Path(tempfile.mkdtemp(prefix=f".{options.out.name}.export-", dir=parent))
    try:
        report = write_runtime(built, options.profile, options.format)
        place(built, options.out)
    except BaseException:
        shutil.rmtree(built, ignore_errors=True)
        raise
    return dataclasses.replace(report, out=options.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Export a product profile as a runtime folder that inspects with onnxruntime or OpenVINO and "
        "numpy alone (anomalygpt.runtime, no torch): the backbone graph, the memory and the calibration. Scores "
        "match the torch path within 1e-4.",
    )
    parser.add_argument("--profile", type=Path, required=True, help="the profile file written by anomalygpt fit")
    parser.add_argument("--format", required=True, metavar="|".join(ENGINES), help="onnx or openvino")
    parser.add_argument("--out", type=Path, required=True, help="the runtime folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out when it is a runtime folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`anomalygpt export`; returns the exit code (2: bad input, 1: a failure after the inputs were accepted)."""
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 0
    options = ExportOptions(args.profile, args.format, args.out, bool(args.overwrite))
    try:
        report = export_profile(options)
    except (ValueError, OSError) as error:  # ExportError, ProfileError, RuntimeBundleError; WeightsError
        print(f"{PROG}: error: {safe_text(str(error).splitlines()[0] if str(error) else repr(error))}", file=sys.stderr)
        return 1 if isinstance(error, OSError) else 2
    print("\n".join(report.lines()))
    return 0
