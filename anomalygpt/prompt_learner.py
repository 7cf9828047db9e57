"""Anomaly map -> prompt embeddings for the LLM, and the global image embedding -> one image token.

Both widths come from outside: the LLM's hidden size and the backbone's embedding size are passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MIN_SCALE = 1e-12  # threshold - normal_mean below this would divide by ~0; calibration keeps it well above


@dataclass(frozen=True)
class PromptLearnerConfig:
    grid: int = 3  # the map is pooled to grid x grid cells, one prompt each (row-major, as LOCATION_WORDS)
    base_prompts: int = 9  # learnable prompts that do not depend on the map; AnomalyGPT uses as many as map prompts
    map_size: int = 96  # side the normalised map is resized to before the conv net
    channels: tuple[int, ...] = (16, 32, 64)  # conv widths; each stage halves the side (96 -> 12)
    clip: float = 8.0  # normalised values beyond +-clip carry no more information ("far above threshold")

    @property
    def n_tokens(self) -> int:
        """Prompt embeddings per image: one per grid cell, then the base prompts."""
        return self.grid * self.grid + self.base_prompts


def normalised_map(
    anomaly_map: np.ndarray, normal_mean: float, threshold: float, cfg: PromptLearnerConfig
) -> torch.Tensor:
    """(1, S, S) float32: (map - normal_mean) / (threshold - normal_mean), resized and clipped.

    0 is a typical good image and 1 the image threshold, so the prompt learner sees the same scale whatever the
    product, backbone or calibration.
    """
    scale = max(threshold - normal_mean, MIN_SCALE)
    values = (torch.from_numpy(np.asarray(anomaly_map, dtype=np.float32)) - normal_mean) / scale  # (H, W)
    size = (cfg.map_size, cfg.map_size)
    resized = F.interpolate(values[None, None], size=size, mode="bilinear", antialias=True, align_corners=False)
    return resized[0].clamp(-cfg.clip, cfg.clip)


class PromptLearner(nn.Module):
    """Small conv net: normalised map (B, 1, S, S) -> grid*grid map prompts + base prompts, at the LLM width."""

    def __init__(self, cfg: PromptLearnerConfig, hidden_size: int) -> None:
        super().__init__()
        if cfg.grid < 1 or cfg.base_prompts < 0 or not cfg.channels:
            raise ValueError(f"prompt learner needs grid >= 1, base_prompts >= 0 and conv widths, got {cfg}")
        self.cfg = cfg
        layers: list[nn.Module] = []
        width_in = 1
        for width in cfg.channels:
            layers += [nn.Conv2d(width_in, width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2)]
            width_in = width
        self.convs = nn.Sequential(*layers)
        self.to_hidden = nn.Conv2d(width_in, hidden_size, 1)
        # Max, not average: a defect covering a few % of a cell must still show in that cell's prompt.
        self.pool = nn.AdaptiveMaxPool2d(cfg.grid)
        self.base = nn.Parameter(torch.randn(cfg.base_prompts, hidden_size) * 0.02)

    @property
    def n_tokens(self) -> int:
        return self.cfg.n_tokens

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) normalised maps -> (B, grid*grid + base_prompts, hidden) prompt embeddings."""
        cells = self.pool(self.to_hidden(self.convs(maps)))  # (B, hidden, grid, grid)
        map_prompts = cells.flatten(2).transpose(1, 2)  # (B, grid*grid, hidden), top-left cell first
        base = self.base[None].expand(maps.shape[0], -1, -1)  # (B, base_prompts, hidden)
        return torch.cat([map_prompts, base], dim=1)


class ImageProjection(nn.Module):
    """The backbone's global embedding (B, D) -> one image token (B, 1, hidden)."""

    def __init__(self, embed_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(embed_dim, hidden_size)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.linear(embedding)[:, None]  # (B, 1, hidden)
