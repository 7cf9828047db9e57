"""What the service does, without HTTP: fit profiles, inspect images against them, record both in the audit trail.

Every method here runs in the one worker thread (see batching.py); the HTTP layer only parses, limits and answers.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from anomalygpt.config import with_false_alarm_rate
from anomalygpt.inspection import BATCH_SIZE, Inspection, Inspector, References
from anomalygpt.io import file_sha256, load_image
from anomalygpt.profile import ProfileError, package_versions
from anomalygpt.references import InspectionError
from anomalygpt.service.audit import (
    BLOB_SUFFIXES,
    AuditStore,
    InspectionRow,
    ProfileRow,
    inspection_json,
    profile_json,
    utc_now,
)
from anomalygpt.verdict import working_image
from anomalygpt.visualize import figure_png

ID_PATTERN = re.compile(
    r"[0-9a-f]{16}"
)  # ids are ours (16 hex digits): nothing else names a profile, inspection or path
CACHED_PROFILES = 16  # loaded References kept in memory, least recently used dropped first


def inference_batch_size(inspector: Inspector) -> int:
    """Images per backbone pass: the Inspector's batch on a GPU; 1 on a CPU, where a gathered batch inspected
    image after image in the worker thread measured faster than batched passes (bench/RESULTS.md, issue 21)."""
    return BATCH_SIZE if inspector.preset.device.startswith("cuda") else 1


class UnknownProfile(LookupError):
    """No profile with this id was created by this service."""


@dataclass(frozen=True)
class Upload:
    name: str  # the client's file name, only ever used as a label
    data: bytes


@dataclass(frozen=True)
class InspectRequest:
    images: list[Upload]
    sensitivity: float
    key_name: str | None
    started: float  # time.perf_counter() when the request arrived: latency includes queueing


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class InspectionService:
    """One Inspector (loaded once), the profiles folder, a cache of loaded profiles and the audit store."""

    def __init__(self, inspector: Inspector, profiles_dir: Path, audit: AuditStore, batch_size: int = 1) -> None:
        self.inspector = inspector
        self.batch_size = batch_size  # images per backbone pass (inference_batch_size)
        self.profiles_dir = profiles_dir
        self.audit = audit
        self.cache: OrderedDict[str, References] = OrderedDict()
        self.versions = json.dumps(package_versions())

    def profile_row(self, profile_id: str) -> ProfileRow:
        row = self.audit.profile(profile_id) if ID_PATTERN.fullmatch(profile_id) else None
        if row is None:
            raise UnknownProfile(f"profile {profile_id!r}: no such profile (create it with POST /v1/profiles)")
        return row

    def references(self, row: ProfileRow) -> References:
        """The profile's references, loaded on first use, then kept by id (a profile never changes)."""
        if row.id in self.cache:
            self.cache.move_to_end(row.id)
            return self.cache[row.id]
        path = self.profiles_dir / row.file
        if not path.is_file() or file_sha256(path) != row.checksum:
            raise ProfileError(f"profile {row.id}: its file is missing or was changed since it was created")
        references = self.inspector.load_profile(path)
        self.cache[row.id] = references
        while len(self.cache) > CACHED_PROFILES:
            self.cache.popitem(last=False)
        return references

    def create_profile(
        self, name: str, uploads: Sequence[Upload], key_name: str | None, false_alarm_rate: float | None = None
    ) -> dict[str, Any]:
        """Fit the good images as `anomalygpt fit` does (`false_alarm_rate` as its --false-alarm-rate); the file is
        written atomically, then its row committed."""
        started = time.perf_counter()
        images = [load_image(upload.data, name=upload.name) for upload in uploads]
        fitter = self.inspector.with_preset(with_false_alarm_rate(self.inspector.preset, false_alarm_rate))
        references = fitter.fit(images, names=[upload.name for upload in uploads])
        profile_id = secrets.token_hex(8)
        path = fitter.save_profile(references, self.profiles_dir / f"{profile_id}.profile")
        height, width = references.memory.image_size
        row = ProfileRow(
            id=profile_id,
            name=name,
            version=0,  # add_profile commits it as the name's next version
            created=utc_now(),
            key_name=key_name,
            file=path.name,
            checksum=file_sha256(path),
            n_references=references.memory.n_references,
            image_height=height,
            image_width=width,
            threshold=references.calibration.image_threshold,
            false_alarm_rate=references.calibration.false_alarm_rate,
            preset=self.inspector.preset.name,
            references_json=json.dumps(
                [{"name": u.name, "sha256": sha256(u.data), "bytes": len(u.data)} for u in uploads]
            ),
            warnings_json=json.dumps(references.warnings),
            latency_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        try:
            self.audit.add_profile(row)
        except BaseException:
            path.unlink(missing_ok=True)  # no profile file without its row
            raise
        self.cache[profile_id] = references
        return profile_json(row)

    def run_batch(self, profile_id: str, requests: Sequence[InspectRequest]) -> list[Any]:
        """Answer each request of one profile (a list of inspection JSONs, or the error that refused it): every
        image decoded and checked per request, then all of them through one batched inspection, then each
        request's rows committed together."""
        try:
            row = self.profile_row(profile_id)
            references = self.references(row)
        except (UnknownProfile, ProfileError) as error:
            return [error] * len(requests)
        answers: list[Any] = [None] * len(requests)
        decoded: dict[int, list[np.ndarray]] = {}
        for index, request in enumerate(requests):
            try:
                decoded[index] = self.decode(request, references)
            except (ValueError, OSError) as error:  # ImageError, InspectionError: this request's own fault
                answers[index] = error
        for index, inspections in self.inspect_decoded(references, requests, decoded).items():
            try:
                answers[index] = self.record(row, requests[index], decoded[index], inspections)
            except (ValueError, OSError) as error:
                answers[index] = error
        return answers

    def decode(self, request: InspectRequest, references: References) -> list[np.ndarray]:
        """The request's images as decoded (full size), each checked against the profile's size at working size."""
        images = [load_image(upload.data, name=upload.name) for upload in request.images]
        for upload, image in zip(request.images, images, strict=True):
            check_size(upload.name, working_image(image), references.memory.image_size)
        return images

    def inspect_decoded(
        self, references: References, requests: Sequence[InspectRequest], decoded: dict[int, list[np.ndarray]]
    ) -> dict[int, list[Inspection]]:
        """Every decoded image through Inspector.inspect_many (batched backbone passes), one call per sensitivity
        (one for the whole batch unless requests ask for different ones); the inspections per request."""
        found: dict[int, list[Inspection]] = {}
        for sensitivity in dict.fromkeys(requests[index].sensitivity for index in decoded):
            members = [index for index in decoded if requests[index].sensitivity == sensitivity]
            images = [image for index in members for image in decoded[index]]
            names = [upload.name for index in members for upload in requests[index].images]
            results = iter(
                self.inspector.inspect_many(
                    images, references, sources=names, sensitivity=sensitivity, batch_size=self.batch_size
                )
            )
            for index in members:
                found[index] = [next(results) for _ in decoded[index]]
        return found

    def record(
        self, row: ProfileRow, request: InspectRequest, images: list[np.ndarray], inspections: list[Inspection]
    ) -> list[dict[str, Any]]:
        """The request's rows, committed together after every file they name exists; their JSON."""
        rows = [
            self.inspection_row(row, upload, working_image(image), inspection, request)
            for upload, image, inspection in zip(request.images, images, inspections, strict=True)
        ]
        self.audit.add(rows)
        return [inspection_json(r) for r in rows]

    def inspection_row(
        self, profile: ProfileRow, upload: Upload, pixels: np.ndarray, inspection: Inspection, request: InspectRequest
    ) -> InspectionRow:
        """The audit row, its image, overlay and map written first (content-addressed, atomically)."""
        assert inspection.anomaly_map is not None
        # Named by its sha256 (image_sha256, what chat re-reads): the bytes inspected, which the record names too.
        inspection.source_sha256 = self.audit.blobs.put(upload.data, BLOB_SUFFIXES["image"])
        overlay = self.audit.blobs.put(figure_png(pixels, inspection), BLOB_SUFFIXES["overlay"])
        anomaly_map = self.audit.blobs.put(npy_bytes(inspection.anomaly_map.astype(np.float32)), BLOB_SUFFIXES["map"])
        result = inspection.to_dict()
        return InspectionRow(
            id=secrets.token_hex(8),
            created=utc_now(),
            key_name=request.key_name,
            profile_id=profile.id,
            profile_version=profile.version,
            profile_checksum=profile.checksum,
            image_name=upload.name[:300],
            image_sha256=inspection.source_sha256,
            image_bytes=len(upload.data),
            image_height=int(pixels.shape[0]),
            image_width=int(pixels.shape[1]),
            verdict=inspection.verdict,
            score=inspection.score,
            threshold=inspection.threshold,
            margin=inspection.margin,
            sensitivity=request.sensitivity,
            regions_json=json.dumps(result["regions"], allow_nan=False),
            result_json=json.dumps(result, allow_nan=False),
            overlay_sha256=overlay,
            map_sha256=anomaly_map,
            preset=self.inspector.preset.name,
            versions_json=self.versions,
            latency_ms=round((time.perf_counter() - request.started) * 1000, 1),
        )


def check_size(name: str, pixels: np.ndarray, expected: tuple[int, int]) -> None:
    """InspectionError before any inference when an image is not the size of the profile's references."""
    if pixels.shape[:2] != tuple(expected):
        height, width = expected
        raise InspectionError(
            f"{name}: {pixels.shape[1]}x{pixels.shape[0]} px but the profile's references are {width}x{height} px"
        )
