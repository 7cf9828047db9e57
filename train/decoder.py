"""Stage 1: train the AnomalyDecoder's projections on simulated anomalies (`anomalygpt train decoder`).

The backbone and the text encoder are frozen, so every simulated image is encoded once and the projections
train on cached features (seconds per epoch). Normals are scikit-image's bundled pictures (simulation.normals):
training and validation come from different pictures. Runs on accelerate: CPU here, one or many GPUs elsewhere.

Features and checkpoints are state files (anomalygpt.state: safetensors, never pickles). A checkpoint holds every
random state the next epoch draws from (the data order's generator, torch's global one), so a killed run resumed
with --resume ends bit-identical to an uninterrupted one on the CPU; the decoder's initial weights are drawn from
the seed alone, so a run that finds its features cached starts exactly where one that computed them does.
"""

from __future__ import annotations

import io
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from anomalygpt.config import Preset, load_preset, to_dict
from anomalygpt.decoder import AnomalyDecoder, DecoderSpec
from anomalygpt.devices import training_accelerator, with_device
from anomalygpt.inspection import build_inspector
from anomalygpt.io import write_bytes_atomic, write_json_atomic
from anomalygpt.memory import embed_patches, fuse_maps, top_mean
from anomalygpt.prompts import text_anchors
from anomalygpt.state import load_cache, load_state, note_ignored_pickles, remove_orphaned_temps, save_state
from anomalygpt.text import build_text_encoder
from anomalygpt.weights import save_module
from simulation.anomalies import load_params, simulate_random
from simulation.normals import TRAIN_PICTURES, VALIDATION_PICTURES, normal_crops, object_images
from train.losses import segmentation_loss

# Product words the anchors are built for during training, so that any class name a user gives lands near them.
TRAIN_WORDS = ("object", "product", "surface", "part", "material", "texture", "component", "item")
MASK_STRIDE = 4  # losses and validation at 1/4 of the image side: finer than the stride-8 features
CHECKPOINT = "checkpoint.safetensors"
FEATURES = "features.safetensors"
LEGACY_CHECKPOINT, LEGACY_FEATURES = "checkpoint.pt", "features.pt"  # pickles of older versions: never loaded
WEIGHTS = "decoder"  # <out>/decoder.safetensors + decoder.json
# Files a run writes atomically: temp files of these that a killed run left are removed when the run starts again.
RUN_FILES = (
    CHECKPOINT,
    FEATURES,
    LEGACY_CHECKPOINT,
    LEGACY_FEATURES,
    f"{WEIGHTS}.safetensors",
    f"{WEIGHTS}.json",
    "history.json",
    "curves.png",
)


@dataclass(frozen=True)
class DecoderTrainConfig:
    out: Path
    preset: str = "default"
    train_samples: int = 2400
    val_samples: int = 400
    anomaly_fraction: float = 0.7  # share of simulated images that carry an anomaly
    object_fraction: float = 0.3  # share of images that are an object on a flat background
    epochs: int = 4  # the projections specialise to the training pictures after a pass or two; the best is kept
    batch_size: int = 32
    lr: float = 5e-4
    hidden: int = 0  # projection width; 0 = linear projections (AnomalyGPT's choice)
    stack_coarser: bool = True  # finer stages' projections also read the coarser stages (DecoderSpec)
    temperature: float = 0.07
    seed: int = 0
    resume: bool = False
    device: str | None = None  # --device: overrides the preset's


@dataclass
class SimulatedSplit:
    feats: list[torch.Tensor]  # per stage (N, C, h, w) float16, the memory's embedding
    masks: torch.Tensor  # (N, H/4, W/4) bool
    labels: torch.Tensor  # (N,) 1 when the image carries an anomaly

    def tree(self) -> dict[str, Any]:
        return {"feats": self.feats, "masks": self.masks, "labels": self.labels}


@dataclass
class History:
    epochs: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_pixel_auroc: list[float] = field(default_factory=list)
    val_image_auroc: list[float] = field(default_factory=list)
    seconds: float = 0.0
    best_epoch: int = -1  # the epoch with the highest validation pixel AUROC: its weights are the ones written

    def at_best(self, values: list[float]) -> float:
        return values[self.epochs.index(self.best_epoch)]


