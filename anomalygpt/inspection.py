"""Inspector: image + good references -> Inspection (map, score, threshold, verdict, regions)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import BrokenExecutor, Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, overload

import numpy as np
import torch
from tqdm import tqdm

from anomalygpt.backbones import VisionBackbone, WeightsError, build_backbone
from anomalygpt.calibration import (
    Calibration,
    calibrate,
    fixed_calibration,
    held_out_choice,
)
from anomalygpt.config import DEFAULT_PRESET, Preset, load_preset, resolve_device, to_dict
from anomalygpt.decoder import AnomalyDecoder, DecoderSpec, TextPrior
from anomalygpt.io import ImageSource, load_image, load_source
from anomalygpt.memory import (
    N_DIHEDRAL,
    MemoryConfig,
    PatchMemory,
    appearance,
    embed_patches,
    fuse_maps,
    fused_tensor,
    memory_inputs,
    top_means,
)
from anomalygpt.mutual import MIN_BATCH, batch_calibration, mutual_maps
from anomalygpt.references import (
    AugmentationDecision,
    FitStatistics,
    InspectionError,
    check_references,
    decide_augmentation,
    fit_statistics,
    reference_fit,
)
from anomalygpt.regions import map_cell_px
from anomalygpt.shared_batch import SharedBatch, SharedBatches
from anomalygpt.text import build_text_encoder
from anomalygpt.verdict import (
    ONE_REFERENCE_CAVEAT,
    ZERO_SHOT_TEXT_CAVEAT,
    Inspection,
    grey_thumbnail,
    query_warnings,
    top_mean,
    working_image,
)
from anomalygpt.weights import load_into, load_module

MAX_REFERENCES = 10_000
BATCH_SIZE = 16  # images per batch in inspect_many (decoded together, searched together; a GPU pass)
# Images per backbone pass on a CPU: activations of several 320 px images outgrow the caches, and a pass of 8 or 16
# costs 2.3x the CPU time per image of a pass of 1 (24.8 vs 57-59 ms on this 2-core CPU, passive OpenMP waits);
# passes of 2 against 1 were a draw in bench/bench_batch.py --cpu-passes 1,2 (bench/RESULTS.md, issue 22).
CPU_PASS = 1
DECODE_THREADS = min(16, os.cpu_count() or 1)  # image decoders running beside the backbone in inspect_many
WORKER_CHUNK = 4  # consecutive images per task of inspect_many's worker processes (decoding, or finishing)
MAX_REFERENCES_IN_MEMORY = 64  # more references are decoded again when indexed instead of held as pixels
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"  # trained parts of the offline default


@dataclass
class References:
    """Good references indexed once (memory, thresholds, fit statistics); reused for every query of the product."""

    memory: PatchMemory
    calibration: Calibration
    index_ms: float
    names: list[str]  # one per reference kept: its path, or "reference N"
    augmentation: AugmentationDecision
    fit_stats: FitStatistics
    warnings: list[str] = field(default_factory=list)  # about the reference set; shown with every inspection
    class_name: str | None = None

    @functools.cached_property
    def cpu_appearances(self) -> torch.Tensor:
        """(N, C) the references' appearances on the CPU (the fit check's), copied once per reference set."""
        return self.memory.appearances.cpu()

    @property
    def mode(self) -> str:
        """ "pool" when each query is matched against its nearest references, else "few-shot"."""
        return "pool" if self.memory.retrieval else "few-shot"


class LazyImages(Sequence[np.ndarray]):
    """Reference images decoded when asked for, so that thousands of them never sit in memory at once."""

    def __init__(self, sources: Sequence[ImageSource], names: Sequence[str]) -> None:
        self.sources = sources
        self.names = names

    def __len__(self) -> int:
        return len(self.sources)

    @overload
    def __getitem__(self, index: int) -> np.ndarray: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[np.ndarray]: ...

    def __getitem__(self, index: int | slice) -> np.ndarray | Sequence[np.ndarray]:
        if isinstance(index, slice):
            return LazyImages(self.sources[index], self.names[index])
        return working_image(load_image(self.sources[index], name=self.names[index]))


class Inspector:
    def __init__(self, backbone: VisionBackbone, preset: Preset, prior: TextPrior | None = None) -> None:
        self.backbone = backbone
        self.preset = preset
        self._prior = prior
        # inspect_many's device path (one backbone pass per batch, float16 when asked, maps smoothed and scored where
        # they were made): None takes it on a GPU only; True takes it on the CPU too, which is how the tests and
        # bench/bench_batch.py --rehearse run the GPU's code on a machine without one.
        self.device_path: bool | None = None

    def with_preset(self, preset: Preset) -> Inspector:
        """An inspector of another preset on the same models (its backbone, and the decoder if loaded already):
        one profile's own false-alarm rate, say. The preset must name the same backbone."""
        return Inspector(self.backbone, preset, self._prior)

    @property
    def geometry(self) -> MapGeometry:
        """What turns this inspector's maps into Inspections besides their calibration."""
        return MapGeometry(self.preset.memory.top_fraction, min(self.backbone.strides), self.backbone.image_size)

    @property
    def prior(self) -> TextPrior | None:
        """The trained text-aligned decoder (zero-shot maps, fused prior); loaded on first use, None without one."""
        if self._prior is None and self.preset.decoder.weights:
            self._prior = load_prior(self.preset)
        return self._prior

    def fit(
        self,
        references: Sequence[ImageSource],
        class_name: str | None = None,
        progress: bool = False,
        names: Sequence[str] | None = None,
    ) -> References:
        """Index good references (1 to MAX_REFERENCES): checks, augmentation decision, memory, thresholds.
        `names` name them in warnings and results (default: their paths, or "reference N")."""
        if not references:
            raise InspectionError(f"no good reference images given: few-shot inspection needs 1 to {MAX_REFERENCES}")
        if len(references) > MAX_REFERENCES:
            raise InspectionError(f"{len(references)} references given; at most {MAX_REFERENCES:,} are supported")
        start = time.perf_counter()
        if names is None:
            names = [reference_name(ref, i) for i, ref in enumerate(references)]
        elif len(names) != len(references):
            raise InspectionError(f"{len(names)} names given for {len(references)} references")
        images = reference_images(references, names)
        kept = check_references(images, names)
        kept_names = [names[i] for i in kept.keep]
        memory, decision, held_out = self.index(subset(images, kept.keep), progress)
        self.attach_prior(memory, class_name)
        calibration = calibrate(memory, held_out, self.preset.calibration)
        warnings = kept.warnings + reference_set_warnings(memory.n_references)
        elapsed = (time.perf_counter() - start) * 1000
        fit_stats = fit_statistics(memory.appearances, kept.brightness)
        return References(memory, calibration, elapsed, kept_names, decision, fit_stats, warnings, class_name)

    def attach_prior(self, memory: PatchMemory, class_name: str | None) -> None:
        """Fuse the decoder's weighted prior into the memory's maps when the preset asks for it."""
        weight = self.preset.decoder.fusion_weight
        if weight > 0 and self.prior is not None:  # the decoder loads only when it is fused
            memory.prior = self.prior.weighted(class_name or self.preset.decoder.class_name or None, weight)

    def load_profile(self, path: str | Path) -> References:
        """The references a saved profile holds (no re-indexing); ProfileError for another preset or a bad file."""
        from anomalygpt.profile import load_references

        return load_references(path, self)

    def save_profile(
        self, references: References, path: str | Path, reference_files: Sequence[str | Path] | None = None
    ) -> Path:
        """Write references as a profile (one file, atomically), with the hashes of the files they came from."""
        from anomalygpt.profile import save_profile

        return save_profile(path, references, self.preset, reference_files)

    def index(
        self, images: Sequence[np.ndarray], progress: bool
    ) -> tuple[PatchMemory, AugmentationDecision, dict[int, list[torch.Tensor]]]:
        """The memory, the augmentation decision and the held-out references' views (for the thresholds)."""
        cfg = self.preset.memory
        rng = np.random.default_rng(cfg.seed)
        decision, encoded = decide_augmentation(self.backbone, images, cfg, rng)
        n_views = N_DIHEDRAL if decision.augment else 1
        held = set(held_out_choice(len(images), self.preset.calibration))
        held_out: dict[int, list[torch.Tensor]] = {}

        def keep_held_out(index: int, views: list[torch.Tensor]) -> None:
            if index in held:
                held_out[index] = views

        bar = tqdm(total=len(images), desc="index references", unit="image", disable=not progress or None)
        memory = PatchMemory.build(
            self.backbone,
            images,
            cfg,
            decision.augment,
            on_reference=keep_held_out,
            encoded={i: [v[:n_views] for v in views] for i, views in encoded.items()},
            on_progress=bar.update,
        )
        bar.close()
        return memory, decision, held_out

    def inspect(
        self,
        image: ImageSource,
        references: References | Sequence[ImageSource] | None = None,
        class_name: str | None = None,
        source: str | None = None,
        sensitivity: float = 0.0,
    ) -> Inspection:
        """Inspect one image: few-shot against references, zero-shot with none; `sensitivity` lowers thresholds.
        An image with a side over verdict.MAX_WORKING_SIDE is inspected downscaled (the result's image_size; source_size
        is the file's)."""
        original, sha256 = load_source(image)
        pixels = working_image(original)
        if not references:
            inspection = self.inspect_zero_shot(pixels, class_name, source, sensitivity)
        else:
            refs = references if isinstance(references, References) else self.fit(references, class_name)
            inspection = self.inspect_few_shot(pixels, refs, class_name, source, sensitivity)
        if pixels.shape[:2] != original.shape[:2]:
            inspection.source_size = (int(original.shape[0]), int(original.shape[1]))
        inspection.source_sha256 = sha256
        return inspection

    def inspect_few_shot(
        self, pixels: np.ndarray, refs: References, class_name: str | None, source: str | None, sensitivity: float
    ) -> Inspection:
        """The memory's map of an image already at its working size, with the reference-fit check."""
        check_query_size(pixels, refs, source)
        start = time.perf_counter()
        brightness = float(grey_thumbnail(pixels).mean())
        image = Decoded(pixels, pixels.shape[:2], brightness, memory_inputs([pixels], refs.memory.cfg)[0])
        with torch.inference_mode():
            patches = self.backbone.encode([image.memory_input]).patches
            feats = embed_patches(patches, refs.memory.cfg.neighbourhood)
            anomaly_map = refs.memory.fuse(refs.memory.stage_maps(feats), pixels.shape[:2])[0]
        timings = {"inspect": (time.perf_counter() - start) * 1000, "index_references": refs.index_ms}
        finish = Finisher.of(self, refs, class_name or refs.class_name, sensitivity)  # as inspect_many's images
        return finish(image, source, anomaly_map, None, appearance(feats[-1])[0].cpu(), timings)

    def inspect_many(
        self,
        images: Sequence[ImageSource],
        references: References,
        class_name: str | None = None,
        sources: Sequence[str] | None = None,
        sensitivity: float = 0.0,
        batch_size: int = BATCH_SIZE,
        progress: bool = False,
        half: bool = False,
        processes: int = 0,
    ) -> Iterator[Inspection]:
        """Inspect many images against one indexed reference set, in batches; yields what `inspect` gives each
        image, in order. Images are decoded (and standardised) a batch ahead of the backbone, and each image's
        tail (reference fit, verdict, regions) is finished while the next batch runs: in threads, or with
        `processes` > 0 in that many worker processes (spawned for this call, a second or two each: for large jobs
        on many cores, where the threads' Python holds one another back; pixels and maps reach them through
        anomalygpt.shared_batch files, and one that dies is a ChildProcessError). On a GPU (the device path) the
        maps are smoothed and scored there, and only the results come back. `half`: on the device path, the
        backbone under float16 autocast and the nearest-patch search in float16 (else ignored). A file that does
        not decode, or a query whose size is not the references', raises when its batch is reached."""
        if sources is not None and len(sources) != len(images):
            raise InspectionError(f"{len(sources)} sources given for {len(images)} images")
        if batch_size < 1:
            raise InspectionError(f"batch_size must be at least 1, got {batch_size}")
        if processes < 0:
            raise InspectionError(f"processes must be 0 (threads) or more, got {processes}")
        labels = list(sources) if sources is not None else [None] * len(images)
        bar = tqdm(total=len(images), desc="inspecting", unit="image", disable=not progress)
        finishing: Finishing = Finishing([], None)
        finisher = Finisher.of(self, references, class_name or references.class_name, sensitivity)
        shared = SharedBatches(batch_size, references.memory.image_size) if processes else None
        try:
            with shared or contextlib.nullcontext(), worker_pool(finisher, processes) as pool:  # the pool ends first
                for batch in decoded_batches(images, labels, batch_size, references.memory.cfg, pool, shared):
                    done, finishing = finishing, self.few_shot_batch(batch, references, finisher, pool, half)
                    yield from done.collected(shared, bar)
                yield from finishing.collected(shared, bar)
        except BrokenExecutor as error:  # an OSError, which the command line reports in one line
            raise ChildProcessError(f"a worker process ended abruptly (killed, or out of memory?): {error}") from error
        bar.close()

    def few_shot_batch(
        self, batch: DecodedBatch, refs: References, finisher: Finisher, pool: Executor, half: bool
    ) -> Finishing:
        """inspect_few_shot for a batch of decoded images: one backbone pass and one batched nearest-patch search
        now, each image's tail submitted to the pool (threads call the finisher; worker processes their copy of
        it, reading pixels and map from the batch's shared file)."""
        for image, source in zip(batch.images, batch.sources, strict=True):
            check_query_size(image.pixels, refs, source)
        start = time.perf_counter()
        maps, scores, looks = self.batch_maps([d.memory_input for d in batch.images], refs.memory, half)
        timings = {
            "inspect": (time.perf_counter() - start) * 1000 / len(batch.images),
            "index_references": refs.index_ms,
        }
        spans = chunks(len(batch.images), 1 if batch.shared is None else WORKER_CHUNK)
        if batch.shared is None:
            futures = [
                pool.submit(
                    finish_chunk,
                    finisher,
                    batch.images[a:b],
                    batch.sources[a:b],
                    maps[a:b],
                    scores[a:b],
                    looks[a:b],
                    timings,
                )
                for a, b in spans
            ]
            return Finishing(futures, None)
        batch.shared.arrays()[2][: len(maps)] = maps
        stored = [image.stored() for image in batch.images]
        futures = [
            pool.submit(
                finish_in_worker,
                batch.shared,
                a,
                stored[a:b],
                batch.sources[a:b],
                scores[a:b],
                looks[a:b].numpy(),
                timings,
            )
            for a, b in spans
        ]
        return Finishing(futures, batch.shared, list(maps))

    @torch.inference_mode()
    def batch_maps(
        self, inputs: Sequence[np.ndarray], memory: PatchMemory, half: bool
    ) -> tuple[np.ndarray, list[float | None], torch.Tensor]:
        """(B, H, W) maps of same-size memory inputs, their scores (on the device path; None where `inspection`
        computes them) and (B, C) appearances on the CPU."""
        cfg = memory.cfg
        device = self.backbone.mean.device
        gpu = device.type != "cpu" if self.device_path is None else self.device_path
        half = half and gpu
        with torch.autocast(device.type, torch.float16) if half else contextlib.nullcontext():
            patches = self.backbone.encode(inputs, len(inputs) if gpu else CPU_PASS).patches
        feats = embed_patches(patches, cfg.neighbourhood)  # float32
        stage_maps = memory.stage_maps(feats, half)
        looks = appearance(feats[-1]).cpu()  # (B, C)
        if not gpu:
            return memory.fuse(stage_maps, memory.image_size), [None] * len(inputs), looks
        fused = fused_tensor(stage_maps, memory.image_size, cfg.sigma)  # (B, H, W) on the GPU
        return fused.cpu().numpy(), top_means(fused, cfg.top_fraction).tolist(), looks

    def zero_shot_prior(self) -> TextPrior:
        """The decoder, loaded now; InspectionError when the preset has none."""
        if self.prior is None:
            raise InspectionError(
                f"no good reference images given and preset {self.preset.name!r} has no trained decoder for "
                f"zero-shot inspection; give 1 to {MAX_REFERENCES} good references (--ref)"
            )
        return self.prior

    @torch.inference_mode()
    def inspect_zero_shot(
        self, pixels: np.ndarray, class_name: str | None, source: str | None, sensitivity: float
    ) -> Inspection:
        """The decoder's map alone, thresholded by statistics of simulated validation normals."""
        self.zero_shot_prior()
        start = time.perf_counter()
        anomaly_map = self.zero_shot_maps(self.backbone.encode([pixels]).patches, pixels.shape[:2], class_name)[0]
        calibration = self.zero_shot_calibration()
        timings = {"inspect": (time.perf_counter() - start) * 1000}
        inspection = self.geometry.inspection(
            pixels, anomaly_map, Mode("zero-shot-text", 0, calibration), class_name, source, sensitivity, timings
        )
        inspection.warnings = [*query_warnings(pixels, None, self.geometry.input_side), ZERO_SHOT_TEXT_CAVEAT]
        return inspection

    def inspect_batch(
        self,
        images: Sequence[ImageSource],
        class_name: str | None = None,
        sources: Sequence[str] | None = None,
        sensitivity: float = 0.0,
        progress: bool = False,
    ) -> Iterator[Inspection]:
        """Zero-shot from the batch itself (anomalygpt.mutual): at least MIN_BATCH images of one product and size,
        no references; each image scored against the others, the threshold from the batch's own scores. Yields
        the inspections in order (their maps are made one at a time, so a large batch's maps never all coexist);
        every check and the scoring run before this returns.
        """
        if len(images) < MIN_BATCH:
            raise InspectionError(f"batch zero-shot needs at least {MIN_BATCH} images, got {len(images)}")
        names = list(sources) if sources is not None else [reference_name(image, i) for i, image in enumerate(images)]
        start = time.perf_counter()
        cfg = self.preset.memory
        feats, sizes, hashes = [], [], []
        bar = tqdm(total=2 * len(images), desc="batch zero-shot", unit="image", disable=not progress)
        for first in range(0, len(images), 16):
            loaded = [
                load_source(image, name=name)
                for image, name in zip(images[first : first + 16], names[first : first + 16], strict=True)
            ]
            chunk = [working_image(original) for original, _ in loaded]
            hashes += [sha256 for _, sha256 in loaded]
            sizes += [image.shape[:2] for image in chunk]
            with torch.inference_mode():
                patches = self.backbone.encode(memory_inputs(chunk, cfg)).patches
                feats.append(embed_patches(patches[-1:], cfg.neighbourhood)[0].half())
            bar.update(len(chunk))
        for name, size in zip(names, sizes, strict=True):
            if size != sizes[0]:
                raise InspectionError(
                    f"{name}: {size[1]}x{size[0]} px but {names[0]} is {sizes[0][1]}x{sizes[0][0]} px; a batch "
                    "inspected without references must be of one size"
                )
        maps, scores = self.batch_scores(torch.cat(feats), sizes[0], on_image=lambda: bar.update(1))
        bar.close()
        mode = Mode("zero-shot-batch", 0, batch_calibration(scores), self.backbone.strides[-1])  # deepest stage only
        timings = {"inspect": (time.perf_counter() - start) * 1000 / len(images)}  # the batch's time, per image

        def inspections() -> Iterator[Inspection]:
            for index, (image, name) in enumerate(zip(images, names, strict=True)):
                original, sha256 = load_source(image, name=name)  # decoded again: the batch's are not all kept
                if sha256 != hashes[index]:
                    raise InspectionError(f"{name}: changed while the batch was inspected (not the bytes scored)")
                anomaly_map = fuse_maps([maps[index][None]], sizes[0], cfg.sigma)[0]
                pixels = working_image(original)
                inspection = self.geometry.inspection(pixels, anomaly_map, mode, class_name, name, sensitivity, timings)
                inspection.warnings = query_warnings(pixels, None, self.geometry.input_side)
                inspection.source_sha256 = sha256
                yield inspection

        return inspections()

    def batch_scores(
        self,
        feats: torch.Tensor,
        size: tuple[int, int],
        on_image: Callable[[], None] | None = None,
        rows: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Mutual maps (N, h, w) of a batch's embedded deepest-stage features (N, C, h, w) and each image's score
        (with rows, those images' only, as the whole batch's scoring makes them). Each full-size map is made twice,
        here for its score and again when it is shown: keeping them all would hold N x H x W floats (16 GB for
        1,000 images of 2,048 px); the small maps are kept instead."""
        cfg = self.preset.memory
        maps = mutual_maps(feats, seed=cfg.seed, on_image=on_image, rows=rows)
        scores = np.array([top_mean(fuse_maps([m[None]], size, cfg.sigma)[0], cfg.top_fraction) for m in maps])
        return maps, scores

    @torch.inference_mode()
    def zero_shot_maps(
        self, patches: Sequence[torch.Tensor], size: tuple[int, int], class_name: str | None = None
    ) -> np.ndarray:
        """(B, H, W) decoder maps from the backbone's raw patches of B images of size (H, W)."""
        feats = embed_patches(patches, self.preset.memory.neighbourhood)
        abnormal = self.zero_shot_prior().abnormal(feats, class_name or self.preset.decoder.class_name or None)
        return fuse_maps(abnormal, size, self.preset.memory.sigma)

    def zero_shot_calibration(self) -> Calibration:
        """Thresholds of the decoder's map, fixed from its simulated validation normals."""
        prior = self.zero_shot_prior()
        stats = prior.zero_shot
        method = f"zero-shot: threshold fixed from {int(stats['n_normals'])} simulated validation normals"
        return fixed_calibration(
            stats["normal_mean"],
            stats["normal_spread"],
            stats["pixel_quantile_value"],
            int(stats["n_normals"]),
            self.preset.calibration,
            f"{method} ({prior.source})",
        )


class Mode(NamedTuple):
    name: str  # "few-shot", "pool", "zero-shot-text" (the text-aligned decoder) or "zero-shot-batch"
    n_references: int
    calibration: Calibration
    stride: int | None = None  # the backbone stride of the map's finest stage; None: the backbone's finest


def check_query_size(pixels: np.ndarray, refs: References, source: str | None) -> None:
    """InspectionError unless the query (at its working size) has the references' size."""
    if pixels.shape[:2] != refs.memory.image_size:
        h, w = refs.memory.image_size
        raise InspectionError(
            f"{source or 'query'}: {pixels.shape[1]}x{pixels.shape[0]} px but the references "
            f"are {w}x{h} px; queries and references must have the same size"
        )


class MapGeometry(NamedTuple):
    """What turns a map into an Inspection besides its calibration: the preset's top fraction, the backbone's finest
    stride and input side (the smallest region kept)."""

    top_fraction: float
    stride: int
    input_side: int

    def inspection(
        self,
        pixels: np.ndarray,
        anomaly_map: np.ndarray,
        mode: Mode,
        class_name: str | None,
        source: str | None,
        sensitivity: float,
        timings: dict[str, float],
        score: float | None = None,
    ) -> Inspection:
        """The Inspection of a map; `score` when already computed (on a GPU), else the map's top_mean."""
        score = top_mean(anomaly_map, self.top_fraction) if score is None else score
        height, width = pixels.shape[:2]
        min_region_px = map_cell_px(height, width, mode.stride or self.stride, self.input_side)
        return Inspection.decided(
            pixels,
            anomaly_map,
            score,
            mode.calibration,
            sensitivity,
            min_region_px,
            mode=mode.name,
            n_references=mode.n_references,
            class_name=class_name,
            source=source,
            timings_ms={key: round(value, 1) for key, value in timings.items()},
        )


@dataclass(frozen=True)
class Finisher:
    """The tail of one image's inspection in inspect_many, from its batch's map, score and appearance: the
    reference-fit check, the verdict and the regions. It holds no model and no memory bank, so a worker process
    receives it once (pickled) and finishes images as a thread would."""

    geometry: MapGeometry
    mode: Mode
    fit_stats: FitStatistics
    appearances: torch.Tensor  # (N, C) of the references, on the CPU
    names: list[str]
    warnings: list[str]
    class_name: str | None
    sensitivity: float

    @classmethod
    def of(cls, inspector: Inspector, refs: References, class_name: str | None, sensitivity: float) -> Finisher:
        mode = Mode(refs.mode, refs.memory.n_references, refs.calibration)
        appearances = refs.cpu_appearances
        return cls(
            inspector.geometry, mode, refs.fit_stats, appearances, refs.names, refs.warnings, class_name, sensitivity
        )

    def __call__(
        self,
        image: Decoded,
        source: str | None,
        anomaly_map: np.ndarray,
        score: float | None,
        look: torch.Tensor,
        timings: dict[str, float],
    ) -> Inspection:
        fit = reference_fit(look, image.brightness, self.appearances, self.fit_stats, self.names)
        inspection = self.geometry.inspection(
            image.pixels, anomaly_map, self.mode, self.class_name, source, self.sensitivity, timings, score
        )
        inspection.warnings = query_warnings(image.pixels, fit, self.geometry.input_side) + self.warnings
        inspection.reference_fit = fit
        if image.pixels.shape[:2] != image.source_size:
            inspection.source_size = image.source_size
        inspection.source_sha256 = image.sha256
        return inspection


WORKER_FINISHER: list[Finisher] = []  # in an inspect_many worker process: the call's finisher


def start_worker(finisher: Finisher) -> None:
    """A worker process of inspect_many: one torch thread (the processes are the parallelism), the finisher kept."""
    torch.set_num_threads(1)
    WORKER_FINISHER[:] = [finisher]


def finish_chunk(
    finisher: Finisher,
    images: Sequence[Decoded],
    sources: Sequence[str | None],
    maps: np.ndarray,
    scores: Sequence[float | None],
    looks: torch.Tensor,
    timings: dict[str, float],
) -> list[Inspection]:
    """The finisher over consecutive images of a batch (one task of the pool)."""
    found = zip(images, sources, maps, scores, looks, strict=True)
    return [
        finisher(image, source, anomaly_map, score, look, timings) for image, source, anomaly_map, score, look in found
    ]


def finish_in_worker(
    shared: SharedBatch,
    first: int,
    images: Sequence[Decoded],
    sources: Sequence[str | None],
    scores: Sequence[float | None],
    looks: np.ndarray,
    timings: dict[str, float],
) -> list[Inspection]:
    """finish_chunk in a worker process, on images first, first + 1, ... of a shared batch, their pixels and maps
    read from the batch's file; the inspections come back without their maps (the caller holds them). The
    appearances come as numpy: a process pool's pickler sends a torch tensor through a shared-memory segment of
    its own (60 us to make, and a socket round trip to the caller to open)."""
    pixels, _, maps = shared.arrays()
    span = slice(first, first + len(images))
    images = [image._replace(pixels=pixels[first + i]) for i, image in enumerate(images)]
    found = finish_chunk(WORKER_FINISHER[0], images, sources, maps[span], scores, torch.from_numpy(looks), timings)
    for inspection in found:
        inspection.anomaly_map = None
    return found


def decode_chunk(images: Sequence[ImageSource], labels: Sequence[str | None], cfg: MemoryConfig) -> list[Decoded]:
    """decoded() over consecutive images (one task of the pool)."""
    return [decoded(image, label, cfg) for image, label in zip(images, labels, strict=True)]


def decode_in_worker(
    shared: SharedBatch, first: int, images: Sequence[ImageSource], labels: Sequence[str | None], cfg: MemoryConfig
) -> list[Decoded]:
    """decode_chunk in a worker process, the pixels and memory inputs written to slots first, first + 1, ... of
    the shared batch and left out of what comes back (Decoded.stored); an image of another size comes back
    whole, for the caller to refuse as a thread's would be."""
    found = decode_chunk(images, labels, cfg)
    pixels, inputs, _ = shared.arrays()
    for index, image in enumerate(found):
        if image.pixels.shape[:2] == shared.shape and image.memory_input.shape == image.pixels.shape:
            pixels[first + index], inputs[first + index] = image.pixels, image.memory_input
            found[index] = image.stored()
    return found


def chunks(count: int, per_task: int) -> list[tuple[int, int]]:
    """(start, stop) spans over `count` consecutive images, `per_task` at a time: inspect_many's batches, and its
    pool's tasks, WORKER_CHUNK for worker processes (a process pool costs its caller ~0.1-0.2 ms of CPU per task),
    1 for threads (a small batch keeps its images' tails in parallel)."""
    return [(first, min(first + per_task, count)) for first in range(0, count, per_task)]


def worker_pool(finisher: Finisher, processes: int) -> Executor:
    """Where inspect_many decodes and finishes images: DECODE_THREADS threads, or `processes` spawned processes
    (torch, and CUDA on a GPU machine, stay out of forked children) holding the finisher."""
    if processes == 0:
        return ThreadPoolExecutor(DECODE_THREADS)
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(processes, context, initializer=start_worker, initargs=(finisher,))


class Decoded(NamedTuple):
    """A query prepared off the main thread: everything per pixel that does not need the models."""

    pixels: np.ndarray  # (H, W, 3) uint8 at its working size
    source_size: tuple[int, int]  # (H, W) of the file
    brightness: float  # mean grey level of its thumbnail, for the reference-fit check
    memory_input: np.ndarray  # the pixels as the memory sees them (standardised when the preset says so)
    sha256: str | None = None  # of the file's bytes decoded (None when not given a file)

    def stored(self) -> Decoded:
        """This without its arrays, which a shared batch holds (what crosses a worker process's pipe)."""
        return self._replace(pixels=IN_SHARED_BATCH, memory_input=IN_SHARED_BATCH)

    def from_shared(self, pixels: np.ndarray, memory_input: np.ndarray) -> Decoded:
        """This with its arrays from its shared batch, when a worker stored them there."""
        return self._replace(pixels=pixels, memory_input=memory_input) if self.pixels.size == 0 else self


IN_SHARED_BATCH = np.empty((0, 0, 3), np.uint8)  # Decoded's arrays when a SharedBatch holds them (no image is empty)


class DecodedBatch(NamedTuple):
    images: list[Decoded]
    sources: list[str | None]
    shared: SharedBatch | None  # where worker processes hold the batch's arrays (None: threads)


class Finishing(NamedTuple):
    """A batch's tails submitted to the pool; with worker processes, the shared batch they read and the maps
    their inspections come back without."""

    futures: list[Future[list[Inspection]]]  # one per chunk of consecutive images
    shared: SharedBatch | None
    maps: Sequence[np.ndarray] = ()

    def collected(self, batches: SharedBatches | None, bar: tqdm) -> Iterator[Inspection]:
        """The inspections in order, each with its map; the shared batch released once all are in."""
        found = (inspection for future in self.futures for inspection in future.result())
        for index, inspection in enumerate(found):
            if self.shared is not None:
                inspection.anomaly_map = self.maps[index]
            bar.update()
            yield inspection
        if self.shared is not None and batches is not None:
            batches.release(self.shared)


def decoded(image: ImageSource, label: str | None, cfg: MemoryConfig) -> Decoded:
    original, sha256 = load_source(image, name=label)
    pixels = working_image(original)
    size = (int(original.shape[0]), int(original.shape[1]))
    return Decoded(pixels, size, float(grey_thumbnail(pixels).mean()), memory_inputs([pixels], cfg)[0], sha256)


def decoded_batches(
    images: Sequence[ImageSource],
    labels: Sequence[str | None],
    batch_size: int,
    cfg: MemoryConfig,
    pool: Executor,
    shared: SharedBatches | None,
) -> Iterator[DecodedBatch]:
    """The images decoded in batches, the next batch decoding in the pool (threads: decoders and numpy release the
    GIL; or worker processes, writing into a new shared batch) while the caller works on this one."""
    spans = chunks(len(images), batch_size)

    def submit(span: tuple[int, int]) -> tuple[list[Future[list[Decoded]]], SharedBatch | None]:
        first = span[0]
        parts = [(first + a, first + b) for a, b in chunks(span[1] - first, 1 if shared is None else WORKER_CHUNK)]
        if shared is None:
            return [pool.submit(decode_chunk, images[a:b], labels[a:b], cfg) for a, b in parts], None
        batch = shared.new()
        return [pool.submit(decode_in_worker, batch, a - first, images[a:b], labels[a:b], cfg) for a, b in parts], batch

    pending = submit(spans[0]) if spans else ([], None)
    for index, span in enumerate(spans):
        ahead = submit(spans[index + 1]) if index + 1 < len(spans) else ([], None)
        futures, batch = pending
        found = [image for future in futures for image in future.result()]
        if batch is not None:
            pixels, inputs, _ = batch.arrays()
            found = [image.from_shared(pixels[i], inputs[i]) for i, image in enumerate(found)]
        yield DecodedBatch(found, list(labels[span[0] : span[1]]), batch)
        pending = ahead


def reference_images(references: Sequence[ImageSource], names: Sequence[str]) -> Sequence[np.ndarray]:
    """The references as images: decoded now when few, else each time they are read (LazyImages)."""
    if len(references) > MAX_REFERENCES_IN_MEMORY:
        return LazyImages(references, names)
    return [working_image(load_image(ref, name=name)) for ref, name in zip(references, names, strict=True)]


def subset(images: Sequence[np.ndarray], keep: Sequence[int]) -> Sequence[np.ndarray]:
    """The images at `keep`, still decoded lazily when they were."""
    if isinstance(images, LazyImages):
        return LazyImages([images.sources[i] for i in keep], [images.names[i] for i in keep])
    return [images[i] for i in keep]


def reference_set_warnings(n_references: int) -> list[str]:
    """Warnings every inspection against this reference set carries."""
    return [ONE_REFERENCE_CAVEAT] if n_references == 1 else []


def reference_name(ref: ImageSource, index: int) -> str:
    return str(ref) if isinstance(ref, (str, Path)) else f"reference {index + 1}"


def build_inspector(preset: str | Preset = DEFAULT_PRESET) -> Inspector:
    """The one factory: a preset name, JSON path or Preset -> Inspector with its frozen backbone (and decoder)."""
    cfg = preset if isinstance(preset, Preset) else load_preset(preset)
    cfg = dataclasses.replace(cfg, device=resolve_device(cfg.device))  # "auto" in a preset built in code
    backbone = build_backbone(cfg.backbone).to(cfg.device)
    # The decoder (and its text encoder, seconds to load) is loaded now only when every few-shot map uses it.
    prior = load_prior(cfg) if cfg.decoder.weights and cfg.decoder.fusion_weight > 0 else None
    return Inspector(backbone, cfg, prior)


def weights_stem(name: str) -> Path:
    """A bare name means weights/<name>; anything with a folder in it is a path (without suffix)."""
    path = Path(name)
    return path if path.is_absolute() or path.parent != Path(".") else WEIGHTS_DIR / name


def load_prior(cfg: Preset) -> TextPrior:
    """The trained decoder named by the preset, checked against the preset's backbone, embedding and text encoder."""
    stem = weights_stem(cfg.decoder.weights)
    state, config = load_module(stem)
    preset = to_dict(cfg)
    expected = {
        "backbone": {key: preset["backbone"][key] for key in ("name", "image_size", "stages")},
        "neighbourhood": cfg.memory.neighbourhood,
        "text": preset["text"],
    }
    found = {key: config.get(key) for key in expected}
    if json.loads(json.dumps(found)) != json.loads(json.dumps(expected)):
        differing = ", ".join(key for key in expected if json.dumps(found[key]) != json.dumps(expected[key]))
        raise WeightsError(f"{stem}: decoder trained for another {differing} than preset {cfg.name!r} uses")
    spec = config["spec"]
    decoder = AnomalyDecoder(DecoderSpec(**{**spec, "stage_dims": tuple(spec["stage_dims"])}))
    load_into(decoder, state, str(stem))
    return TextPrior(
        decoder.to(cfg.device), build_text_encoder(cfg.text).to(cfg.device), config["zero_shot"], stem.name
    )
