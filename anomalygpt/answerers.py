"""Who answers chat questions about an inspected image: the protocol, a grounded fallback, and the loader.

The detector decides and the answerer explains: every answer is built from the Inspection it is given and must
never contradict it. `GroundedAnswerer` needs no language model: it reads the question's kind
(anomalygpt.guard.read_question) and says the grounded answer for it (anomalygpt.grounded): the Inspection's trust
warnings first, then its verdict, confidence, regions, defect types and evidence. `AssistantAnswerer` puts the
LLM assistant (anomalygpt.assistant) behind the same protocol: the same grounded answer opens its reply, and the
claim checker (anomalygpt.claims) checks every sentence the model adds. Both hand the checker's report for each
answer to `on_report`. `load_answerer` prefers the assistant when the preset has trained assistant weights and it
loads, and falls back to the grounded answerer otherwise.
"""

from __future__ import annotations

import hashlib
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from anomalygpt.claims import CheckReport, ClaimChecker
from anomalygpt.grounded import DefectType, answer_text, chat_grounds
from anomalygpt.guard import read_question

if TYPE_CHECKING:
    from anomalygpt.config import Preset
    from anomalygpt.evidence import RegionEvidence
    from anomalygpt.inspection import Inspection, Inspector

Turn = tuple[str, str]  # (question, answer), oldest first
Reporter = Callable[[CheckReport], None]  # receives the claim checker's report once an answer is complete
ANSWERER_CHOICES = ("auto", "assistant", "grounded")  # auto: the assistant when it loads, else grounded
CHAT_ANSWERERS = ("grounded", "llm")  # the chat command's names: llm is the assistant, required to load
PIECE = re.compile(r"\S+\s*")  # a word and the space after it: the unit the grounded answer streams in
EMBEDDING_CACHE_SIZE = 16  # images whose global embedding the assistant answerer keeps (one (1, D) tensor each)


class AnswererError(ValueError):
    """The requested answerer cannot be loaded; the message says why."""


class Answerer(Protocol):
    """Answers one question about an inspected image, as text pieces that join into the whole answer.

    evidence: per region, its best good match (anomalygpt.evidence), for comparisons with the references."""

    def stream(
        self,
        question: str,
        history: Sequence[Turn],
        inspection: Inspection,
        image: np.ndarray,
        evidence: Sequence[RegionEvidence] | None = None,
        on_report: Reporter | None = None,
    ) -> Iterator[str]: ...


class GroundedAnswerer:
    """Grounded answers from the Inspection alone: instant, offline, and unable to contradict it."""

    def __init__(self, defect_types: Sequence[DefectType] = ()) -> None:
        self.defect_types = tuple(defect_types)

    def stream(
        self,
        question: str,
        history: Sequence[Turn],
        inspection: Inspection,
        image: np.ndarray,
        evidence: Sequence[RegionEvidence] | None = None,
        on_report: Reporter | None = None,
    ) -> Iterator[str]:
        from anomalygpt.assistant import check_question

        question = check_question(question, 100_000)  # QuestionError (a ValueError) when empty
        asked = read_question(question, self.defect_types)
        grounds = chat_grounds(inspection, evidence, self.defect_types, history)
        checker = ClaimChecker(grounds, asked)  # reads the opening too: a grounded answer never needs a repair
        text = "".join(checker.stream([], answer_text(asked, grounds)))
        if on_report is not None:
            on_report(checker.report)
        yield from PIECE.findall(text)


def grounded_answer(
    question: str,
    inspection: Inspection,
    evidence: Sequence[RegionEvidence] | None = None,
    defect_types: Sequence[DefectType] = (),
) -> str:
    """The grounded answer to one question (what GroundedAnswerer says)."""
    grounds = chat_grounds(inspection, evidence, tuple(defect_types), ())
    return answer_text(read_question(question, defect_types), grounds)


class AssistantAnswerer:
    """The LLM assistant behind the Answerer protocol: ChatSession.stream's steps on an Inspection given per turn.

    The caller owns the Inspection (its sensitivity may move between turns), so the visual tokens are made from
    its map every turn, which is cheap; the image's global embedding, the one encoder pass, is computed once per
    image and cached by the pixels' digest, so follow-up questions never re-encode the image.
    """

    def __init__(self, assistant: Any, guard: bool | None = None, check: bool | None = None) -> None:
        self.assistant = assistant  # anomalygpt.assistant.Assistant, built with its Inspector
        self.guard = guard  # None: the preset's; False lets a bench measure the bare model
        self.check = check  # None: the preset's; False shows the model's sentences unchecked
        self.embeddings: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # digest -> (1, D), oldest first
        self.lock = threading.Lock()

    def stream(
        self,
        question: str,
        history: Sequence[Turn],
        inspection: Inspection,
        image: np.ndarray,
        evidence: Sequence[RegionEvidence] | None = None,
        on_report: Reporter | None = None,
    ) -> Iterator[str]:
        from anomalygpt.assistant import check_question

        assistant = self.assistant
        question = check_question(question, assistant.cfg.max_question_chars)  # QuestionError: a ValueError
        with torch.inference_mode():
            maps = assistant.map_input(inspection)  # (1, 1, S, S)
            visual = assistant.visual_tokens(self.embedding(image).to(assistant.device), maps)[0]  # (n, hidden)
        answer = assistant.answer(question, history, inspection, visual, evidence, self.guard, self.check)
        yield from answer
        if on_report is not None and answer.report is not None:
            on_report(answer.report)

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
    grounded = GroundedAnswerer(preset.assistant.defect_types)
    if choice == "grounded":
        return grounded
    if choice == "auto" and not preset.assistant.weights:
        note(f"preset {preset.name!r} names no trained assistant weights (assistant.weights)")
        return grounded
    try:
        from anomalygpt.assistant import build_assistant

        return AssistantAnswerer(build_assistant(preset, inspector, inference=True))
    except (ImportError, ValueError, OSError) as error:  # a missing package, weights or LLM file
        if choice == "assistant":
            raise AnswererError(f"the LLM assistant is not available: {error}") from error
        note(f"the LLM assistant is not available: {error}")
        return grounded


def note(reason: str) -> None:
    print(f"note: answering with grounded templates; {reason}", file=sys.stderr)
