"""AnomalyDecoder: patch features projected into the text space and compared with normal/abnormal anchors.

It gives a map with no references at all (zero-shot) and a prior that the few-shot map can be fused with.
Input features are the PatchMemory's own embedding (locally averaged, L2-normalised), so the reference
features the memory keeps for calibration serve the decoder too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from anomalygpt.baselines.features import patch_grid
from anomalygpt.prompts import text_anchors
from anomalygpt.text import TextEncoder


@dataclass(frozen=True)
class DecoderConfig:
    weights: str = ""  # trained projections: a stem under weights/ or a path without suffix; "" = no decoder
    fusion_weight: float = 0.0  # few-shot map += weight * decoder map, per stage (0: memory alone)
    class_name: str = ""  # product word for the text anchors when the caller gives none ("" = generic)


@dataclass(frozen=True)
class DecoderSpec:
    """What a trained decoder was built for; stored beside its weights and checked at load."""

    stage_dims: tuple[int, ...]  # channels of each backbone stage it reads
    text_dim: int  # width of the text embedding space
    hidden: int = 0  # 0: one linear projection per stage; > 0: a two-layer projection with this width
    temperature: float = 0.07  # softmax temperature of the cosine similarities
    stack_coarser: bool = False  # each stage's projection also reads every coarser stage, upsampled to its grid

    def input_dims(self) -> tuple[int, ...]:
        """Channels each stage's projection reads."""
        if not self.stack_coarser:
            return self.stage_dims
        return tuple(sum(self.stage_dims[i:]) for i in range(len(self.stage_dims)))


class DecoderOutput(NamedTuple):
    logits: list[torch.Tensor]  # per stage (B, 2, h, w): normal / abnormal similarity over temperature
    abnormal: list[torch.Tensor]  # per stage (B, h, w): softmax probability of "abnormal"


def projection(in_dim: int, out_dim: int, hidden: int) -> nn.Module:
    """Per-patch projection over channels-last features (a matmul: several times faster than a 1x1 conv on CPU)."""
    if hidden <= 0:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


def anchor_cosines(x: torch.Tensor, project: nn.Module, anchors: torch.Tensor) -> torch.Tensor:
    """Cosine of each projected patch x (..., C) with each anchor (S, D) -> (..., S).

    The last linear layer is never materialised in the D-dim text space: with y = Wx + b,
    y.a = x.(W^T a) + b.a and |y|^2 = x^T (W^T W) x + 2 x.(W^T b) + b.b, all C-dim work (C << D).
    """
    last = project
    if isinstance(project, nn.Sequential):  # hidden layers first, then the same identity on the last Linear
        x, last = project[:-1](x), project[-1]
    assert isinstance(last, nn.Linear)
    weight, bias = last.weight, last.bias  # (D, C), (D,)
    numerator = x @ (weight.T @ anchors.T) + bias @ anchors.T
    squared = ((x @ (weight.T @ weight)) * x).sum(-1, keepdim=True) + 2 * x @ (weight.T @ bias)[:, None] + bias @ bias
    return numerator / squared.clamp_min(1e-24).sqrt()


class AnomalyDecoder(nn.Module):
    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.spec = spec
        self.projections = nn.ModuleList(projection(c, spec.text_dim, spec.hidden) for c in spec.input_dims())

    def stage_inputs(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per stage, its features, with every coarser stage's upsampled to its grid when the spec stacks them.

        A fine stage sees where a patch sits (stride 8) and what surrounds it (stride 16): alone, the shallow
        stride-8 features describe texture too locally to tell a pasted patch from the product.
        """
        if not self.spec.stack_coarser:
            return list(feats)
        return [patch_grid(feats[i:], neighbourhood=1) for i in range(len(feats))]

    def forward(self, feats: Sequence[torch.Tensor], anchors: torch.Tensor) -> DecoderOutput:
        """feats: per stage (B, C_i, h_i, w_i); anchors: (2, D) unit normal/abnormal text embeddings."""
        logits, abnormal = [], []
        for feat, project in zip(self.stage_inputs(feats), self.projections, strict=True):
            cosines = anchor_cosines(feat.permute(0, 2, 3, 1), project, anchors)  # (B, h, w, 2)
            stage_logits = cosines.permute(0, 3, 1, 2) / self.spec.temperature  # (B, 2, h, w)
            logits.append(stage_logits)
            abnormal.append(stage_logits.softmax(dim=1)[:, 1])
        return DecoderOutput(logits, abnormal)


class TextPrior:
    """A trained decoder with its text encoder: abnormality maps for any class name, anchors cached per name."""

    def __init__(self, decoder: AnomalyDecoder, encoder: TextEncoder, zero_shot: dict[str, float], source: str) -> None:
        self.decoder = decoder.requires_grad_(False).eval()
        self.encoder = encoder
        self.zero_shot = zero_shot  # statistics of simulated validation normals: the zero-shot threshold
        self.source = source  # the weights it was loaded from, for the Inspection's record

    @torch.inference_mode()
    def abnormal(self, feats: Sequence[torch.Tensor], class_name: str | None) -> list[torch.Tensor]:
        """Per stage (B, h, w) abnormal probability of memory-embedded features."""
        anchors = text_anchors(self.encoder, class_name).to(feats[0].device)
        return self.decoder(feats, anchors).abnormal

    def weighted(self, class_name: str | None, weight: float) -> Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]:
        """A PatchMemory prior: weight x abnormality per stage."""
        return lambda feats: [weight * a for a in self.abnormal(feats, class_name)]
