"""Feature autoencoder: a 1x1-convolution autoencoder reconstructs the normals' CNN patch features.

Patches it reconstructs badly are anomalous (the idea of Shi et al.'s Deep Feature Reconstruction, on the same
locally aware features as PatchCore, standardised per channel with the training statistics).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from anomalygpt.baselines.features import extract_grids, patch_grid
from anomalygpt.detector import (
    DetectorError,
    FeatureCache,
    FitReport,
    Prediction,
    Stopwatch,
    checkpoint_fingerprint,
    gaussian_threshold,
    load_checkpoint,
    save_checkpoint,
    top_scores,
)
from anomalygpt.io import ImageSource
from anomalygpt.memory import fuse_maps

CHECKPOINT = "feature-ae.safetensors"


@dataclass(frozen=True)
class FeatureAEConfig:
    neighbourhood: int = 3  # patch features averaged over an n x n window per stage, as in PatchCore
    hidden: int = 64  # width of the first encoder and last decoder layer
    bottleneck: int = 32  # code width per position: narrow enough that it cannot copy its input
    epochs: int = 10  # 1,000 ELPV cells at 320 px: ~10 s of one core an epoch, ~2 min for the fit
    batch_images: int = 16  # images per optimisation step (all their positions)
    learning_rate: float = 1e-3  # Adam
    sigma: float = 4.0  # Gaussian smoothing of the map, in image pixels
    top_fraction: float = 0.01  # image score = mean of the highest fraction of map pixels


def validate(config: FeatureAEConfig) -> None:
    positive = ("neighbourhood", "hidden", "bottleneck", "epochs", "batch_images")
    for field in positive:
        if getattr(config, field) < 1:
            raise DetectorError(f"feature-ae: {field} must be at least 1, got {getattr(config, field)}")
    if config.neighbourhood % 2 == 0:
        raise DetectorError(f"feature-ae: neighbourhood must be odd, got {config.neighbourhood}")
    if not config.learning_rate > 0:
        raise DetectorError(f"feature-ae: learning_rate must be positive, got {config.learning_rate}")
    if config.sigma < 0:
        raise DetectorError(f"feature-ae: sigma must be >= 0, got {config.sigma}")
    if not 0.0 < config.top_fraction <= 1.0:
        raise DetectorError(f"feature-ae: top_fraction must be in (0, 1], got {config.top_fraction}")


class Standardiser(NamedTuple):
    mean: torch.Tensor  # (1, C, 1, 1)
    std: torch.Tensor  # (1, C, 1, 1)

    def __call__(self, grid: torch.Tensor) -> torch.Tensor:
        return (grid.float() - self.mean) / self.std


def channel_statistics(grids: torch.Tensor, per_chunk: int = 64) -> Standardiser:
    """Per-channel mean and std of (N, C, h, w) float16 grids, accumulated in float64 chunk by chunk."""
    total = torch.zeros(grids.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for i in range(0, len(grids), per_chunk):
        chunk = grids[i : i + per_chunk].double()
        total += chunk.sum(dim=(0, 2, 3))
        squares += chunk.square().sum(dim=(0, 2, 3))
    count = grids.numel() / grids.shape[1]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-6)  # constant channels: no division by 0
    return Standardiser(mean.float().view(1, -1, 1, 1), std.float().view(1, -1, 1, 1))


def autoencoder(channels: int, config: FeatureAEConfig, generator: torch.Generator) -> nn.Sequential:
    """C -> hidden -> bottleneck -> hidden -> C with 1x1 convolutions, initialised from generator (no global RNG)."""
    widths = (channels, config.hidden, config.bottleneck, config.hidden, channels)
    layers: list[nn.Module] = []
    for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Conv2d(w_in, w_out, 1, device="meta"))
        if i < len(widths) - 2:
            layers += [nn.BatchNorm2d(w_out, device="meta"), nn.ReLU()]
    model = nn.Sequential(*layers).to_empty(device="cpu")
    for layer in model:
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_uniform_(layer.weight, nonlinearity="relu", generator=generator)
            nn.init.zeros_(layer.bias)  # type: ignore[arg-type]  # Conv2d has a bias unless bias=False
        elif isinstance(layer, nn.BatchNorm2d):
            layer.reset_parameters()
    return model


def error_grid(model: nn.Module, standardised: torch.Tensor) -> torch.Tensor:
    """(B, h, w) mean squared reconstruction error per position of standardised (B, C, h, w) features."""
    return (model(standardised) - standardised).square().mean(dim=1)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The image order of one epoch, seeded by (seed, epoch): a resumed fit shuffles as an unbroken one would."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class FeatureAEDetector:
    """1x1-conv autoencoder of standardised patch features; see the module docstring."""

    name = "feature-ae"

    def __init__(self, features: FeatureCache, seed: int, config: FeatureAEConfig) -> None:
        validate(config)
        self.features = features
        self.seed = seed
        self.config = config
        self.model: nn.Sequential | None = None
        self.standardise: Standardiser | None = None
        self.threshold = float("nan")
        self.losses: list[float] = []  # mean training loss per finished epoch

    @property
    def device(self) -> torch.device:
        return self.features.backbone.mean.device

    def fingerprint(self, normals: Sequence[ImageSource]) -> dict[str, Any]:
        return checkpoint_fingerprint(self.name, self.config, self.seed, normals, self.features)

    def fit(self, normals: Sequence[ImageSource], workdir: Path | None = None) -> FitReport:
        watch = Stopwatch()
        if len(normals) < 2:
            raise DetectorError(f"feature-ae: {len(normals)} normal images given; the threshold needs at least 2")
        fingerprint = self.fingerprint(normals)
        path = None if workdir is None else Path(workdir) / CHECKPOINT
        state = None if path is None else load_checkpoint(path, fingerprint)
        resumed = state is not None
        if state is not None and state["epoch"] == self.config.epochs:
            self.restore(state)
        else:
            state = self.train(normals, fingerprint, state, path)
        self.threshold = float(state["threshold"])
        rule = f"mean + 3 std of the image scores of the {len(normals)} training normals themselves (no hold-out)"
        return FitReport(len(normals), watch.seconds, self.threshold, rule, resumed=resumed)

    def restore(self, state: dict[str, Any]) -> None:
        self.standardise = Standardiser(state["mean"].to(self.device), state["std"].to(self.device))
        model = autoencoder(state["mean"].shape[1], self.config, torch.Generator())
        model.load_state_dict(state["model"], strict=True)
        self.model = model.to(self.device).eval()
        self.losses = list(state["losses"])

    def train(
        self,
        normals: Sequence[ImageSource],
        fingerprint: dict[str, Any],
        state: dict[str, Any] | None,
        path: Path | None,
    ) -> dict[str, Any]:
        """Train (from scratch, or on from a partial checkpoint), checkpointing each epoch; the final state."""
        grids, size = extract_grids(self.features, normals, self.config.neighbourhood, f"{self.name}: features")
        standardise = channel_statistics(grids) if state is None else Standardiser(state["mean"], state["std"])
        self.standardise = Standardiser(standardise.mean.to(self.device), standardise.std.to(self.device))
        model = autoencoder(grids.shape[1], self.config, torch.Generator().manual_seed(self.seed)).to(self.device)
        optimiser = torch.optim.Adam(model.parameters(), lr=self.config.learning_rate)
        start, self.losses = 0, []
        if state is not None:
            model.load_state_dict(state["model"], strict=True)
            optimiser.load_state_dict(state["optimiser"])
            start, self.losses = state["epoch"], list(state["losses"])
        self.model = model
        progress = tqdm(range(start, self.config.epochs), desc=f"{self.name}: training", unit="epoch", disable=None)
        for epoch in progress:
            self.losses.append(self.train_epoch(model, optimiser, grids, epoch))
            progress.set_postfix(loss=f"{self.losses[-1]:.4f}")
            threshold = self.training_threshold(grids, size) if epoch + 1 == self.config.epochs else float("nan")
            state = self.snapshot(fingerprint, model, optimiser, epoch + 1, standardise, threshold)
            if path is not None:
                save_checkpoint(path, state)
        model.eval()
        assert state is not None  # epochs >= 1 and a partial checkpoint has epoch < epochs
        return state

    def snapshot(
        self,
        fingerprint: dict[str, Any],
        model: nn.Module,
        optimiser: torch.optim.Optimizer,
        epochs_done: int,
        standardise: Standardiser,
        threshold: float,
    ) -> dict[str, Any]:
        """Checkpoint state after a finished epoch; the threshold is NaN until the last."""
        return {
            "fingerprint": fingerprint,
            "model": {k: v.cpu() for k, v in model.state_dict().items()},
            "optimiser": optimiser.state_dict(),
            "epoch": epochs_done,
            "losses": list(self.losses),
            "mean": standardise.mean.cpu(),
            "std": standardise.std.cpu(),
            "threshold": threshold,
        }

    def train_epoch(self, model: nn.Module, optimiser: torch.optim.Optimizer, grids: torch.Tensor, epoch: int) -> float:
        """One pass over the images in a seeded order; the mean batch loss."""
        assert self.standardise is not None
        model.train()
        order = epoch_order(len(grids), self.seed, epoch)
        losses = []
        for first in range(0, len(order), self.config.batch_images):
            batch = self.standardise(grids[order[first : first + self.config.batch_images]].to(self.device))
            loss = error_grid(model, batch).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        return float(np.mean(losses))

    def training_threshold(self, grids: torch.Tensor, size: tuple[int, int]) -> float:
        """mean + 3 std of the training images' own scores (the original design's rule)."""
        batch = self.config.batch_images
        scores = np.concatenate([self.score_grids(grids[i : i + batch], size)[0] for i in range(0, len(grids), batch)])
        return gaussian_threshold(scores)

    @torch.inference_mode()
    def score_grids(self, grids: torch.Tensor, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(B,) image scores and (B, H, W) maps of (B, C, h, w) raw patch grids of images of size (H, W)."""
        if self.model is None or self.standardise is None:
            raise DetectorError(f"{self.name}: predict before fit")
        self.model.eval()
        errors = error_grid(self.model, self.standardise(grids.to(self.device)))  # (B, h, w)
        maps = fuse_maps([errors], size, self.config.sigma)
        return top_scores(maps, self.config.top_fraction), maps

    @torch.inference_mode()
    def predict(self, images: Sequence[np.ndarray]) -> Prediction:
        if self.model is None:
            raise DetectorError(f"{self.name}: predict before fit")
        grid = patch_grid(self.features.patches(images), self.config.neighbourhood).half()  # float16, as in training
        scores, maps = self.score_grids(grid, images[0].shape[:2])
        return Prediction(scores, maps)


def build(features: FeatureCache, seed: int, config: FeatureAEConfig | None = None) -> FeatureAEDetector:
    """The feature autoencoder on the cache's backbone; DetectorError on an invalid config."""
    return FeatureAEDetector(features, seed, config or FeatureAEConfig())
