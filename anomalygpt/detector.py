"""Detector: the one interface every anomaly detector the benchmark compares satisfies.

`fit(normals)` trains on good images only and sets the detector's own image threshold; `predict(images)` gives
an image score and an anomaly map per image. The Inspector's few-shot engine (`FewShotDetector`) and the
baselines in `anomalygpt/baselines/` (PatchCore, SimpleNet, U-Net autoencoder, feature autoencoder) all satisfy
it, and `build_detector` / `anomalygpt eval --method` pick them by name.

Detectors on the same backbone share a `FeatureCache`, so that in one benchmark run every image is encoded once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np
import torch
from tqdm import tqdm

from anomalygpt.backbones import VisionBackbone
from anomalygpt.io import ImageSource, load_image
from anomalygpt.memory import memory_inputs, top_mean
from anomalygpt.state import load_cache, note_ignored_pickles, remove_orphaned_temps, save_state

if TYPE_CHECKING:
    from anomalygpt.inspection import Inspector, References

THRESHOLD_Z = 3.0  # baselines flag an image above mean + 3 std of their held-out normal scores
VALIDATION_FRACTION = 0.1  # share of the normals a baseline holds out of training to set that threshold
MIN_VALIDATION = 2  # a spread needs two scores
LOAD_BATCH = 16
LEGACY_SUFFIX = ".pt"  # older versions pickled checkpoints as <method>.pt: never loaded


class Prediction(NamedTuple):
    scores: np.ndarray  # (B,) image scores, higher = more anomalous
    maps: np.ndarray  # (B, H, W) float32 anomaly maps at the images' size


@dataclass(frozen=True)
class FitReport:
    n_images: int  # normals the detector saw (training + its own threshold validation)
    seconds: float  # wall time of fit, feature extraction and training included
    threshold: float  # image-score threshold: above it, an image is called anomalous
    threshold_rule: str  # how the threshold was formed, in words
    resumed: bool = False  # training continued from a checkpoint in the work folder
    reference_scores: tuple[float, ...] = ()  # the Inspector's held-out reference scores (Calibration's)


class Detector(Protocol):
    """Fit on normal images, then an image score and a map per image; `threshold` is set by `fit`."""

    name: str
    threshold: float
    config: Any  # the method's settings (a dataclass), recorded with benchmark results

    def fit(self, normals: Sequence[ImageSource], workdir: Path | None = None) -> FitReport:
        """Train on good images; with a workdir, checkpoint there and resume a fit it holds."""
        ...

    def predict(self, images: Sequence[np.ndarray]) -> Prediction:
        """Scores and maps of same-size (H, W, 3) uint8 images."""
        ...


class DetectorError(ValueError):
    """A detector cannot be built or fitted as asked; the message is one line."""


class FeatureCache:
    """The backbone's patch features, computed once per distinct image when `keep` is on (benchmarks)."""

    def __init__(self, backbone: VisionBackbone, keep: bool = False, batch_size: int = 16) -> None:
        self.backbone = backbone
        self.keep = keep
        self.batch_size = batch_size
        self._stored: dict[bytes, list[torch.Tensor]] = {}  # image digest -> per stage (C, h, w) float16
        # Bookkeeping for fair timings when detectors share the cache: backbone work done vs images asked for.
        self.encoded = 0
        self.encode_seconds = 0.0
        self.served = 0

    def _encode(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        watch = Stopwatch()
        patches = self.backbone.encode(images, batch_size=self.batch_size).patches
        self.encoded += len(images)
        self.encode_seconds += watch.seconds
        return patches

    @staticmethod
    def digest(image: np.ndarray) -> bytes:
        return hashlib.blake2b(image.tobytes() + str(image.shape).encode(), digest_size=16).digest()

    @torch.inference_mode()
    def patches(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Per stage (B, C, h, w) float32 patches of the images, on the backbone's device."""
        self.served += len(images)
        if not self.keep:
            return self._encode(images)
        keys = [self.digest(image) for image in images]
        missing = list({key: image for key, image in zip(keys, images, strict=True) if key not in self._stored}.items())
        if missing:
            encoded = self._encode([image for _, image in missing])
            for row, (key, _) in enumerate(missing):
                self._stored[key] = [stage[row].to("cpu", torch.float16) for stage in encoded]
        device = self.backbone.mean.device
        n_stages = len(self._stored[keys[0]])
        return [torch.stack([self._stored[key][s] for key in keys]).to(device, torch.float32) for s in range(n_stages)]

    def forget(self) -> None:
        """Drop the stored features (e.g. when a benchmark moves to the next category)."""
        self._stored.clear()


def load_batches(sources: Sequence[ImageSource], desc: str, batch_size: int = LOAD_BATCH) -> Iterator[list[np.ndarray]]:
    """Decoded images in batches, with a progress bar; DetectorError when sizes differ."""
    size: tuple[int, ...] | None = None
    for first in tqdm(range(0, len(sources), batch_size), desc=desc, unit="batch", leave=False, disable=None):
        batch = [load_image(source) for source in sources[first : first + batch_size]]
        for image, source in zip(batch, sources[first : first + batch_size], strict=True):
            if size is not None and image.shape != size:
                raise DetectorError(
                    f"{describe(source)}: {image.shape[1]}x{image.shape[0]} px, others {size[1]}x{size[0]} px"
                )
            size = image.shape
        yield batch


def describe(source: ImageSource) -> str:
    return str(source) if isinstance(source, (str, Path)) else f"<{type(source).__name__}>"


def validation_split(n: int, seed: int, fraction: float = VALIDATION_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices of n normals; the validation part sets a baseline's threshold."""
    if n < MIN_VALIDATION + 1:
        raise DetectorError(f"{n} normal images given; a trained detector needs at least {MIN_VALIDATION + 1}")
    n_val = max(MIN_VALIDATION, int(round(n * fraction)))
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def gaussian_threshold(scores: np.ndarray, z: float = THRESHOLD_Z) -> float:
    """mean + z * std of normal scores (std with one degree of freedom removed)."""
    return float(np.mean(scores) + z * np.std(scores, ddof=1))


def predict_all(detector: Detector, sources: Sequence[ImageSource], desc: str) -> np.ndarray:
    """Image scores of many images, predicted in batches (maps dropped)."""
    return np.concatenate([detector.predict(batch).scores for batch in load_batches(sources, desc)])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """A baseline's checkpoint as a state file (safetensors + JSON tree), written atomically."""
    save_state(path, state)


def load_checkpoint(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint at path (tensors on the CPU) when it was written for fingerprint (same config and data);
    else None. Temp files a killed fit left are removed; a file that is not a state file (an old pickle `.pt`
    checkpoint, a planted one) is never unpickled: the fit starts afresh, with a note."""
    legacy = path.with_suffix(LEGACY_SUFFIX).name
    remove_orphaned_temps(path.parent, [path.name, legacy])
    note_ignored_pickles(path.parent, [legacy], "this fit starts afresh")
    state = load_cache(path)
    return state if isinstance(state, dict) and state.get("fingerprint") == fingerprint else None


def checkpoint_fingerprint(
    name: str,
    config: Any,
    seed: int,
    normals: Sequence[ImageSource],
    features: FeatureCache | None,
    skip: tuple[str, ...] = (),
) -> dict[str, Any]:
    """What a baseline's checkpoint must match to be resumed: method, config (less the `skip` fields, such as a
    training length a longer fit may extend), seed, data and, for feature methods, the backbone."""
    settings = {key: value for key, value in dataclasses.asdict(config).items() if key not in skip}
    out = {"method": name, "config": settings, "seed": seed, "data": data_fingerprint(normals)}
    if features is not None:
        backbone = features.backbone
        out["backbone"] = [type(backbone).__name__, backbone.image_size, list(backbone.stage_dims)]
    return out


def held_out_rule(n: int) -> str:
    return f"mean + {THRESHOLD_Z:g} std of the image scores of {n} held-out normals"


def held_out_threshold(detector: Detector, normals: Sequence[ImageSource]) -> tuple[float, str]:
    """The baselines' own threshold and its rule: mean + THRESHOLD_Z std of held-out normals' image scores."""
    scores = predict_all(detector, normals, f"{detector.name}: validation")
    return gaussian_threshold(scores), held_out_rule(len(normals))


def resumable_state(
    workdir: Path | None, filename: str, fingerprint: dict[str, Any], progress_key: str, length: int
) -> tuple[Path | None, dict[str, Any] | None]:
    """(checkpoint path, state to resume) of an iterative fit; a checkpoint trained past `length` is not resumed."""
    path = None if workdir is None else Path(workdir) / filename
    state = None if path is None else load_checkpoint(path, fingerprint)
    if state is not None and state[progress_key] > length:
        state = None  # start over rather than return a longer fit than asked for
    return path, state


def data_fingerprint(sources: Sequence[ImageSource]) -> str:
    """A short digest of the normals (paths, or pixels of in-memory images): no checkpoint is reused on other data."""
    h = hashlib.blake2b(digest_size=8)
    for source in sources:
        h.update(str(source).encode() if isinstance(source, (str, Path)) else FeatureCache.digest(load_image(source)))
    return h.hexdigest()


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


class FewShotDetector:
    """The Inspector as a Detector: the normals are its references, thresholds its own. As "inspector" it gets k
    drawn references; as "pool" every training normal (each query then matched against its nearest ones)."""

    def __init__(self, inspector: Inspector, features: FeatureCache, name: str = "inspector") -> None:
        self.name = name
        self.inspector = inspector
        self.config = inspector.preset
        self.features = features
        self.references: References | None = None
        self.threshold = float("nan")

    def fit(self, normals: Sequence[ImageSource], workdir: Path | None = None) -> FitReport:
        watch = Stopwatch()
        self.references = self.inspector.fit(normals)
        calibration = self.references.calibration
        self.threshold = float(calibration.image_threshold)
        scores = calibration.reference_scores
        return FitReport(len(normals), watch.seconds, self.threshold, calibration.method, reference_scores=scores)

    @torch.inference_mode()
    def predict(self, images: Sequence[np.ndarray]) -> Prediction:
        if self.references is None:
            raise DetectorError("inspector: predict before fit")
        memory = self.references.memory
        maps = memory.maps_from_patches(self.features.patches(memory_inputs(images, memory.cfg)), images[0].shape[:2])
        return Prediction(np.array([memory.image_score(m) for m in maps]), maps)


Builder = Callable[[FeatureCache, int], Detector]
# name -> (module, builder function): baselines are imported only when asked for
BASELINES = {
    "patchcore": ("anomalygpt.baselines.patchcore", "build"),
    "simplenet": ("anomalygpt.baselines.simplenet", "build"),
    "unet-ae": ("anomalygpt.baselines.unet_ae", "build"),
    "feature-ae": ("anomalygpt.baselines.feature_ae", "build"),
}
INSPECTOR_METHODS = ("inspector", "pool")  # the Inspector with k drawn references, or with every training normal
METHODS = (*INSPECTOR_METHODS, *BASELINES)


def build_detector(name: str, features: FeatureCache, seed: int = 0, inspector: Inspector | None = None) -> Detector:
    """A detector by name with its default config; `inspector` is needed for "inspector" and "pool"."""
    if name in INSPECTOR_METHODS:
        if inspector is None:
            raise DetectorError(f"the {name} detector needs an Inspector")
        return FewShotDetector(inspector, features, name)
    if name not in BASELINES:
        raise DetectorError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    module, function = BASELINES[name]
    builder: Builder = getattr(importlib.import_module(module), function)
    return builder(features, seed)


def top_scores(maps: np.ndarray, fraction: float) -> np.ndarray:
    """(B,) mean of the highest fraction of each map."""
    return np.array([top_mean(m, fraction) for m in maps])
