"""Normal/abnormal state phrases x templates -> one text anchor per state, per class name."""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from anomalygpt.text import TextEncoder

GENERIC_CLASS = "object"  # used when the user gives no class name

# "{}" is the class name. Data, not logic: extend these lists to change the anchors.
NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "intact {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ABNORMAL_STATES = (
    "damaged {}",
    "broken {}",
    "defective {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
    "{} with a crack",
    "{} with a scratch",
    "{} with a stain",
    "{} with a hole",
    "{} with a dent",
    "{} with missing material",
    "contaminated {}",
)
TEMPLATES = (
    "a photo of a {}.",
    "a close-up photo of the {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "an industrial inspection image of a {}.",
    "a photo of the {} for visual inspection.",
)

# Per encoder (dropped with it), per class phrase: (2, D) anchors.
_ANCHOR_CACHE: weakref.WeakKeyDictionary[TextEncoder, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()


def class_phrase(class_name: str | None) -> str:
    """'metal_nut' -> 'metal nut'; None or blank -> the generic word."""
    words = (class_name or "").replace("_", " ").split()
    return " ".join(words) or GENERIC_CLASS


def state_prompts(class_name: str | None) -> tuple[list[str], list[str]]:
    """Every template filled with every normal state, and with every abnormal state, of the class."""
    name = class_phrase(class_name)
    normal = [t.format(s.format(name)) for s in NORMAL_STATES for t in TEMPLATES]
    abnormal = [t.format(s.format(name)) for s in ABNORMAL_STATES for t in TEMPLATES]
    return normal, abnormal


def text_anchors(encoder: TextEncoder, class_name: str | None) -> torch.Tensor:
    """(2, D) unit vectors: row 0 normal, row 1 abnormal; each the re-normalised mean of its prompt embeddings."""
    name = class_phrase(class_name)
    per_encoder = _ANCHOR_CACHE.setdefault(encoder, {})
    if name not in per_encoder:
        normal, abnormal = state_prompts(name)
        embeddings = encoder.encode(normal + abnormal)  # (N_normal + N_abnormal, D), unit rows
        means = torch.stack([embeddings[: len(normal)].mean(0), embeddings[len(normal) :].mean(0)])
        per_encoder[name] = F.normalize(means, dim=-1)
    # A copy: callers may edit it in place without changing the cache.
    return per_encoder[name].to(encoder.device, copy=True)