def simulated_images(
    pictures: tuple[str, ...], count: int, size: int, cfg: DecoderTrainConfig, seed: int
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """(images, masks (N, H, W) bool, labels (N,)) from crops of the named pictures; seeded."""
    rng = np.random.default_rng(seed)
    textures = normal_crops(pictures, count, size, rng)
    is_object = rng.random(count) < cfg.object_fraction
    objects = iter(object_images([t for t, o in zip(textures, is_object, strict=True) if o], rng))
    normals = [next(objects) if o else t for t, o in zip(textures, is_object, strict=True)]
    params = {False: load_params(None), True: load_params("hazelnut")}
    images, masks, labels = [], np.zeros((count, size, size), dtype=bool), np.zeros(count, dtype=np.int64)
    for i in tqdm(range(count), desc="simulate", unit="image", leave=False, disable=None):
        sample_rng = np.random.default_rng([seed, i])
        if sample_rng.random() >= cfg.anomaly_fraction:
            images.append(normals[i])
            continue
        sources = [normals[int(j)] for j in sample_rng.choice(count, size=3, replace=False) if j != i]
        simulated = simulate_random(normals[i], sources, params[bool(is_object[i])], sample_rng)
        images.append(simulated.image)
        masks[i], labels[i] = simulated.mask, 1
    return images, masks, labels


@torch.inference_mode()
def encode_split(preset: Preset, images: list[np.ndarray], masks: np.ndarray, labels: np.ndarray) -> SimulatedSplit:
    """Backbone features in the memory's embedding (float16), masks max-pooled to the loss resolution."""
    backbone = build_inspector(preset).backbone
    parts: list[list[torch.Tensor]] = []
    for first in tqdm(range(0, len(images), 16), desc="encode", unit="batch", leave=False, disable=None):
        patches = backbone.encode(images[first : first + 16], batch_size=16).patches
        parts.append([f.half() for f in embed_patches(patches, preset.memory.neighbourhood)])
    feats = [torch.cat([part[stage] for part in parts]) for stage in range(len(parts[0]))]
    pooled = F.max_pool2d(torch.from_numpy(masks).float()[:, None], MASK_STRIDE)[:, 0] > 0.5
    return SimulatedSplit(feats, pooled, torch.from_numpy(labels))


def split_fingerprint(cfg: DecoderTrainConfig, preset: Preset) -> dict[str, Any]:
    keys = ("train_samples", "val_samples", "anomaly_fraction", "object_fraction", "seed")
    return {
        "backbone": asdict(preset.backbone),
        "neighbourhood": preset.memory.neighbourhood,
        **{key: getattr(cfg, key) for key in keys},
    }


def load_or_build_splits(cfg: DecoderTrainConfig, preset: Preset) -> tuple[SimulatedSplit, SimulatedSplit]:
    """The simulated training and validation features, cached in <out>/features.safetensors for --resume."""
    path, fingerprint = cfg.out / FEATURES, split_fingerprint(cfg, preset)
    cached = load_cache(path)
    if isinstance(cached, dict) and cached.get("fingerprint") == fingerprint:
        return SimulatedSplit(**cached["train"]), SimulatedSplit(**cached["val"])
    size = preset.backbone.image_size
    train = encode_split(preset, *simulated_images(TRAIN_PICTURES, cfg.train_samples, size, cfg, cfg.seed))
    val = encode_split(preset, *simulated_images(VALIDATION_PICTURES, cfg.val_samples, size, cfg, cfg.seed + 1))
    save_state(path, {"fingerprint": fingerprint, "train": train.tree(), "val": val.tree()})
    return train, val


def word_anchors(preset: Preset) -> torch.Tensor:
    """(W, 2, D) normal/abnormal anchors for every training word."""
    encoder = build_text_encoder(preset.text)
    return torch.stack([text_anchors(encoder, word) for word in TRAIN_WORDS])


def stage_dims(split: SimulatedSplit) -> tuple[int, ...]:
    return tuple(int(f.shape[1]) for f in split.feats)


@torch.inference_mode()
def decoder_maps(decoder: AnomalyDecoder, feats: list[torch.Tensor], anchors: torch.Tensor, size: int) -> torch.Tensor:
    """(N, size, size) abnormal probability, stages upsampled and averaged (unsmoothed), batched."""
    maps = []
    for first in range(0, feats[0].shape[0], 64):
        abnormal = decoder([f[first : first + 64].float() for f in feats], anchors).abnormal
        up = [
            F.interpolate(a[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0] for a in abnormal
        ]
        maps.append(torch.stack(up).mean(dim=0))
    return torch.cat(maps)


def validate(decoder: AnomalyDecoder, val: SimulatedSplit, anchors: torch.Tensor) -> tuple[float, float]:
    """(pixel AUROC at 1/4 resolution, image AUROC of the top-1% mean) on the validation split."""
    decoder.eval()
    maps = decoder_maps(decoder, val.feats, anchors, val.masks.shape[-1]).numpy()
    pixel = float(roc_auc_score(val.masks.numpy().ravel(), maps.ravel()))
    scores = np.array([top_mean(m, 0.01) for m in maps])
    return pixel, float(roc_auc_score(val.labels.numpy(), scores))


def seeded_decoder(spec: DecoderSpec, seed: int) -> AnomalyDecoder:
    """A fresh decoder drawn from the seed alone, whatever building the backbone and text encoder drew before."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AnomalyDecoder(spec)


def save_checkpoint(
    path: Path,
    epoch: int,
    decoder: AnomalyDecoder,
    optimizer: Any,
    history: History,
    best: dict[str, torch.Tensor],
    order: torch.Generator,
) -> None:
    """Everything the next epoch depends on, random states included: order is the data order's generator."""
    state = {"epoch": epoch, "decoder": decoder.state_dict(), "optimizer": optimizer.state_dict(), "best": best}
    rng = {"order": order.get_state(), "torch": torch.get_rng_state()}
    save_state(path, {**state, "history": asdict(history), "rng": rng})


def read_checkpoint(cfg: DecoderTrainConfig) -> dict[str, Any] | None:
    """The last checkpoint's state (read before anything is built, so a bad one fails fast); None without one."""
    path = cfg.out / CHECKPOINT
    if not path.is_file():
        note_ignored_pickles(cfg.out, [LEGACY_CHECKPOINT], "training starts from epoch 0")
        return None
    return load_state(path)


def resume_state(
    state: dict[str, Any] | None, decoder: AnomalyDecoder, optimizer: Any, order: torch.Generator
) -> tuple[int, History, dict[str, torch.Tensor]]:
    """(first epoch to run, history so far, best weights so far), restored from a checkpoint's state if any."""
    if state is None:
        return 0, History(), {}
    decoder.load_state_dict(state["decoder"], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    order.set_state(state["rng"]["order"])
    torch.set_rng_state(state["rng"]["torch"])
    return int(state["epoch"]) + 1, History(**state["history"]), state["best"]


@torch.inference_mode()
def zero_shot_calibration(
    decoder: AnomalyDecoder, val: SimulatedSplit, anchors: torch.Tensor, preset: Preset
) -> dict[str, float | int]:
    """Statistics of validation normals scored exactly as the zero-shot Inspector scores a query."""
    decoder.eval()
    size = preset.backbone.image_size
    normal = torch.nonzero(val.labels == 0)[:, 0]
    scores, pixels = [], []
    for first in range(0, normal.numel(), 32):
        rows = normal[first : first + 32]
        abnormal = decoder([f[rows].float() for f in val.feats], anchors).abnormal
        maps = fuse_maps(abnormal, (size, size), preset.memory.sigma)
        scores.extend(top_mean(m, preset.memory.top_fraction) for m in maps)
        pixels.append(maps[:, ::4, ::4].ravel())
    values = np.array(scores)
    return {
        "normal_mean": float(values.mean()),
        "normal_spread": float(values.std(ddof=1)) if values.size > 1 else 0.0,
        "pixel_quantile_value": float(np.quantile(np.concatenate(pixels), preset.calibration.pixel_quantile)),
        "n_normals": int(values.size),
    }


def train_epoch(accelerator: Any, decoder: Any, loader: DataLoader, optimizer: Any, anchors: torch.Tensor) -> float:
    decoder.train()
    total, count = 0.0, 0
    for batch in loader:
        *feats, masks, words = batch
        batch_anchors = anchors[int(words[0])]  # one training word per batch
        logits = decoder([f.float() for f in feats], batch_anchors).logits
        loss = segmentation_loss(logits, masks)
        optimizer.zero_grad()
        accelerator.backward(loss)
        optimizer.step()
        total, count = total + float(loss.detach()) * masks.shape[0], count + masks.shape[0]
    return total / max(count, 1)


def train_decoder(cfg: DecoderTrainConfig) -> dict[str, Any]:
    """Simulate, encode, train, validate every epoch, checkpoint, and write the weights of the best epoch.

    The best epoch is the one with the highest pixel AUROC on the validation pictures: a linear projection
    fitted to 16 training pictures starts to specialise to them after one or two passes.
    """

    found = [name for name in (CHECKPOINT, LEGACY_CHECKPOINT) if (cfg.out / name).is_file()]
    if found and not cfg.resume:
        raise ValueError(f"{cfg.out} holds a training run ({found[0]}); pass --resume or choose another --out")
    remove_orphaned_temps(cfg.out, RUN_FILES)  # left by a killed run
    checkpoint = read_checkpoint(cfg)
    note_ignored_pickles(cfg.out, [LEGACY_FEATURES], "features are computed again")
    preset = with_device(load_preset(cfg.preset), cfg.device)
    accelerator = training_accelerator(preset.device)
    train, val = load_or_build_splits(cfg, preset)
    n_normal = int((val.labels == 0).sum())
    if n_normal < 2 or n_normal == val.labels.numel():
        raise ValueError(f"--val-samples {cfg.val_samples}: the validation split needs normal and anomalous images")
    anchors = word_anchors(preset)
    spec = DecoderSpec(stage_dims(train), int(anchors.shape[-1]), cfg.hidden, cfg.temperature, cfg.stack_coarser)
    decoder = seeded_decoder(spec, cfg.seed)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=cfg.lr, weight_decay=1e-4)
    order = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    start_epoch, history, best = resume_state(checkpoint, decoder, optimizer, order)
    words = torch.from_numpy(np.random.default_rng(cfg.seed).integers(len(TRAIN_WORDS), size=train.masks.shape[0]))
    dataset = TensorDataset(*train.feats, train.masks, words)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, generator=order)
    decoder, optimizer, loader = accelerator.prepare(decoder, optimizer, loader)
    generic = anchors[0].to(accelerator.device)
    bar = tqdm(range(start_epoch, cfg.epochs), desc="train decoder", unit="epoch", disable=None)
    for epoch in bar:
        begin = time.perf_counter()
        loss = train_epoch(accelerator, decoder, loader, optimizer, anchors.to(accelerator.device))
        pixel, image = validate(accelerator.unwrap_model(decoder), val, generic)
        history.epochs.append(epoch)
        history.train_loss.append(loss)
        history.val_pixel_auroc.append(pixel)
        history.val_image_auroc.append(image)
        history.seconds += time.perf_counter() - begin
        if not best or pixel > history.at_best(history.val_pixel_auroc):
            history.best_epoch = epoch
            best = {k: v.detach().cpu().clone() for k, v in accelerator.unwrap_model(decoder).state_dict().items()}
        bar.set_postfix(loss=f"{loss:.4f}", val_pixel_auroc=f"{pixel:.4f}", best_epoch=history.best_epoch)
        save_checkpoint(cfg.out / CHECKPOINT, epoch, accelerator.unwrap_model(decoder), optimizer, history, best, order)
    final = accelerator.unwrap_model(decoder)
    final.load_state_dict(best)
    return finish(cfg, preset, final, val, anchors[0], history)


def curves_png(history: History) -> bytes:
    """Training loss and validation AUROCs per epoch, as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.5), dpi=100)
    FigureCanvasAgg(figure)
    loss_axes, auroc_axes = figure.subplots(1, 2)
    loss_axes.plot(history.epochs, history.train_loss, marker=".")
    loss_axes.set(title="training loss (focal + dice, all stages)", xlabel="epoch")
    auroc_axes.plot(history.epochs, history.val_pixel_auroc, marker=".", label="pixel AUROC")
    auroc_axes.plot(history.epochs, history.val_image_auroc, marker=".", label="image AUROC")
    auroc_axes.axvline(history.best_epoch, color="grey", linestyle=":", label=f"kept: epoch {history.best_epoch}")
    auroc_axes.set(title="held-out simulated validation", xlabel="epoch")
    auroc_axes.legend(loc="lower right")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def finish(
    cfg: DecoderTrainConfig,
    preset: Preset,
    decoder: AnomalyDecoder,
    val: SimulatedSplit,
    generic: torch.Tensor,
    history: History,
) -> dict[str, Any]:
    """Zero-shot statistics, the weights with their JSON config, history and curves; returns the config."""
    decoder = decoder.cpu().eval()
    config = {
        "spec": asdict(decoder.spec),
        "backbone": {key: to_dict(preset)["backbone"][key] for key in ("name", "image_size", "stages")},
        "neighbourhood": preset.memory.neighbourhood,
        "text": to_dict(preset)["text"],
        "zero_shot": zero_shot_calibration(decoder, val, generic.cpu(), preset),
        "validation": {
            "epoch": history.best_epoch,
            "pixel_auroc": history.at_best(history.val_pixel_auroc),
            "image_auroc": history.at_best(history.val_image_auroc),
        },
        "training": {**{k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}, "words": TRAIN_WORDS},
        "train_pictures": TRAIN_PICTURES,
        "validation_pictures": VALIDATION_PICTURES,
        "train_seconds": round(history.seconds, 1),
    }
    save_module(cfg.out / WEIGHTS, decoder.state_dict(), config)
    write_json_atomic(cfg.out / "history.json", asdict(history))
    write_bytes_atomic(cfg.out / "curves.png", curves_png(history))
    return config
