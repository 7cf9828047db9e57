"""POST /v1/chat's work, without HTTP: an acknowledged inspection rebuilt from the audit trail, a question answered
about it by the verified answerer, and the answer recorded.

The answerers are anomalygpt.answerers, the same `anomalygpt chat` and the web app use: "llm" is
the preset's LLM assistant (grounded opening, every sentence it adds checked against the inspection), "grounded"
the template answers (no language model). Either way what is streamed is what the claim checker passed, never
the model's raw text, and the audit row holds exactly the text that was sent.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from anomalygpt.answerers import CHAT_ANSWERERS, Answerer, AnswererError, GroundedAnswerer, load_answerer
from anomalygpt.inspection import Inspection, Inspector
from anomalygpt.io import load_image
from anomalygpt.regions import Region
from anomalygpt.service.audit import BLOB_SUFFIXES, BlobStore, ChatRow, InspectionRow, iso_utc, utc_now
from anomalygpt.service.core import InspectionService
from anomalygpt.verdict import working_image

INSPECTION_FIELDS = {field.name for field in dataclasses.fields(Inspection)}


class ImageMissing(LookupError):
    """The inspection's image is not in the blob store (rows from before images were kept)."""


def build_answerer(name: str, inspector: Inspector) -> Answerer:
    """The named answerer over the service's Inspector; ValueError for an unknown name or an LLM that cannot load."""
    if name == "grounded":
        return GroundedAnswerer(inspector.preset.assistant.defect_types)
    if name != "llm":
        raise ValueError(f"--answerer: unknown {name!r}; known: {', '.join(CHAT_ANSWERERS)}")
    try:
        return load_answerer(inspector.preset, "assistant", inspector)
    except AnswererError as error:
        raise ValueError(f"--answerer llm: {error} (--answerer grounded answers without a language model)") from error


def stored_inspection(row: InspectionRow, blobs: BlobStore) -> tuple[Inspection, np.ndarray]:
    """The Inspection as it was answered (its JSON and its map) and the pixels it was computed on."""
    result = json.loads(row.result_json)
    values: dict[str, Any] = {key: value for key, value in result.items() if key in INSPECTION_FIELDS}
    values["regions"] = [Region.from_dict(region) for region in result["regions"]]
    values["image_size"] = tuple(result["image_size"])
    values["source_size"] = None if result.get("source_size") is None else tuple(result["source_size"])
    values["anomaly_map"] = np.load(blobs.path(row.map_sha256, BLOB_SUFFIXES["map"]), allow_pickle=False)
    image = blobs.path(row.image_sha256, BLOB_SUFFIXES["image"])
    if not image.is_file():
        raise ImageMissing(f"inspection {row.id}: its image is not stored (inspected before images were kept)")
    return Inspection(**values), working_image(load_image(image.read_bytes(), name=row.image_name))


def sent_checks(checks: dict[str, Any] | None) -> dict[str, Any] | None:
    """The checker's report as a client sees it: without the model's raw text (only checked text leaves)."""
    return None if checks is None else {key: value for key, value in checks.items() if key != "raw"}


def chat_json(row: ChatRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "created": iso_utc(row.created),
        "inspection": row.inspection_id,
        "question": row.question,
        "answer": row.answer,
        "answerer": row.answerer,
        "checks": sent_checks(json.loads(row.checks_json)),
        "latency_ms": row.latency_ms,
    }


class ChatService:
    """Answers questions about inspections with one answerer; runs in the chat worker thread."""

    def __init__(self, service: InspectionService, answerer: Answerer, answerer_name: str) -> None:
        self.service = service
        self.answerer = answerer
        self.answerer_name = answerer_name

    def answer(
        self, row: InspectionRow, question: str, key_name: str | None, emit: Callable[[str], None]
    ) -> dict[str, Any]:
        """Stream the checked answer piece by piece through `emit`, then commit its audit row; its JSON."""
        started = time.perf_counter()
        inspection, pixels = stored_inspection(row, self.service.audit.blobs)
        reports: list[Any] = []
        pieces: list[str] = []
        for piece in self.answerer.stream(question, [], inspection, pixels, None, reports.append):
            pieces.append(piece)
            emit(piece)
        chat = ChatRow(
            id=secrets.token_hex(8),
            created=utc_now(),
            key_name=key_name,
            inspection_id=row.id,
            profile_id=row.profile_id,
            question=question,
            answer="".join(pieces),
            answerer=self.answerer_name,
            checks_json=json.dumps(reports[0].to_dict() if reports else None),
            preset=self.service.inspector.preset.name,
            versions_json=self.service.versions,
            latency_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        self.service.audit.add([chat])
        return chat_json(chat)
