"""SimpleNet (Liu et al., CVPR 2023): a feature adaptor and a discriminator trained to tell adapted normal patch
features from the same features plus Gaussian noise; the anomaly map is the discriminator's negated output.

Full-shot: trained on all the normals it is given except a held-out tenth that sets its image threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from anomalygpt.baselines.features import patch_grid
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
    validation_split,
)
from anomalygpt.io import ImageSource
from anomalygpt.memory import fuse_maps

CHECKPOINT_NAME = "simplenet.safetensors"
POSITIVE_MARGIN = 0.5  # the discriminator is pushed to score normal features at least this high
NEGATIVE_MARGIN = -0.5  # and noisy features at most this low


@dataclass(frozen=True)
class SimpleNetConfig:
    neighbourhood: int = 3  # patch features averaged over an n x n window before the adaptor (locally aware)
    hidden_ratio: float = 1.0  # discriminator hidden width = ratio x feature channels
    # Noise std relative to the adapted features' spread (centred RMS) in each step's batch; the paper's absolute 0.015
    # is 0.5 % of EfficientNet-Lite0's spread (~2.9). 0.5 beat 0.25 and 1.0 on simulated anomalies of held-out
    # pictures (bench/bench_baseline_defaults.py; ELPV is never used to choose).
    noise_scale: float = 0.5
    # Training steps, set by training time (about a minute on 2 CPU cores); left out of the checkpoint fingerprint,
    # so a longer fit resumes a shorter one.
    steps: int = 2000
    positions_per_step: int = 4096  # patch positions drawn (with replacement) from all training features per step
    checkpoint_every: int = 100  # steps between checkpoints in the work folder (not fingerprinted either)
    adaptor_lr: float = 1e-4
    discriminator_lr: float = 2e-4
    weight_decay: float = 1e-5  # Adam weight decay of both parts, as the paper
    leaky_slope: float = 0.2
    sigma: float = 4.0  # Gaussian smoothing of the map, in image pixels

    def __post_init__(self) -> None:
        if self.neighbourhood < 1 or self.neighbourhood % 2 == 0:
            raise DetectorError(f"simplenet: neighbourhood must be a positive odd number, got {self.neighbourhood}")
        positive = {
            "hidden_ratio": self.hidden_ratio,
            "noise_scale": self.noise_scale,
            "steps": self.steps,
            "positions_per_step": self.positions_per_step,
            "checkpoint_every": self.checkpoint_every,
            "adaptor_lr": self.adaptor_lr,
            "discriminator_lr": self.discriminator_lr,
            "sigma": self.sigma,
        }
        for field, value in positive.items():
            if not value > 0:
                raise DetectorError(f"simplenet: {field} must be positive, got {value}")
        for field, value in {"weight_decay": self.weight_decay, "leaky_slope": self.leaky_slope}.items():
            if not value >= 0:
                raise DetectorError(f"simplenet: {field} must be non-negative, got {value}")


def truncated_l1(
    normal: torch.Tensor, noisy: torch.Tensor, positive: float = POSITIVE_MARGIN, negative: float = NEGATIVE_MARGIN
) -> torch.Tensor:
    """SimpleNet's loss on discriminator scores: normal ones below `positive` and noisy ones above `negative` cost."""
    return (positive - normal).clamp_min(0.0).mean() + (noisy - negative).clamp_min(0.0).mean()


