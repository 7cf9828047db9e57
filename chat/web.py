"""`anomalygpt ui`: a gradio web app to inspect an image against good references and chat about the result.

Everything one user uploads, sees or asks lives in their `Session` (a gr.State), so two browser tabs are two
independent sessions; only the loaded models (the Inspector and the Answerer) are shared. A query is encoded once
per reference set and product name: the sensitivity slider re-decides verdict, thresholds and regions from the
cached anomaly map with `anomalygpt.verdict.decide`, without encoding anything again. Every input error
becomes a one-line message in the page (a warning toast and the status box), never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import gradio as gr
import numpy as np
import pandas as pd

from anomalygpt.answerers import ANSWERER_CHOICES, Answerer, Turn, load_answerer
from anomalygpt.calibration import Calibration
from anomalygpt.claims import CheckTally
from anomalygpt.cli import SENSITIVITY_RANGE
from anomalygpt.devices import add_device_option, with_device
from anomalygpt.evidence import EvidenceSource, RegionEvidence, profile_evidence
from anomalygpt.grounded import rarity_sentence, rate_sentence
from anomalygpt.inspection import (
    MAX_REFERENCES,
    Inspection,
    Inspector,
    References,
    build_inspector,
    reference_name,
)
from anomalygpt.io import IMAGE_SUFFIXES, load_image, write_json_atomic, write_png_atomic
from anomalygpt.profile import chosen_preset
from anomalygpt.regions import format_pct
from anomalygpt.verdict import confidence_word, decide
from anomalygpt.visualize import ANOMALOUS_COLOR, NORMAL_COLOR, evidence_pair, inspection_figure
from chat.uploads import UploadLog, discard, private_upload_folder

log = logging.getLogger(__name__)

PROG = "anomalygpt ui"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# Uploads above this are refused by the server before any decoding; anomalygpt.io then refuses images above
# io.MAX_PIXELS from their header and below io.MIN_SIDE.
MAX_UPLOAD_MB = 64
DISPLAY_MAX_SIDE = 1024  # px; the page shows the figure shrunk to this, the PNG download keeps full size
THUMBNAIL_SIDE = 160  # px, longer side of a reference in the gallery
SENSITIVITY_STEP = 0.1
CACHE_CLEANUP = (3600, 3600)  # gradio deletes its uploaded and served files older than 1 h, checking hourly
TABLE_HEADERS = ["#", "location", "size", "descriptors", "peak score"]
RESULTS = ("overlay", "table", "badge", "json_file", "png_file", "evidence")  # the Screen fields render_results fills
STALE_MARK = "[stale: answered for an earlier verdict] "  # before answers the sensitivity slider made outdated
USER_ERRORS = (ValueError, OSError)  # ImageError, InspectionError, ConfigError; WeightsError is an OSError
MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]<>#|~])")
CSS = f"""
#verdict .badge {{padding: 10px 14px; border-radius: 8px; color: #fff; font-weight: 600;}}
#verdict .badge.anomalous {{background: rgb{ANOMALOUS_COLOR};}}
#verdict .badge.normal {{background: rgb{NORMAL_COLOR};}}
#verdict .badge.pending {{background: #6b7280;}}
#verdict .verdict-word {{text-transform: uppercase; font-size: 1.4em; margin-right: 0.8em;}}
"""
# System fonts only: the default theme imports Google fonts, which an offline machine cannot fetch.
THEME_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]


class UserError(ValueError):
    """An input the page asks the user to fix; the message is one line."""


@dataclass(frozen=True)
class Picture:
    """An uploaded image, decoded once."""

    name: str  # file name as uploaded
    pixels: np.ndarray = field(repr=False)  # (H, W, 3) uint8
    token: str = field(default_factory=lambda: secrets.token_hex(8))  # identity in cache keys

    @property
    def size_text(self) -> str:
        return f"{self.pixels.shape[1]}x{self.pixels.shape[0]} px"


class Export(NamedTuple):
    """The download files of one inspection."""

    inspection: Inspection  # the one they hold
    json_path: Path
    png_path: Path
    figure: np.ndarray  # (h, W', 3) uint8: banner above the overlay, as in the PNG


@dataclass
class Session:
    """One browser tab's uploads, cached inspection and chat."""

    query: Picture | None = None
    references: list[Picture] = field(default_factory=list)
    selected: int | None = None  # gallery index of the reference to remove
    fitted: References | None = None  # the references indexed for fitted_key
    fitted_key: tuple[Any, ...] | None = None  # reference tokens and product name
    inspection: Inspection | None = None
    inspected_key: tuple[Any, ...] | None = None  # query token, reference tokens and product name
    sensitivity: float = 0.0  # the one the current inspection was decided at
    history: list[Turn] = field(default_factory=list)  # replaced, never emptied in place (see stream_answer)
    results_stale: bool = False  # the chat made an inspection that overlay, table and badge do not show yet
    preset: str = ""  # name of the preset that made the inspection, recorded in the JSON download
    folder: Path | None = None  # temp folder for this session's downloads
    exported: Export | None = None  # the download files of the current inspection
    stale_turns: int = 0  # history[:stale_turns] was answered for an inspection the sensitivity has changed since
    checks: CheckTally = field(default_factory=CheckTally)  # what the claim checker did in this tab's chat
    evidence_source: EvidenceSource | None = None  # the fitted references' pixels and features, for evidence
    evidence: tuple[Inspection, list[RegionEvidence]] | None = None  # the evidence of that inspection
    uploads: UploadLog = field(default_factory=UploadLog)  # this tab's recent uploads, held to chat.uploads' limits

    def close(self) -> None:
        """Delete the download files; gradio calls this when the tab's state expires."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


class Screen(NamedTuple):
    """What a handler shows: one field per output component; gr.skip() leaves a component as it is.

    Each event sends only the fields it can change (see `projected`), since gradio charges every output it is
    given, skipped or not.
    """

    session: Session
    status: Any
    overlay: Any
    table: Any
    badge: Any
    json_file: Any
    png_file: Any
    evidence: Any
    chat: Any
    gallery: Any
    question: Any


def screen(
    session: Session,
    status: str | None = None,
    *,
    results: bool = False,
    chat: bool = False,
    gallery: bool = False,
    question: Any = None,
) -> Screen:
    """The outputs to send: status (None: unchanged) and the parts flagged, everything else skipped."""
    shown = render_results(session) if results else (gr.skip(),) * len(RESULTS)
    return Screen(
        session,
        gr.skip() if status is None else status,
        *shown,
        chat_messages(session.history, session.stale_turns) if chat else gr.skip(),
        gallery_items(session.references) if gallery else gr.skip(),
        gr.skip() if question is None else question,
    )


def failure(session: Session, error: BaseException) -> Screen:
    """The screen for a failed event: a toast and the status box."""
    message = failure_message(error)
    gr.Warning(message)
    return screen(session, f"**Error:** {escape_markdown(message)}")


def failure_message(error: BaseException) -> str:
    """One line for the page; an unexpected error also goes to the server log with its traceback."""
    if isinstance(error, USER_ERRORS):
        return one_line(str(error))
    log.exception("web handler failed")
    return f"something went wrong ({type(error).__name__}: {one_line(str(error))}); details are in the server log"


def guarded(handler: Callable[..., Screen]) -> Callable[..., Screen]:
    """The handler with any exception turned into a failure screen, never a traceback."""

    @functools.wraps(handler)
    def call(app: WebApp, session: Session, *args: Any) -> Screen:
        try:
            return handler(app, session, *args)
        except Exception as error:
            return failure(session, error)

    return call


class WebApp:
    """The page's event handlers; each takes the tab's Session first and returns (or yields) a Screen."""

    def __init__(
        self,
        inspector: Inspector,
        answerer: Answerer,
        preset_name: str,
        profile: References | None = None,
        evidence: EvidenceSource | None = None,
    ) -> None:
        self.inspector = inspector
        self.answerer = answerer
        self.preset_name = preset_name
        self.profile = profile  # `ui --profile`: the references of a tab that uploaded none
        self.profile_evidence = evidence  # the profile's reference files, when they are at hand and unchanged

    @guarded
    def load_query(self, session: Session, path: str | None) -> Screen:
        refused = admitted(session, [] if path is None else [path])[1]
        if refused:
            raise UserError(refused[0])
        forget_inspection(session)
        session.query = None
        if path is not None:
            session.query = decode(path)
        status = "Query cleared." if path is None else f"Query {escape_markdown(session.query.name)} loaded."
        return screen(session, status + next_step(session, self.profile), results=True, chat=True)

    @guarded
    def add_references(self, session: Session, paths: Sequence[str] | None) -> Screen:
        kept, problems = admitted(session, paths or [])
        before = len(session.references)
        for path in kept:
            try:
                session.references.append(self.checked_reference(session, decode(path)))
            except UserError as error:
                problems.append(str(error))
        if len(session.references) > before:
            forget_inspection(session)
        status = f"{len(session.references)} good reference(s)." + next_step(session, self.profile)
        if problems:
            gr.Warning("; ".join(problems))
            status = "\n".join([f"- **Error:** {escape_markdown(p)}" for p in problems] + ["", status])
        return screen(session, status, results=True, chat=True, gallery=True)

    def checked_reference(self, session: Session, picture: Picture) -> Picture:
        """The picture, if there is room for it and it has the other references' size."""
        if len(session.references) >= MAX_REFERENCES:
            raise UserError(f"{picture.name}: not added; at most {MAX_REFERENCES} good references are supported")
        first = session.references[0] if session.references else None
        if first is not None and picture.pixels.shape[:2] != first.pixels.shape[:2]:
            raise UserError(
                f"{picture.name}: {picture.size_text} but {first.name} is {first.size_text}; "
                "all references must have one size"
            )
        return picture

    def select_reference(self, session: Session, event: gr.SelectData) -> Session:
        session.selected = event.index if isinstance(event.index, int) else None
        return session

    @guarded
    def remove_reference(self, session: Session) -> Screen:
        index = session.selected
        if index is None or not 0 <= index < len(session.references):
            raise UserError("click a reference in the gallery first, then Remove selected")
        removed = session.references.pop(index)
        session.selected = None
        forget_inspection(session)
        status = f"Removed {escape_markdown(removed.name)}; {len(session.references)} good reference(s) left."
        return screen(session, status + next_step(session, self.profile), results=True, chat=True, gallery=True)

    @guarded
    def clear_references(self, session: Session) -> Screen:
        session.references, session.selected = [], None
        forget_inspection(session)
        status = "References cleared." + next_step(session, self.profile)
        return screen(session, status, results=True, chat=True, gallery=True)

    @guarded
    def inspect(self, session: Session, product: str, sensitivity: float) -> Screen:
        self.ensure_inspection(session, product, sensitivity)
        return screen(session, inspection_status(session), results=True, chat=True)

    @guarded
    def set_sensitivity(self, session: Session, sensitivity: float) -> Screen:
        """Re-decide the cached inspection at a new sensitivity; nothing is encoded again."""
        session.sensitivity = float(sensitivity)
        if session.inspection is None or session.query is None:
            return screen(session)
        before = session.inspection
        session.inspection = redecided(before, session.query.pixels, session.sensitivity)
        status = inspection_status(session)
        changed = (session.inspection.verdict, session.inspection.regions) != (before.verdict, before.regions)
        if session.inspection.verdict != before.verdict:
            status += f" The verdict changed from {before.verdict}; answers from here on use the new one."
        if changed and len(session.history) > session.stale_turns:
            session.stale_turns = len(session.history)
            status += " The answers above are marked stale."
        return screen(session, status, results=True, chat=changed)

    def ask(self, session: Session, question: str, product: str, sensitivity: float) -> Iterator[Screen]:
        """Take a question (inspecting first when the inputs changed) and stream its answer into the chat.

        The page sends only chat, question box and status from here, since every further output would cost each
        streamed piece; `show_results` draws a verdict this made once the answer is complete.
        """
        try:
            turns, index = self.take_question(session, question, product, sensitivity)
        except Exception as error:
            yield failure(session, error)
            return
        yield screen(session, inspection_status(session), chat=True, question="")
        yield from self.stream_answer(session, turns, index)

    def take_question(
        self, session: Session, question: str, product: str, sensitivity: float
    ) -> tuple[list[Turn], int]:
        """The conversation the question joins and its turn's index there, once the inspection is current."""
        question = question.strip()
        if not question:
            raise UserError("type a question first")
        session.results_stale |= self.ensure_inspection(session, product, sensitivity)
        session.history.append((question, ""))
        return session.history, len(session.history) - 1

    def stream_answer(self, session: Session, turns: list[Turn], index: int) -> Iterator[Screen]:
        """The answer into turns[index], piece by piece; it stops when the chat is cleared meanwhile."""
        question, inspection, query = turns[index][0], session.inspection, session.query
        assert inspection is not None and query is not None  # take_question made them
        text = ""
        history = turns[session.stale_turns : index]  # answers for an earlier verdict are no ground to build on
        try:
            evidence = session_evidence(session)
            pieces = self.answerer.stream(question, history, inspection, query.pixels, evidence, session.checks.add)
            for piece in pieces:
                if session.history is not turns:  # Clear chat, new inputs or Reset: nobody reads this answer
                    return
                text += piece
                turns[index] = (question, text)
                yield screen(session, chat=True)
        except Exception as error:
            message = failure_message(error)
            gr.Warning(message)
            turns[index] = (question, f"{text} [no answer: {message}]".strip())
            yield screen(session, chat=True)
            return
        yield screen(session, f"{inspection_status(session)} {escape_markdown(session.checks.summary())}.", chat=True)

    @guarded
    def show_results(self, session: Session) -> Screen:
        """Draw the inspection that a question made (the inputs had changed since the last Inspect)."""
        stale, session.results_stale = session.results_stale, False
        return screen(session, results=stale)

    @guarded
    def clear_chat(self, session: Session) -> Screen:
        session.history, session.stale_turns = [], 0
        return screen(session, "Chat cleared.", chat=True)

    @guarded
    def reset(self, session: Session) -> Screen:
        session.close()
        session.history = []  # an answer still streaming into the old chat stops
        fresh = Session()
        return screen(fresh, f"Reset. {welcome(self.profile)}", results=True, chat=True, gallery=True)

    def ensure_inspection(self, session: Session, product: str, sensitivity: float) -> bool:
        """Inspect the query unless the current inspection is for these inputs; True when a new one was made."""
        name = product.strip() or None
        references_key = (tuple(picture.token for picture in session.references), name)
        query = self.checked_query(session)
        key = (query.token, *references_key)
        if session.inspection is not None and session.inspected_key == key:
            return False
        if session.references and session.fitted_key != references_key:
            session.fitted = self.inspector.fit([picture.pixels for picture in session.references], name)
            session.fitted_key = references_key
            session.evidence_source = evidence_source(session.fitted, session.references)
        references = session.fitted if session.references else self.profile
        if not session.references:
            session.evidence_source = self.profile_evidence
        session.inspection = self.inspector.inspect(
            query.pixels, references, class_name=name, source=query.name, sensitivity=float(sensitivity)
        )
        session.inspected_key, session.sensitivity, session.history = key, float(sensitivity), []
        session.stale_turns, session.evidence = 0, None
        session.preset = self.preset_name
        return True

    def checked_query(self, session: Session) -> Picture:
        """The query, once it can be inspected: there are references of its size, or a zero-shot decoder."""
        query = session.query
        if query is None:
            raise UserError("upload a query image first")
        if not session.references and self.profile is not None:
            if query.pixels.shape[:2] != self.profile.memory.image_size:
                h, w = self.profile.memory.image_size
                raise UserError(f"{query.name}: {query.size_text} but the profile's references are {w}x{h} px")
            return query
        if not session.references and self.inspector.prior is None:
            raise UserError(
                f"add 1 to {MAX_REFERENCES} good reference images of the same product; this preset has no "
                "trained decoder for inspection without references"
            )
        first = session.references[0] if session.references else None
        if first is not None and query.pixels.shape[:2] != first.pixels.shape[:2]:
            raise UserError(
                f"{query.name}: {query.size_text} but the references are {first.size_text}; "
                "the query and the references must have one size"
            )
        return query


