import gc
import math
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anomalygpt import prompts
from anomalygpt.prompts import (
    ABNORMAL_STATES,
    NORMAL_STATES,
    TEMPLATES,
    class_phrase,
    state_prompts,
    text_anchors,
)
from anomalygpt.text import TextConfig, TextEncoder, build_text_encoder


class CountingEncoder(TextEncoder):
    """Normal prompts -> (2, 0, 0); abnormal ones -> (0, 0, 5) if they mention a crack, else (0, 1, 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the encoder a device
        self.dim = 3
        self.texts_seen = 0

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        self.texts_seen += len(texts)
        rows = []
        for text in texts:
            abnormal = any(s.format("").strip() in text for s in ABNORMAL_STATES)
            crack = "crack" in text
            rows.append([0.0, 0.0, 5.0] if crack else [0.0, 1.0, 0.0] if abnormal else [2.0, 0.0, 0.0])
        return torch.tensor(rows)


def test_class_phrase_and_prompts():
    assert class_phrase("metal_nut") == "metal nut"
    assert class_phrase("  pcb_1 ") == "pcb 1"
    assert class_phrase(None) == class_phrase("") == class_phrase(" _ ") == "object"
    normal, abnormal = state_prompts("metal_nut")
    assert len(normal) == len(NORMAL_STATES) * len(TEMPLATES) == 56
    assert len(abnormal) == len(ABNORMAL_STATES) * len(TEMPLATES) == 91
    assert "a photo of a metal nut with a crack." in abnormal
    assert "a close-up photo of the flawless metal nut." in normal
    assert not any("{" in p or "_" in p for p in normal + abnormal)
    assert "an industrial inspection image of a damaged object." in state_prompts(None)[1]


def test_anchors_are_renormalised_means_of_normalised_prompt_embeddings():
    anchors = text_anchors(CountingEncoder(), "metal_nut")
    n, cracks = len(ABNORMAL_STATES) * len(TEMPLATES), len(TEMPLATES)  # 91 abnormal prompts, 7 with a crack
    # Abnormal mean = ((n - cracks) * e1 + cracks * e2) / n, re-normalised.
    norm = math.hypot(n - cracks, cracks)
    expected = torch.tensor([[1.0, 0.0, 0.0], [0.0, (n - cracks) / norm, cracks / norm]])
    assert torch.allclose(anchors, expected, atol=1e-6)
    assert abs(float(expected[1, 1]) - 0.996546) < 1e-6


def test_anchors_are_cached_per_encoder_and_class():
    encoder = CountingEncoder()
    per_class = len(state_prompts(None)[0]) + len(state_prompts(None)[1])  # 147
    first = text_anchors(encoder, "metal_nut")
    assert encoder.texts_seen == per_class
    first.zero_()  # the caller's copy; the cache must not change
    again = text_anchors(encoder, "metal nut")  # the same class phrase
    assert encoder.texts_seen == per_class
    assert float(again[0, 0]) == 1.0
    text_anchors(encoder, None)
    assert encoder.texts_seen == 2 * per_class
    other = CountingEncoder()
    text_anchors(other, "metal_nut")
    assert other.texts_seen == per_class
    cached = len(prompts._ANCHOR_CACHE)
    del other
    gc.collect()
    assert len(prompts._ANCHOR_CACHE) == cached - 1  # dropped with its encoder


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder(TextConfig(name="minilm"))


def test_minilm_equals_hand_computed_mean_pooling(minilm):
    sentence = "A close-up photo of a scratched metal plate."
    batch = minilm.tokenizer([sentence], return_tensors="pt")
    with torch.no_grad():
        tokens = minilm.model(**batch).last_hidden_state[0]  # (L, 384), no padding: every token counts
    expected = F.normalize(tokens.mean(dim=0), dim=0)
    assert tokens.shape[0] == 13  # [CLS] + 11 word pieces + [SEP]
    embedding = minilm.encode([sentence])[0]
    assert torch.allclose(embedding, expected, atol=1e-5)
    # Padding next to a longer sentence does not move the embedding: pooling follows the attention mask.
    padded = minilm.encode([sentence, "a much longer sentence " * 10])[0]
    assert torch.allclose(padded, expected, atol=1e-5)


def test_minilm_anchors_are_distinct_unit_vectors(minilm):
    anchors = text_anchors(minilm, "metal plate")
    assert minilm.dim == 384
    assert anchors.shape == (2, 384)
    assert torch.allclose(anchors.norm(dim=-1), torch.ones(2), atol=1e-5)
    cosine = float(anchors[0] @ anchors[1])
    assert 0.95 < cosine < 0.99  # 0.971: the class words dominate MiniLM sentences


def test_minilm_anchors_tell_a_scratch_from_a_flawless_surface(minilm):
    anchors = text_anchors(minilm, "metal plate")
    scores = minilm.encode(["a scratched metal plate", "a flawless metal plate"]) @ anchors.T  # (2, 2)
    scratched, flawless = scores.tolist()
    assert scratched[1] > scratched[0] + 0.02  # closer to abnormal
    assert flawless[0] > flawless[1] + 0.02  # closer to normal


def test_minilm_stays_frozen(minilm):
    minilm.train()
    assert not minilm.model.training
    assert not any(p.requires_grad for p in minilm.parameters())
    first, second = minilm.encode(["a bent pin"]), minilm.encode(["a bent pin"])
    assert torch.equal(first, second)  # no dropout
