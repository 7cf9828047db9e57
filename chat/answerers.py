"""Who answers chat questions about an inspected image: the protocol, a grounded fallback, and the loader.

The detector decides and the answerer explains: every answer is built from the Inspection it is given and must
never contradict it. `GroundedAnswerer` needs no language model: it picks the question's intent by keywords and
fills the same answer templates the training conversations use (simulation.conversations), from the Inspection's
verdict, confidence and regions. `AssistantAnswerer` puts the LLM assistant (anomalygpt.assistant) behind the
same protocol. `load_answerer` prefers the assistant when the preset has trained assistant weights and it loads,
and falls back to the grounded answerer otherwise.
"""

from __future__ import annotations

import hashlib
import re
import sys
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from anomalygpt.regions import format_pct, where_phrase
from simulation.conversations import (
    ANSWER_BUILDERS,
    CONFIDENCE_ADVERBS,
    CONFIDENCE_REASONS,
    Facts,
    render,
)

if TYPE_CHECKING:
    from anomalygpt.config import Preset
    from anomalygpt.inspection import Inspection, Inspector

Turn = tuple[str, str]  # (question, answer), oldest first
ANSWERER_CHOICES = ("auto", "assistant", "grounded")  # auto: the assistant when it loads, else grounded

# First match wins, so the specific intents come before the generic yes/no ones ("Where is the defect?" is
# about the place, not about whether there is a defect).
INTENT_PATTERNS = tuple(
    (intent, re.compile(pattern))
    for intent, pattern in (
        ("next_check", r"\b(next|recommend\w*|advi[cs]e|what should i|what (do|can) i do|follow[- ]?up)\b"),
        ("confidence", r"\b(confiden\w*|sure|certain\w*|trust\w*|reliab\w*)\b"),
        ("score", r"\b(scores?|thresholds?|margin|sensitivity)\b"),
        ("where_exactly", r"\b(exact\w*|precise\w*|coordinates?|pixels?|bounding|box(es)?)\b"),
        ("near_edge", r"\b(edges?|borders?|boundary|boundaries)\b"),
        ("count", r"\b(how many|count\w*|number of)\b"),
        ("size", r"\b(how (big|large|small|much)|size|area|cover\w*|big|large|small|extent)\b"),
        ("where", r"\b(where|which part|locat\w*|position)\b"),
        ("appearance", r"\b(look(s)? like|what kind|what type|type of|kind of|describe|appearance)\b"),
        (
            "anomaly",
            r"\b(anomal\w*|defect\w*|wrong|damage\w*|broken|faults?|faulty|problems?|issues?|flaws?|scratch\w*|"
            r"crack\w*|stains?|spots?|holes?)\b",
        ),
        ("normal", r"\b(normal|ok|okay|good|fine|pass(es)?|acceptable|intact)\b"),
    )
)
# An image can be anomalous by its score with no region large enough to outline; the region templates would
# then speak as if it were normal, so such an image gets this instead.
NO_REGION_ANSWER = (
    "The anomaly score is above the threshold, but no single area is large enough to outline; "
    "the heat map shows where the scores are highest."
)
PIECE = re.compile(r"\S+\s*")  # a word and the space after it: the unit the grounded answer streams in
EMBEDDING_CACHE_SIZE = 16  # images whose global embedding the assistant answerer keeps (one (1, D) tensor each)


class AnswererError(ValueError):
    """The requested answerer cannot be loaded; the message says why."""


class Answerer(Protocol):
    """Answers one question about an inspected image, as text pieces that join into the whole answer."""

    def stream(
        self, question: str, history: Sequence[Turn], inspection: Inspection, image: np.ndarray
    ) -> Iterator[str]: ...


class GroundedAnswerer:
    """Template answers from the Inspection alone: instant, offline, and unable to contradict the verdict."""

    def stream(
        self, question: str, history: Sequence[Turn], inspection: Inspection, image: np.ndarray
    ) -> Iterator[str]:
        yield from PIECE.findall(grounded_answer(question, inspection))


def intent_of(question: str) -> str | None:
    """The first intent whose keywords occur in the question; None when none does."""
    text = question.lower()
    return next((intent for intent, pattern in INTENT_PATTERNS if pattern.search(text)), None)


def facts_of(inspection: Inspection) -> Facts:
    """The conversation templates' view of an Inspection (no simulated family: the look stays generic)."""
    height, width = inspection.image_size
    return Facts(tuple(inspection.regions), width, height, None, inspection.confidence)


def grounded_answer(question: str, inspection: Inspection) -> str:
    """One answer built from the Inspection; the template variant is fixed by the question's text."""
    rng = np.random.default_rng(zlib.crc32(question.encode("utf-8")))
    intent = intent_of(question)
    if intent is None:
        return f"Here is what the inspection found.\n{inspection.facts()}"
    if intent == "score":
        return score_answer(inspection)
    if intent == "confidence":
        return confidence_answer(inspection, rng)
    if intent == "normal":
        return normal_answer(inspection)
    if inspection.is_anomalous and not inspection.regions:
        return "Yes. " + NO_REGION_ANSWER if intent == "anomaly" else NO_REGION_ANSWER
    # A normal verdict has no regions, so the templates take their "normal" case and say No.
    return ANSWER_BUILDERS[intent](facts_of(inspection), rng)