def decode(path: str) -> Picture:
    """An uploaded file as a Picture; a bad file is a one-line UserError naming it. The upload is deleted either
    way: the Picture holds the pixels."""
    name = Path(path).name
    try:
        return Picture(name, load_image(path, name=name))
    except USER_ERRORS as error:
        raise UserError(one_line(str(error))) from error
    finally:
        discard(path)


def admitted(session: Session, paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the uploads within the tab's limits, one-line refusals of the others, whose files are deleted)."""
    now = time.monotonic()
    verdicts = [(path, session.uploads.admit(path, now)) for path in paths]
    return [path for path, refusal in verdicts if refusal is None], [r for _, r in verdicts if r is not None]


def forget_inspection(session: Session) -> None:
    """The inputs changed: the inspection and the chat about it no longer apply."""
    session.inspection, session.inspected_key, session.history = None, None, []
    session.stale_turns, session.evidence = 0, None


def evidence_source(fitted: References, pictures: Sequence[Picture]) -> EvidenceSource:
    """The references' pixels by the names the Inspector gave them, answers naming them by their file names."""
    names = [reference_name(picture.pixels, i) for i, picture in enumerate(pictures)]
    pixels = {name: picture.pixels for name, picture in zip(names, pictures, strict=True)}
    return EvidenceSource(fitted, pixels, {name: picture.name for name, picture in zip(names, pictures, strict=True)})


def session_evidence(session: Session) -> list[RegionEvidence] | None:
    """Per region of the current inspection, its best good match (computed once per inspection); None without
    references."""
    inspection, query = session.inspection, session.query
    if inspection is None or query is None or session.evidence_source is None:
        return None
    if session.evidence is None or session.evidence[0] is not inspection:
        session.evidence = (inspection, session.evidence_source.evidence(query.pixels, inspection))
    return session.evidence[1]


def redecided(inspection: Inspection, pixels: np.ndarray, sensitivity: float) -> Inspection:
    """The inspection decided again at another sensitivity, from its cached anomaly map."""
    if inspection.anomaly_map is None:
        raise UserError("this inspection kept no anomaly map; inspect again")
    calibration = Calibration(**inspection.calibration)
    decision = decide(
        inspection.anomaly_map, pixels, inspection.score, calibration, sensitivity, inspection.min_region_px
    )
    return replace(
        inspection,
        is_anomalous=decision.is_anomalous,
        threshold=decision.threshold,
        margin=decision.margin,
        confidence=confidence_word(decision.margin),
        pixel_threshold=decision.pixel_threshold,
        regions=decision.regions,
    )


def export(session: Session) -> Export:
    """The inspection's JSON and overlay PNG in the session's folder, written once per inspection."""
    inspection, query = session.inspection, session.query
    assert inspection is not None and query is not None
    if session.exported is not None and session.exported.inspection is inspection:
        return session.exported
    if session.folder is None:
        # Inside the server's private upload folder when it has one, so that it goes when the server stops.
        session.folder = Path(tempfile.mkdtemp(prefix="anomalygpt-ui-", dir=os.environ.get("GRADIO_TEMP_DIR")))
    stem = re.sub(r"[^\w.-]", "_", Path(query.name).stem)[:80] or "query"
    record = inspection.to_dict() | {
        "sensitivity": session.sensitivity,
        "references": [picture.name for picture in session.references],
        "preset": session.preset,
    }
    figure = inspection_figure(query.pixels, inspection)
    json_path = write_json_atomic(session.folder / f"{stem}_inspection.json", record)
    png_path = write_png_atomic(session.folder / f"{stem}_overlay.png", figure)
    session.exported = Export(inspection, json_path, png_path, figure)
    return session.exported


def render_results(session: Session) -> tuple[Any, ...]:
    """(overlay, table, badge, JSON download, PNG download) for the session's inspection."""
    inspection, query = session.inspection, session.query
    if inspection is None:
        preview = None if query is None else shrunk(query.pixels)
        waiting = gr.DownloadButton(value=None, interactive=False)
        return preview, region_table(None), badge_html(None), waiting, waiting, []
    files = export(session)
    return (
        shrunk(files.figure),
        region_table(inspection),
        badge_html(inspection),
        gr.DownloadButton(value=str(files.json_path), interactive=True),
        gr.DownloadButton(value=str(files.png_path), interactive=True),
        evidence_items(session),
    )


def evidence_items(session: Session) -> list[tuple[np.ndarray, str]]:
    """Per region: the defect crop beside the good crop of its best-matching reference, with a caption."""
    found, inspection, query = session_evidence(session) or [], session.inspection, session.query
    if inspection is None or query is None or session.evidence_source is None:
        return []
    images = session.evidence_source.images_by_name
    names = session.evidence_source.references.names
    items = []
    for item in found:
        region = inspection.regions[item.region - 1]
        shade = "darker" if item.difference < 0 else "brighter"
        caption = (
            f"region {region.index} ({region.where()}) | reference {item.reference + 1}: {item.reference_name} "
            f"({item.location}); {abs(item.difference):.0f} grey levels {shade}"
        )
        pair = evidence_pair(query.pixels, images[names[item.reference]], region.box, item.box)
        items.append((pair, caption))
    return items


def shrunk(image: np.ndarray, side: int = DISPLAY_MAX_SIDE) -> np.ndarray:
    """The image scaled down so its longer side is at most `side` px (never up)."""
    scale = side / max(image.shape[:2])
    if scale >= 1:
        return image
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def region_table(inspection: Inspection | None) -> pd.DataFrame:
    """One row per region: index, location word, size word and area, shape and contrast, peak score."""
    regions = [] if inspection is None else inspection.regions
    rows = [
        [
            region.index,
            region.where(),
            f"{region.size} ({format_pct(region.area_pct)})",
            f"{region.shape}, {region.contrast}",
            f"{region.peak_score:.4f}",
        ]
        for region in regions
    ]
    return pd.DataFrame(rows, columns=TABLE_HEADERS)


def badge_html(inspection: Inspection | None) -> str:
    """The verdict in words on its colour, with score, threshold, margin and confidence beside it."""
    if inspection is None:
        return '<div class="badge pending" data-verdict=""><span class="verdict-word">not inspected</span></div>'
    relation = "&gt;" if inspection.score > inspection.threshold else "&le;"
    verdict = inspection.verdict
    return (
        f'<div class="badge {verdict}" data-verdict="{verdict}"><span class="verdict-word">{verdict}</span>'
        f'<span class="verdict-numbers">score {inspection.score:.4f} {relation} threshold '
        f"{inspection.threshold:.4f} &middot; margin {inspection.margin:+.1f} &middot; "
        f"confidence {inspection.confidence}{unfit_mark(inspection)}</span></div>"
    )


def unfit_mark(inspection: Inspection) -> str:
    """A mark in the badge when the query does not look like the references (the status says why)."""
    fit = inspection.reference_fit
    return " &middot; <b>references do not fit</b>" if fit is not None and fit.get("fits") is False else ""


def inspection_status(session: Session) -> str:
    inspection = session.inspection
    assert inspection is not None
    noun = "region" if len(inspection.regions) == 1 else "regions"
    # Why the inspection may not be trusted comes first: references unlike the query, one reference, duplicates.
    warnings = "".join(f"**Warning:** {escape_markdown(warning)}. " for warning in inspection.warnings)
    notes = "".join(f" Note: {escape_markdown(note)}." for note in inspection.notes)
    # What a conformal threshold keeps and how rare the score is, in the chat's own words, with the p-value itself
    rarity = [f"{line.removesuffix('.')} (p = {inspection.p_value:.3f})." for line in rarity_sentence(inspection)]
    threshold = "".join(f" {escape_markdown(line)}" for line in [*rate_sentence(inspection), *rarity])
    return warnings + (
        f"Verdict **{inspection.verdict}** at sensitivity {session.sensitivity:+.1f} "
        f"({len(inspection.regions)} {noun}); ask about it in the chat.{threshold}{notes}"
    )


def next_step(session: Session, profile: References | None = None) -> str:
    """What to do next; with `ui --profile` a tab needs no references of its own."""
    if session.query is None:
        return " Next: upload a query image."
    if not session.references and profile is not None:
        return f" Next: press Inspect or ask a question ({profile_words(profile)})."
    if not session.references:
        return " Next: add good reference images of the same product."
    return " Next: press Inspect or ask a question."


def profile_words(profile: References) -> str:
    return f"against the profile's {len(profile.names)} good references unless you add your own"


def welcome(profile: References | None) -> str:
    """The status a new tab starts with."""
    if profile is None:
        return "Upload a query image and good references."
    return f"Upload a query image; it is inspected {profile_words(profile)}."


def chat_messages(history: Sequence[Turn], stale: int = 0) -> list[dict[str, str]]:
    """The chat as messages; the first `stale` answers are marked as given for an earlier verdict."""
    return [
        message
        for index, (question, answer) in enumerate(history)
        for message in (
            {"role": "user", "content": question},
            {"role": "assistant", "content": (STALE_MARK if index < stale else "") + answer},
        )
    ]


def gallery_items(references: Sequence[Picture]) -> list[tuple[np.ndarray, str]]:
    return [(shrunk(picture.pixels, THUMBNAIL_SIDE), picture.name) for picture in references]


def one_line(text: str) -> str:
    return " ".join(text.split())


def escape_markdown(text: str) -> str:
    """Text shown literally in a gr.Markdown (file names with underscores, stars...)."""
    return MARKDOWN_SPECIAL.sub(r"\\\1", text)


def build_blocks(app: WebApp) -> gr.Blocks:
    """The page: inputs | chat | verdict, overlay, region table and downloads."""
    file_types = list(IMAGE_SUFFIXES)
    low, high = SENSITIVITY_RANGE
    with gr.Blocks(title="AnomalyGPT inspection", analytics_enabled=False, delete_cache=CACHE_CLEANUP) as blocks:
        session = gr.State(Session(), delete_callback=Session.close)
        gr.Markdown(
            "## AnomalyGPT inspection\nUpload a query image and a few good images of the same product, press "
            "**Inspect**, then ask about the result. The detector decides; the assistant explains its decision."
        )
        with gr.Row():
            with gr.Column(scale=4):
                query = gr.File(label="Query image", file_types=file_types, elem_id="query")
                gallery = gr.Gallery(
                    label="Good references (click one to select it)",
                    columns=4,
                    height=200,
                    allow_preview=False,
                    interactive=False,
                    format="png",
                    elem_id="references",
                )
                with gr.Row():
                    add = gr.UploadButton(
                        "Add good references", file_count="multiple", file_types=file_types, elem_id="add-references"
                    )
                    remove = gr.Button("Remove selected", elem_id="remove-reference")
                    clear_references = gr.Button("Remove all", elem_id="clear-references")
                product = gr.Textbox(label="Product name (optional)", placeholder="e.g. screw", elem_id="product")
                inspect_button = gr.Button("Inspect", variant="primary", elem_id="inspect")
                sensitivity = gr.Slider(
                    low,
                    high,
                    value=0.0,
                    step=SENSITIVITY_STEP,
                    label="Sensitivity",
                    info="In normal spreads: > 0 lowers the threshold (more alarms), < 0 raises it.",
                    elem_id="sensitivity",
                )
                status = gr.Markdown(welcome(app.profile), elem_id="status")
            with gr.Column(scale=5):
                chatbot = gr.Chatbot(
                    label="Assistant", height=480, feedback_options=None, buttons=["copy", "copy_all"], elem_id="chat"
                )
                question = gr.Textbox(
                    show_label=False, placeholder="Ask, e.g. 'Is there a defect?' and press Enter", elem_id="question"
                )
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary", elem_id="ask")
                    clear_chat = gr.Button("Clear chat", elem_id="clear-chat")
                    reset = gr.Button("Reset all", variant="stop", elem_id="reset")
            with gr.Column(scale=5):
                badge = gr.HTML(badge_html(None), elem_id="verdict")
                overlay = gr.Image(
                    label="Heat map and regions",
                    interactive=False,
                    format="png",
                    buttons=["download", "fullscreen"],  # no "share": it uploads to a hosting service
                    elem_id="overlay",
                )
                table = gr.Dataframe(
                    region_table(None),
                    label="Regions",
                    interactive=False,
                    wrap=True,  # long descriptor text wraps instead of being cut at the column edge
                    max_height=2000,  # every region shows; the page scrolls, not a small box inside it
                    column_widths=["8%", "20%", "22%", "32%", "18%"],
                    elem_id="regions",
                )
                evidence = gr.Gallery(
                    label="Evidence: each region (left) beside its best-matching good reference (right)",
                    columns=1,
                    height="auto",
                    object_fit="contain",  # the whole pair, never cropped to the tile
                    allow_preview=True,
                    interactive=False,
                    format="png",
                    elem_id="evidence",
                )
                with gr.Row():
                    json_file = gr.DownloadButton(
                        "Download inspection (JSON)", interactive=False, elem_id="download-json"
                    )
                    png_file = gr.DownloadButton("Download overlay (PNG)", interactive=False, elem_id="download-png")
        parts = {
            "session": session,
            "status": status,
            "overlay": overlay,
            "table": table,
            "badge": badge,
            "json_file": json_file,
            "png_file": png_file,
            "evidence": evidence,
            "chat": chatbot,
            "gallery": gallery,
            "question": question,
        }  # one per Screen field

        def on(trigger: Any, handler: Callable[..., Any], inputs: list[Any], fields: Sequence[str], **kw: Any) -> Any:
            return trigger(projected(handler, fields), inputs, [parts[name] for name in fields], **kw)

        shown = ("session", "status", *RESULTS, "chat")
        on(query.upload, app.load_query, [session, query], shown)
        on(query.clear, app.load_query, [session, query], shown)
        on(add.upload, app.add_references, [session, add], (*shown, "gallery"))
        gallery.select(app.select_reference, [session], [session])
        on(remove.click, app.remove_reference, [session], (*shown, "gallery"))
        on(clear_references.click, app.clear_references, [session], (*shown, "gallery"))
        on(inspect_button.click, app.inspect, [session, product, sensitivity], shown)
        on(sensitivity.change, app.set_sensitivity, [session, sensitivity], shown, trigger_mode="always_last")
        asked = on(
            functools.partial(gr.on, [question.submit, ask.click]),
            app.ask,
            [session, question, product, sensitivity],
            ("chat", "question", "status"),
            show_progress="hidden",  # the streaming text shows progress; a timer redrawn meanwhile costs CPU
        )
        on(asked.then, app.show_results, [session], RESULTS, show_progress="hidden")  # usually changes nothing
        on(clear_chat.click, app.clear_chat, [session], ("session", "status", "chat"))
        on(chatbot.clear, app.clear_chat, [session], ("session", "status", "chat"))
        on(reset.click, app.reset, [session], Screen._fields).then(
            lambda: (None, "", 0.0), None, [query, product, sensitivity], queue=False
        )
    return blocks


def projected(handler: Callable[..., Any], fields: Sequence[str]) -> Callable[..., Any]:
    """The handler with its Screens cut down to `fields`: each event sends only the outputs it can change."""

    def cut(screen: Screen) -> Any:
        values = tuple(getattr(screen, name) for name in fields)
        return values[0] if len(values) == 1 else values

    if inspect.isgeneratorfunction(handler):

        @functools.wraps(handler)
        def stream(*args: Any) -> Iterator[Any]:
            for screen in handler(*args):
                yield cut(screen)

        return stream

    @functools.wraps(handler)
    def call(*args: Any) -> Any:
        return cut(handler(*args))

    return call


def serve(blocks: gr.Blocks, host: str, port: int, *, block: bool = True) -> None:
    """Start the server; with block=False it runs in a background thread until blocks.close()."""
    blocks.queue(default_concurrency_limit=1)  # one job at a time per event: the CPU models are the bottleneck
    blocks.launch(
        server_name=host,
        server_port=port,
        max_file_size=f"{MAX_UPLOAD_MB}mb",
        show_error=False,
        share=False,
        inbrowser=False,
        quiet=True,
        ssr_mode=False,
        prevent_thread_lock=not block,
        theme=gr.themes.Default(font=THEME_FONTS),
        css=CSS,
        footer_links=["api", "settings"],
        run_history=False,  # would keep every upload and answer in the browser, offering to sync them elsewhere
        enable_monitoring=False,  # a /monitoring page of everyone's traffic
        mcp_server=False,
        pwa=False,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset", default=None, help="preset name or JSON path (default: 'default', or the profile's own)"
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default: 127.0.0.1, this machine)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on (default: 7860)")
    parser.add_argument(
        "--answerer",
        choices=ANSWERER_CHOICES,
        default="auto",
        help="who answers: the LLM assistant, grounded templates, or auto (the assistant when the preset names "
        "trained assistant weights and it loads)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="a product profile from 'anomalygpt fit': the references of every tab that uploads none",
    )
    add_device_option(parser)
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    if not 1 <= args.port <= 65535:
        return fail(f"--port: must be from 1 to 65535, got {args.port}")
    if args.host not in LOCAL_HOSTS:
        print(
            f"{PROG}: warning: --host {args.host} lets other machines reach this app; it has no login, so anyone who "
            "can reach it can upload images and use this machine's models",
            file=sys.stderr,
        )
    try:
        app = loaded_app(args)
    except USER_ERRORS as error:  # ConfigError, ProfileError, AnswererError; WeightsError is an OSError
        return fail(str(error))
    with private_upload_folder():  # uploads and gradio's cache: swept every minute, removed when this returns
        blocks = build_blocks(app)
        try:
            serve(blocks, args.host, args.port, block=False)
        except OSError as error:  # the port is taken, or the address is not this machine's
            reason = one_line(str(error)).split(". ")[0]  # gradio goes on about its own environment variables
            return fail(f"--host/--port: cannot listen on {args.host}:{args.port} ({reason}); is the port taken?")
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(f"Serving on http://{shown}:{args.port} with {type(app.answerer).__name__} (Ctrl+C to stop)", flush=True)
        with stop_on_sigterm():
            blocks.block_thread()  # until Ctrl+C (or SIGTERM), which closes the server
    return 0


def loaded_app(args: argparse.Namespace) -> WebApp:
    """The app's shared models: --preset, else the profile's own preset, else the default; the profile's references."""
    preset = with_device(chosen_preset(args.preset, args.profile), args.device)
    print(f"Loading preset {preset.name!r} ...", flush=True)
    inspector = build_inspector(preset)
    profile = inspector.load_profile(args.profile) if args.profile is not None else None
    evidence = profile_evidence(profile, args.profile) if profile is not None else None
    return WebApp(inspector, load_answerer(preset, args.answerer, inspector), preset.name, profile, evidence)


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM stops the server as Ctrl+C does, so that its uploads are removed too."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def fail(problem: str) -> int:
    print(f"{PROG}: error: {one_line(problem)}", file=sys.stderr)
    return 2
