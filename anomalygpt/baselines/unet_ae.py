"""U-Net autoencoder baseline: reconstruct good images from pixels; the anomaly map is the reconstruction error.

No pretrained backbone: it is built with the shared FeatureCache only to run on the cache's device. Full-shot:
trained on all the normals it is given except a held-out tenth that sets its image threshold. Skip connections at
full resolution let a U-Net copy its input, anomalies included; the finest skips are left out (`dropped_skips`)
and training inputs can be noised (`noise_std`, a denoising autoencoder) so that it has to reconstruct instead.
Both are on by default: on brick crops with a dark disk (the tests' data) all skips and clean inputs removed a third
to two thirds of the disk from the reconstruction, either measure alone about 0.75-0.88 and both 0.84-0.88; the
choice is checked on simulated anomalies of held-out pictures by bench/bench_baseline_defaults.py. Never on ELPV.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from anomalygpt.baselines.losses import local_ssim, reconstruction_loss
from anomalygpt.detector import (
    DetectorError,
    FeatureCache,
    FitReport,
    Prediction,
    Stopwatch,
    checkpoint_fingerprint,
    held_out_threshold,
    load_batches,
    resumable_state,
    save_checkpoint,
    top_scores,
    validation_split,
)
from anomalygpt.io import ImageSource
from anomalygpt.memory import fuse_maps

CHECKPOINT_NAME = "unet-ae.safetensors"
MIN_IMAGE_SIZE = 16  # room for SSIM's 11 x 11 window
PREDICT_BATCH = 16


@dataclass(frozen=True)
class UNetAEConfig:
    # image_size, width and epochs are set so that ~1,000 ELPV cells train in about 5 minutes on 2 CPU cores.
    image_size: int = 128  # images are resized to this square side to train and predict
    width: int = 8  # channels of the first encoder block; each level down doubles them
    depth: int = 4  # downsampling steps; image_size must be divisible by 2**depth
    dropped_skips: int = 1  # finest skip connections left out, so fine detail (an anomaly) cannot be copied through
    noise_std: float = 0.2  # std of Gaussian noise on training inputs in [0, 1] (denoising); targets stay clean
    epochs: int = 10  # left out of the checkpoint fingerprint, so a longer fit resumes a shorter one
    batch_size: int = 16
    learning_rate: float = 1e-3
    l1_weight: float = 1.0
    ssim_weight: float = 1.0
    map_ssim_weight: float = 0.0  # map = (1 - w) * absolute error + w * (1 - local SSIM), channel means
    # (0: on brick textures the absolute error separated blobs better)
    sigma: float = 4.0  # Gaussian smoothing of the map, in image pixels
    top_fraction: float = 0.01  # image score = mean of the highest fraction of map pixels

    def __post_init__(self) -> None:
        positive = {
            "width": self.width,
            "depth": self.depth,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "l1_weight + ssim_weight": self.l1_weight + self.ssim_weight,
        }
        for field, value in positive.items():
            if not value > 0:
                raise DetectorError(f"unet-ae: {field} must be positive, got {value}")
        for field, value in {
            "noise_std": self.noise_std,
            "l1_weight": self.l1_weight,
            "ssim_weight": self.ssim_weight,
            "sigma": self.sigma,
        }.items():
            if not value >= 0:
                raise DetectorError(f"unet-ae: {field} must be non-negative, got {value}")
        if self.image_size < MIN_IMAGE_SIZE or self.image_size % 2**self.depth:
            raise DetectorError(
                f"unet-ae: image_size must be >= {MIN_IMAGE_SIZE} and divisible by 2**depth = {2**self.depth}, "
                f"got {self.image_size}"
            )
        if not 0 <= self.dropped_skips <= self.depth:
            raise DetectorError(f"unet-ae: dropped_skips must be in 0..depth ({self.depth}), got {self.dropped_skips}")
        if not 0 <= self.map_ssim_weight <= 1:
            raise DetectorError(f"unet-ae: map_ssim_weight must be in [0, 1], got {self.map_ssim_weight}")
        if not 0 < self.top_fraction <= 1:
            raise DetectorError(f"unet-ae: top_fraction must be in (0, 1], got {self.top_fraction}")


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3x3 conv + BatchNorm + ReLU at one resolution."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class UNetAE(nn.Module):
    """(B, C, S, S) in [0, 1] -> its (B, C, S, S) reconstruction in [0, 1].

    Level i works at S / 2**i with width * 2**i channels; the decoder of level i upsamples level i + 1 and, unless
    i < dropped_skips, concatenates the encoder's level-i features.
    """

    def __init__(self, width: int, depth: int, dropped_skips: int, channels: int = 3) -> None:
        super().__init__()
        widths = [width * 2**level for level in range(depth + 1)]
        self.skips = [level >= dropped_skips for level in range(depth)]
        self.encoder = nn.ModuleList(
            [conv_block(channels, widths[0])] + [conv_block(widths[i], widths[i + 1]) for i in range(depth)]
        )
        self.up = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in range(depth)])
        self.decoder = nn.ModuleList(
            [conv_block(widths[i] * (2 if self.skips[i] else 1), widths[i]) for i in range(depth)]
        )
        self.head = nn.Conv2d(widths[0], channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [self.encoder[0](x)]  # per level (B, width * 2**i, S / 2**i, S / 2**i)
        for block in self.encoder[1:]:
            features.append(block(F.max_pool2d(features[-1], 2)))
        y = features[-1]
        for level in reversed(range(len(self.decoder))):
            y = self.up[level](y)
            if self.skips[level]:
                y = torch.cat([y, features[level]], dim=1)
            y = self.decoder[level](y)
        return torch.sigmoid(self.head(y))


def init_weights(net: nn.Module, generator: torch.Generator) -> None:
    """Seeded He initialisation of every (transposed) convolution; the global RNG is not used."""
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=generator)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch (shuffling and noise): a resumed fit draws what an uninterrupted one would."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))


def resize_pixels(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """(B, 3, size, size) uint8 of (H, W, 3) uint8 images, resized with antialiasing."""
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    resized = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8)


class UNetAEDetector:
    """The U-Net autoencoder as a Detector; one instance fits once (a second fit starts over)."""

    name = "unet-ae"

    def __init__(self, features: FeatureCache, seed: int, config: UNetAEConfig) -> None:
        self.seed = seed
        self.config = config
        self.device = features.backbone.mean.device
        self.net: UNetAE | None = None
        self.losses: list[float] = []  # mean training loss per epoch, resumed fits included
        self.threshold = float("nan")

    def fingerprint(self, normals: Sequence[ImageSource]) -> dict[str, Any]:
        """What a checkpoint must match to be resumed: all that shapes the training path, not its length."""
        return checkpoint_fingerprint(self.name, self.config, self.seed, normals, None, skip=("epochs",))

    def new_net(self) -> UNetAE:
        cfg = self.config
        net = UNetAE(cfg.width, cfg.depth, cfg.dropped_skips)
        init_weights(net, torch.Generator().manual_seed(self.seed))
        return net.to(self.device)

    def fit(self, normals: Sequence[ImageSource], workdir: Path | None = None) -> FitReport:
        watch = Stopwatch()
        train_idx, validation = validation_split(len(normals), self.seed)
        net = self.new_net()
        optimiser = torch.optim.Adam(net.parameters(), lr=self.config.learning_rate)
        fingerprint = self.fingerprint(normals)
        path, state = resumable_state(workdir, CHECKPOINT_NAME, fingerprint, "epoch", self.config.epochs)
        start = 0 if state is None else self.restore(state, net, optimiser)
        if start == 0:
            self.losses = []
        if start < self.config.epochs:
            pixels = self.training_pixels([normals[i] for i in train_idx])
            self.train_epochs(net, optimiser, pixels, start, path, fingerprint)
        self.net = net.eval()
        self.threshold, rule = held_out_threshold(self, [normals[i] for i in validation])
        return FitReport(len(normals), watch.seconds, self.threshold, rule, resumed=state is not None)

    def restore(self, state: dict[str, Any], net: UNetAE, optimiser: torch.optim.Adam) -> int:
        """Load a checkpoint's weights, optimiser state and losses; the number of epochs it finished."""
        net.load_state_dict(state["net"])
        optimiser.load_state_dict(state["optimiser"])
        self.losses = list(state["losses"])
        return int(state["epoch"])

    def training_pixels(self, normals: Sequence[ImageSource]) -> torch.Tensor:
        """(N, 3, S, S) uint8 normals, decoded once and resized, on the CPU."""
        size = self.config.image_size
        return torch.cat([resize_pixels(batch, size) for batch in load_batches(normals, desc="unet-ae images")])

    def train_epochs(
        self,
        net: UNetAE,
        optimiser: torch.optim.Adam,
        pixels: torch.Tensor,
        start: int,
        path: Path | None,
        fingerprint: dict[str, Any],
    ) -> None:
        cfg = self.config
        per_epoch = -(-pixels.shape[0] // cfg.batch_size)
        net.train()
        with tqdm(
            desc="unet-ae", total=cfg.epochs * per_epoch, initial=start * per_epoch, unit="batch", disable=None
        ) as bar:
            for epoch in range(start, cfg.epochs):
                losses = self.train_epoch(net, optimiser, pixels, epoch_generator(self.seed, epoch), bar)
                self.losses.append(float(np.mean(losses)))
                bar.set_postfix(epoch=epoch + 1, loss=f"{self.losses[-1]:.4f}")
                if path is not None:
                    state = {
                        "fingerprint": fingerprint,
                        "epoch": epoch + 1,
                        "net": net.state_dict(),
                        "optimiser": optimiser.state_dict(),
                        "losses": self.losses,
                    }
                    save_checkpoint(path, state)

    def train_epoch(
        self, net: UNetAE, optimiser: torch.optim.Adam, pixels: torch.Tensor, generator: torch.Generator, bar: tqdm
    ) -> list[float]:
        """One pass over the shuffled normals; the loss of each batch."""
        cfg = self.config
        order = torch.randperm(pixels.shape[0], generator=generator)
        losses = []
        for first in range(0, len(order), cfg.batch_size):
            clean = pixels[order[first : first + cfg.batch_size]].to(self.device, torch.float32) / 255  # (B, 3, S, S)
            inputs = clean
            if cfg.noise_std > 0:
                inputs = clean + cfg.noise_std * torch.randn(clean.shape, generator=generator).to(self.device)
            loss = reconstruction_loss(net(inputs), clean, cfg.l1_weight, cfg.ssim_weight)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        return losses

    def error_maps(self, clean: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """(B, S, S) reconstruction error of (B, 3, S, S) images: absolute error mixed with 1 - local SSIM."""
        w = self.config.map_ssim_weight
        absolute = (reconstruction - clean).abs().mean(dim=1)
        dissimilarity = (1 - local_ssim(reconstruction, clean, same_size=True)).mean(dim=1)
        return (1 - w) * absolute + w * dissimilarity

    @torch.inference_mode()
    def predict(self, images: Sequence[np.ndarray]) -> Prediction:
        if self.net is None:
            raise DetectorError("unet-ae: predict before fit")
        maps = []
        for first in range(0, len(images), PREDICT_BATCH):
            batch = images[first : first + PREDICT_BATCH]
            clean = resize_pixels(batch, self.config.image_size).to(self.device, torch.float32) / 255
            errors = self.error_maps(clean, self.net(clean))
            maps.append(fuse_maps([errors], batch[0].shape[:2], self.config.sigma))  # (B, H, W)
        stacked = np.concatenate(maps)
        return Prediction(top_scores(stacked, self.config.top_fraction), stacked)


def build(features: FeatureCache, seed: int, config: UNetAEConfig | None = None) -> UNetAEDetector:
    """The U-Net autoencoder on the cache's device; invalid configs raise DetectorError."""
    return UNetAEDetector(features, seed, config or UNetAEConfig())