def score_answer(inspection: Inspection) -> str:
    side = "above" if inspection.margin > 0 else "below"
    return (
        f"The anomaly score is {inspection.score:.4f} against a threshold of {inspection.threshold:.4f}: "
        f"{abs(inspection.margin):.1f} normal spreads {side} it, so the verdict is {inspection.verdict}."
    )


def confidence_answer(inspection: Inspection, rng: np.random.Generator) -> str:
    """The verdict's confidence word, why, and the margin behind it."""
    word = inspection.confidence
    case = "anomalous" if inspection.is_anomalous else "normal"
    text = render("confidence", case, rng, word=word, reason=CONFIDENCE_REASONS[word], adverb=CONFIDENCE_ADVERBS[word])
    side = "above" if inspection.margin > 0 else "below"
    return f"{text} The score is {abs(inspection.margin):.1f} normal spreads {side} the threshold."


def normal_answer(inspection: Inspection) -> str:
    """Answer to 'Is it normal / OK?': Yes for a normal verdict, No with where the regions are otherwise."""
    if not inspection.is_anomalous:
        return f"Yes, it looks normal: the anomaly score {inspection.score:.4f} is below the threshold."
    if not inspection.regions:
        return "No, it is anomalous. " + NO_REGION_ANSWER
    total = format_pct(sum(region.area_pct for region in inspection.regions))
    noun = "region" if len(inspection.regions) == 1 else "regions"
    return (
        f"No, it is anomalous: {len(inspection.regions)} {noun} {where_phrase(inspection.regions)}, "
        f"{total} of the image."
    )


class AssistantAnswerer:
    """The LLM assistant behind the Answerer protocol: ChatSession.stream's steps on an Inspection given per turn.

    The caller owns the Inspection (its sensitivity may move between turns), so the visual tokens are made from
    its map every turn, which is cheap; the image's global embedding, the one encoder pass, is computed once per
    image and cached by the pixels' digest, so follow-up questions never re-encode the image.
    """

    def __init__(self, assistant: Any, guard: bool | None = None) -> None:
        self.assistant = assistant  # anomalygpt.assistant.Assistant, built with its Inspector
        self.guard = guard  # None: the preset's; False lets a bench measure the bare model
        self.embeddings: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # digest -> (1, D), oldest first
        self.lock = threading.Lock()

    def stream(
        self, question: str, history: Sequence[Turn], inspection: Inspection, image: np.ndarray
    ) -> Iterator[str]:
        from anomalygpt.assistant import check_question, system_text
        from anomalygpt.guard import expected_opening

        assistant = self.assistant
        question = check_question(question, assistant.cfg.max_question_chars)  # QuestionError: a ValueError
        with torch.inference_mode():
            maps = assistant.map_input(inspection)  # (1, 1, S, S)
            visual = assistant.visual_tokens(self.embedding(image).to(assistant.device), maps)[0]  # (n, hidden)
        guarded = assistant.cfg.guard if self.guard is None else self.guard
        opening = expected_opening(question, inspection) if guarded else None
        prompt = assistant.prompt_ids(system_text(inspection), history, question)
        yield from assistant.stream(prompt, visual, opening)

    def embedding(self, image: np.ndarray) -> torch.Tensor:
        """(1, D) global embedding of the image, encoded on its first question only."""
        pixels = np.ascontiguousarray(image)
        digest = hashlib.blake2b(str(pixels.shape).encode(), digest_size=16)
        digest.update(pixels.data)
        key = digest.digest()
        with self.lock:
            if key in self.embeddings:
                self.embeddings.move_to_end(key)
                return self.embeddings[key]
        with torch.inference_mode():
            embedding = self.assistant.inspector.backbone.encode([pixels], embedding=True).embedding
        with self.lock:
            self.embeddings[key] = embedding
            while len(self.embeddings) > EMBEDDING_CACHE_SIZE:
                self.embeddings.popitem(last=False)
        return embedding


def load_answerer(preset: Preset, choice: str = "auto", inspector: Inspector | None = None) -> Answerer:
    """The answerer to use; 'auto' takes the LLM assistant only when the preset has trained weights for it.

    An untrained assistant (random prompt learner and projection, no LoRA) would explain nothing, so 'auto'
    answers with the grounded templates then; 'assistant' loads it anyway, and fails when it cannot load.
    """
    if choice not in ANSWERER_CHOICES:
        raise AnswererError(f"unknown answerer {choice!r}; known: {', '.join(ANSWERER_CHOICES)}")
    if choice == "grounded":
        return GroundedAnswerer()
    if choice == "auto" and not preset.assistant.weights:
        note(f"preset {preset.name!r} names no trained assistant weights (assistant.weights)")
        return GroundedAnswerer()
    try:
        from anomalygpt.assistant import build_assistant

        return AssistantAnswerer(build_assistant(preset, inspector))
    except (ImportError, ValueError, OSError) as error:  # a missing package, weights or LLM file
        if choice == "assistant":
            raise AnswererError(f"the LLM assistant is not available: {error}") from error
        note(f"the LLM assistant is not available: {error}")
        return GroundedAnswerer()


def note(reason: str) -> None:
    print(f"note: answering with grounded templates; {reason}", file=sys.stderr)
