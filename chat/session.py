"""A chat about one inspected image answered by any Answerer: what `anomalygpt chat --answerer grounded` runs.

It keeps what anomalygpt.assistant.ChatSession keeps (the image, its inspection, the references, the history, the
claim checker's tally) and offers the same methods, so the terminal drives either; it needs no language model.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from anomalygpt.answerers import Answerer
from anomalygpt.assistant import QuestionError, Turn
from anomalygpt.claims import CheckReport, CheckTally
from anomalygpt.evidence import (
    ChoosesReferences,
    EvidenceSource,
    RegionEvidence,
)
from anomalygpt.inspection import Inspection, Inspector, References
from anomalygpt.io import ImageSource, load_image


class AnswererSession(ChoosesReferences):
    """Multi-turn chat about one inspected image; the inspection is made once per image and reference set."""

    def __init__(
        self,
        inspector: Inspector,
        answerer: Answerer,
        class_name: str | None = None,
        sensitivity: float = 0.0,
        name: str = "grounded",  # how the transcript names the answerer
    ) -> None:
        self.inspector = inspector
        self.answerer = answerer
        self.name = name
        self.class_name = class_name
        self.sensitivity = sensitivity
        self.references: References | None = None
        self.reference_sources: list[str] = []
        self.evidence_source: EvidenceSource | None = None
        self.pixels: np.ndarray | None = None
        self.source: str | None = None
        self.context: Inspection | None = None  # the current inspection; None before an image is shown
        self.evidence_cache: list[RegionEvidence] | None = None
        self.history: list[Turn] = []
        self.checks = CheckTally()

    @property
    def inspection(self) -> Inspection:
        if self.context is None:
            raise ValueError("no image yet: show an image first (/image PATH)")
        return self.context

    def reinspect(self) -> None:
        """A shown image against new references: a new inspection, the history cleared."""
        if self.pixels is not None:
            self.show(self.pixels, self.source)

    def show(self, image: ImageSource, source: str | None = None) -> Inspection:
        """Inspect a new image; the conversation starts over."""
        self.pixels = load_image(image, name=source)
        self.source = source
        self.context = self.inspector.inspect(self.pixels, self.references, self.class_name, source, self.sensitivity)
        self.evidence_cache, self.history = None, []
        return self.context

    def evidence(self) -> list[RegionEvidence] | None:
        if self.context is None or self.pixels is None or self.evidence_source is None:
            return None
        if self.evidence_cache is None:
            self.evidence_cache = self.evidence_source.evidence(self.pixels, self.context)
        return self.evidence_cache

    def reset(self) -> None:
        self.history = []

    def stream(self, question: str) -> Iterator[str]:
        """The answer as text pieces; the turn joins the history once the answer is complete."""
        if self.context is None or self.pixels is None:
            raise QuestionError("no image yet: show an image first (/image PATH)")
        reports: list[CheckReport] = []
        history = [(turn.question, turn.answer) for turn in self.history]
        pieces = []
        for piece in self.answerer.stream(
            question, history, self.context, self.pixels, self.evidence(), reports.append
        ):
            pieces.append(piece)
            yield piece
        report = reports[0] if reports else None
        text = "".join(pieces).strip()
        self.history.append(Turn(" ".join(question.split()), text, True, False, report))
        if report is not None:
            self.checks.add(report)

    def ask(self, question: str) -> str:
        return "".join(self.stream(question)).strip()

    def transcript(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        for turn in self.history:
            messages.append({"role": "user", "content": turn.question})
            said: dict[str, Any] = {"role": "assistant", "content": turn.answer}
            if turn.checks is not None:
                said["checks"] = turn.checks.to_dict()
            messages.append(said)
        return messages

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record of the session: image, references, inspection, evidence, transcript, checker tally."""
        return {
            "image": self.source,
            "references": self.reference_sources,
            "class_name": self.class_name,
            "preset": self.inspector.preset.name,
            "answerer": self.name,
            "inspection": None if self.context is None else self.context.to_dict(),
            "evidence": None if self.evidence_cache is None else [item.to_dict() for item in self.evidence_cache],
            "transcript": self.transcript(),
            "checks": self.checks.to_dict(),
        }