class SimpleNet(nn.Module):
    """Feature adaptor (one linear layer, identity at start) and a 2-layer MLP discriminator: (N, C) -> (N,)."""

    def __init__(self, channels: int, hidden: int, leaky_slope: float, generator: torch.Generator) -> None:
        super().__init__()
        self.adaptor = nn.Linear(channels, channels)
        hidden_layer, output_layer = nn.Linear(channels, hidden), nn.Linear(hidden, 1)
        self.discriminator = nn.Sequential(
            hidden_layer, nn.BatchNorm1d(hidden), nn.LeakyReLU(leaky_slope), output_layer
        )
        with torch.no_grad():
            # The identity start lets the discriminator see the backbone's own features first (the paper leaves it
            # open); the discriminator is drawn from the seeded generator, not the global RNG.
            self.adaptor.weight.copy_(torch.eye(channels))
            for layer in (hidden_layer, output_layer):
                nn.init.xavier_normal_(layer.weight, generator=generator)
            for layer in (self.adaptor, hidden_layer, output_layer):
                nn.init.zeros_(layer.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.discriminator(self.adaptor(feats))[:, 0]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one training step: a resumed fit draws what an uninterrupted one would."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))


def spread(feats: torch.Tensor) -> torch.Tensor:
    """Centred RMS of (N, C) features: the root of the mean per-channel variance."""
    return feats.var(dim=0).mean().sqrt()


def rows(grid: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B*h*w, C)."""
    return grid.permute(0, 2, 3, 1).reshape(-1, grid.shape[1])


class SimpleNetDetector:
    """SimpleNet as a Detector; one instance fits once (a second fit starts over)."""

    name = "simplenet"

    def __init__(self, features: FeatureCache, seed: int, config: SimpleNetConfig) -> None:
        self.features = features
        self.seed = seed
        self.config = config
        self.channels = sum(features.backbone.stage_dims)
        self.hidden = round(config.hidden_ratio * self.channels)
        if self.hidden < 1:
            raise DetectorError(f"simplenet: hidden_ratio {config.hidden_ratio} leaves no hidden units")
        self.device = features.backbone.mean.device
        self.net: SimpleNet | None = None
        self.losses: list[float] = []  # training loss per step, resumed fits included
        self.threshold = float("nan")

    def fingerprint(self, normals: Sequence[ImageSource]) -> dict[str, Any]:
        """Steps and checkpoint spacing do not shape the training path: a longer fit resumes a shorter one."""
        return checkpoint_fingerprint(
            self.name, self.config, self.seed, normals, self.features, skip=("steps", "checkpoint_every")
        )

    def training_features(self, normals: Sequence[ImageSource]) -> torch.Tensor:
        """(N, C) float16 locally aware patch features of every position of every normal, on the CPU."""
        out = []
        for batch in load_batches(normals, desc="simplenet features"):
            grid = patch_grid(self.features.patches(batch), self.config.neighbourhood)
            out.append(rows(grid).to("cpu", torch.float16))
        return torch.cat(out)

    def fit(self, normals: Sequence[ImageSource], workdir: Path | None = None) -> FitReport:
        watch = Stopwatch()
        train_idx, validation = validation_split(len(normals), self.seed)
        with torch.random.fork_rng(devices=[]):  # nn.Linear's own init draws from the global RNG; ours replaces it
            net = SimpleNet(
                self.channels, self.hidden, self.config.leaky_slope, torch.Generator().manual_seed(self.seed)
            )
        net = net.to(self.device)
        optimisers = self.optimisers(net)
        fingerprint = self.fingerprint(normals)
        path, state = resumable_state(workdir, CHECKPOINT_NAME, fingerprint, "step", self.config.steps)
        start = 0 if state is None else self.restore(state, net, optimisers)
        if start == 0:
            self.losses = []
        if start < self.config.steps:
            feats = self.training_features([normals[i] for i in train_idx])
            self.train_steps(net, optimisers, feats, start, path, fingerprint)
        self.net = net.eval()
        self.threshold, rule = held_out_threshold(self, [normals[i] for i in validation])
        return FitReport(len(normals), watch.seconds, self.threshold, rule, resumed=state is not None)

    def optimisers(self, net: SimpleNet) -> tuple[torch.optim.Adam, torch.optim.Adam]:
        cfg = self.config
        return (
            torch.optim.Adam(net.adaptor.parameters(), lr=cfg.adaptor_lr, weight_decay=cfg.weight_decay),
            torch.optim.Adam(net.discriminator.parameters(), lr=cfg.discriminator_lr, weight_decay=cfg.weight_decay),
        )

    def restore(self, state: dict[str, Any], net: SimpleNet, optimisers: Sequence[torch.optim.Adam]) -> int:
        """Load a checkpoint's weights, optimiser states and losses; the step it was written at."""
        net.load_state_dict(state["net"])
        for optimiser, saved in zip(optimisers, state["optimisers"], strict=True):
            optimiser.load_state_dict(saved)
        self.losses = list(state["losses"])
        return int(state["step"])

    def train_steps(
        self,
        net: SimpleNet,
        optimisers: Sequence[torch.optim.Adam],
        feats: torch.Tensor,
        start: int,
        path: Path | None,
        fingerprint: dict[str, Any],
    ) -> None:
        cfg = self.config
        net.train()
        bar = tqdm(range(start, cfg.steps), desc="simplenet", initial=start, total=cfg.steps, disable=None)
        for step in bar:
            loss = self.train_step(net, optimisers, feats, step_generator(self.seed, step))
            self.losses.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            done = step + 1
            if path is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                state = {
                    "fingerprint": fingerprint,
                    "step": done,
                    "net": net.state_dict(),
                    "optimisers": [optimiser.state_dict() for optimiser in optimisers],
                    "losses": self.losses,
                }
                save_checkpoint(path, state)

    def train_step(
        self, net: SimpleNet, optimisers: Sequence[torch.optim.Adam], feats: torch.Tensor, generator: torch.Generator
    ) -> float:
        """One update on a random batch of positions: adapted features against the same plus noise."""
        cfg = self.config
        index = torch.randint(feats.shape[0], (cfg.positions_per_step,), generator=generator)
        normal = net.adaptor(feats[index].to(self.device, torch.float32))  # (P, C)
        noise = torch.randn(normal.shape, generator=generator).to(self.device)
        noisy = normal + noise * (cfg.noise_scale * spread(normal.detach()))
        scores = net.discriminator(torch.cat([normal, noisy]))[:, 0]  # (2P,) one batch, so BatchNorm sees both
        loss = truncated_l1(scores[: len(index)], scores[len(index) :])
        for optimiser in optimisers:
            optimiser.zero_grad(set_to_none=True)
        loss.backward()
        for optimiser in optimisers:
            optimiser.step()
        return loss.item()

    @torch.inference_mode()
    def predict(self, images: Sequence[np.ndarray]) -> Prediction:
        if self.net is None:
            raise DetectorError("simplenet: predict before fit")
        grid = patch_grid(self.features.patches(images), self.config.neighbourhood)  # (B, C, h, w)
        b, _, h, w = grid.shape
        stage_map = -self.net(rows(grid)).view(b, h, w)
        maps = fuse_maps([stage_map], images[0].shape[:2], self.config.sigma)  # (B, H, W)
        return Prediction(maps.reshape(b, -1).max(axis=1), maps)


def build(features: FeatureCache, seed: int, config: SimpleNetConfig | None = None) -> SimpleNetDetector:
    """SimpleNet on the cache's backbone; invalid configs raise DetectorError."""
    return SimpleNetDetector(features, seed, config or SimpleNetConfig())
