"""The HTTP layer of `anomalygpt serve` (FastAPI): parse, limit, authenticate, queue, answer.

Every refusal is a 4xx whose body is one line of JSON, {"error": "..."}; no route reads a server path the client
names (profiles and inspections are found by ids this service issued).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException

from anomalygpt.calibration import MAX_FALSE_ALARM_RATE
from anomalygpt.config import DEFAULT_PRESET, Preset
from anomalygpt.inspection import Inspector, build_inspector
from anomalygpt.io import ImageError, safe_text
from anomalygpt.profile import ProfileError
from anomalygpt.references import InspectionError
from anomalygpt.service.audit import (
    BLOB_SUFFIXES,
    AuditStore,
    InspectionFilter,
    default_database,
    inspection_json,
    key_digest,
    parse_time,
    profile_json,
)
from anomalygpt.service.batching import MicroBatcher
from anomalygpt.service.chat import ChatService, ImageMissing, build_answerer
from anomalygpt.service.core import (
    ID_PATTERN,
    InspectionService,
    InspectRequest,
    UnknownProfile,
    Upload,
    inference_batch_size,
)
from anomalygpt.service.metrics import Metrics

SENSITIVITY_RANGE = (-5.0, 5.0)  # as the CLI's --sensitivity, in normal spreads
VERDICTS = ("normal", "anomalous")


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 64 * 1024 * 1024  # a whole request, checked while it streams in
    body_timeout_s: float = 30.0  # a whole request body must arrive within this time of its first read
    max_profile_images: int = 256  # good images per POST /v1/profiles
    max_batch_images: int = 32  # images per POST /v1/inspect/batch
    max_page: int = 1000  # GET /v1/inspections?limit=
    questions_per_minute: int = 30  # POST /v1/chat per API key and clock minute, all replicas together
    max_question_chars: int = 500  # as the assistant's own default limit


ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]
]


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": safe_text(" ".join(str(message).split()))}, status_code=status, headers=headers)


class RequestError(Exception):
    """A refusal with its HTTP status; the message is one line."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class RateLimited(RequestError):
    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(429, message)
        self.retry_after_s = retry_after_s


def read_api_keys(path: str | Path) -> dict[str, str]:
    """{sha256 of key: name} from `name:key` lines (blank lines and # comments skipped); ValueError on a bad line."""
    keys: dict[str, str] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        name, sep, key = text.partition(":")
        if not sep or not name.strip() or len(key.strip()) < 8:
            raise ValueError(f"{path}:{number}: expected 'name:key' with a key of at least 8 characters")
        keys[key_digest(key.strip())] = name.strip()
    if not keys:
        raise ValueError(f"{path}: no 'name:key' line; an empty key file would leave the service open")
    return keys


class KeyRing:
    """The API keys a request may carry: those of --api-key-file and those in the database (`anomalygpt serve keys
    create`), looked up on every request, so a key created or revoked on any replica counts from the next one."""

    def __init__(self, file_keys: dict[str, str] | None, audit: AuditStore) -> None:
        self.file_keys = dict(file_keys or {})  # {sha256 of key: name}
        self.audit = audit
        self.guarded = bool(self.file_keys)  # once true it stays: keys are revoked, never deleted

    def required(self) -> bool:
        """Whether requests need a key; not while no key was ever created (the service is open)."""
        self.guarded = self.guarded or self.audit.has_keys()
        return self.guarded

    def name(self, token: str) -> str | None:
        """The name of the valid key `token`; None for a wrong or revoked one."""
        digest = key_digest(token)
        named = next((n for d, n in self.file_keys.items() if hmac.compare_digest(d, digest)), None)
        return named if named is not None else self.audit.use_key(digest)

    def refusal(self, token: str) -> str:
        """Why a request with `token` is refused: a revoked key is told so (its holder cannot fix it by retyping)."""
        if token and self.audit.key_revoked(key_digest(token)):
            return "this API key was revoked; ask for a new one ('anomalygpt serve keys create')"
        return "missing or wrong API key (send 'Authorization: Bearer <key>')"


class QuestionLimiter:
    """At most `per_minute` questions per key name in each clock minute, counted in the audit database, so that
    replicas sharing it share the limit (None, the keyless service, is one name)."""

    def __init__(self, per_minute: int, audit: AuditStore, clock: Callable[[], float] = time.time) -> None:
        self.per_minute = per_minute
        self.audit = audit
        self.clock = clock  # Unix time; replicas' clocks are assumed in step (NTP)

    def take(self, key_name: str | None) -> None:
        """Count one question, or RateLimited (429) saying when the next one is allowed: when the minute ends."""
        now = self.clock()
        if self.audit.count_question(key_name or "", int(now // 60)) > self.per_minute:
            wait = math.ceil(60.0 - now % 60.0)
            raise RateLimited(f"over {self.per_minute} questions per minute for this key; retry in {wait} s", wait)


class BodyLimit:
    """413 for a request body over the limit: by its Content-Length at once, else while it streams in; 408 for a
    body not complete within `timeout_s` of the first read (a client that trickles its body holds a connection)."""

    def __init__(self, app: ASGIApp, limit: int, timeout_s: float) -> None:
        self.app = app
        self.limit = limit
        self.timeout_s = timeout_s

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await error_response(413, f"request body over the limit of {self.limit:,} bytes")(scope, receive, send)
            return
        received = 0
        deadline: float | None = None
        complete = False
        loop = asyncio.get_running_loop()

        async def limited() -> Any:
            nonlocal received, deadline, complete
            if complete:  # after the body, receive() only waits for a disconnect (streamed answers): no deadline
                return await receive()
            deadline = deadline if deadline is not None else loop.time() + self.timeout_s
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError as error:
                raise HTTPException(408, f"request body not complete within {self.timeout_s:g} s") from error
            received += len(message.get("body", b""))
            complete = message.get("type") != "http.request" or not message.get("more_body", False)
            if received > self.limit:
                raise HTTPException(413, f"request body over the limit of {self.limit:,} bytes")
            return message

        await self.app(scope, limited, send)


class Timing:
    """Counts every answered request by route template and status, with its latency."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def record_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            self.metrics.observe_request(scope["method"], template, status, time.perf_counter() - started)


def create_app(
    profiles_dir: str | Path,
    db_url: str | None = None,
    preset: str | Preset = DEFAULT_PRESET,
    api_keys: dict[str, str] | None = None,
    batch_wait_ms: float = 5.0,
    limits: Limits | None = None,
    inspector: Inspector | None = None,
    answerer: str = "grounded",
    inference_batch: int | None = None,
) -> FastAPI:
    """The service app: the Inspector (and the chat answerer) built once here, the database opened and migrated.
    `db_url` defaults to SQLite (WAL) in profiles_dir/audit.db; `api_keys` maps sha256(key) -> name
    (read_api_keys) and adds to the keys in the database; `inspector` lets a caller share one already built;
    `answerer` is "grounded" (templates) or "llm" (the preset's assistant), see service.chat; `inference_batch`
    is the images per backbone pass (None: core.inference_batch_size)."""
    folder = Path(profiles_dir)
    folder.mkdir(parents=True, exist_ok=True)
    limits = limits or Limits()
    audit = AuditStore(db_url or default_database(folder), folder / "blobs")
    inspector = inspector or build_inspector(preset)
    service = InspectionService(inspector, folder, audit, inference_batch or inference_batch_size(inspector))
    chats = ChatService(service, build_answerer(answerer, service.inspector), answerer)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anomalygpt-inference")
    batcher = MicroBatcher(service.run_batch, batch_wait_ms / 1000.0, executor)
    metrics = Metrics(lambda: batcher.depth)
    batcher.on_batch = metrics.observe_batch

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="anomalygpt", summary="Few-shot industrial inspection service", lifespan=lifespan)
    app.state.service, app.state.metrics, app.state.batcher, app.state.chats = service, metrics, batcher, chats
    install_error_handlers(app)
    keyring = app.state.keyring = KeyRing(api_keys, audit)
    app.include_router(v1_router(service, batcher, metrics, executor, limits, keyring))
    limiter = app.state.limiter = QuestionLimiter(limits.questions_per_minute, audit)
    app.include_router(chat_router(chats, limits, keyring, limiter, metrics))

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "preset": service.inspector.preset.name, "queue_depth": batcher.depth}

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(key_check(keyring, metrics))])
    def metrics_text() -> PlainTextResponse:
        return PlainTextResponse(metrics.text(), media_type="text/plain; version=0.0.4")

    app.add_middleware(BodyLimit, limit=limits.max_body_bytes, timeout_s=limits.body_timeout_s)
    app.add_middleware(Timing, metrics=metrics)
    return app


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as {"error": one line}: HTTP errors keep their status, validation errors are 422."""

    async def http_error(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, HTTPException)
        return error_response(error.status_code, str(error.detail), getattr(error, "headers", None))

    async def validation_error(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        problems = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in error.errors()]
        return error_response(422, "; ".join(problems) or "invalid request")

    async def refused(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestError)
        headers = {"Retry-After": str(error.retry_after_s)} if isinstance(error, RateLimited) else None
        return error_response(error.status, str(error), headers)

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(RequestError, refused)


def status_of(error: BaseException) -> int:
    """The status a worker-side error answers with."""
    if isinstance(error, UnknownProfile):
        return 404
    if isinstance(error, ProfileError):
        return 409  # the profile exists but its file cannot serve
    if isinstance(error, InspectionError):
        return 422  # a well-formed image the profile cannot inspect (another size, blank references)
    if isinstance(error, ImageError):
        return 400
    return 400 if isinstance(error, ValueError) else 500


async def in_worker(work: Awaitable[Any]) -> Any:
    """Await worker-side work, turning its input errors into RequestError (never a 500 for bad input)."""
    try:
        return await work
    except (ValueError, UnknownProfile) as error:  # anything else is the server's fault: a 500, logged
        raise RequestError(status_of(error), str(error)) from error


def key_check(keyring: KeyRing, metrics: Metrics) -> Callable[[Request], str | None]:
    """The dependency every route but /healthz takes: the key's name (None when the service has no keys); 401
    for a missing, wrong or revoked key, counted."""

    def authenticate(request: Request) -> str | None:
        if not keyring.required():
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        name = keyring.name(token) if token else None
        if name is None:
            metrics.observe_auth_failure()
            raise HTTPException(401, keyring.refusal(token), {"WWW-Authenticate": "Bearer"})
        return name

    return authenticate


def v1_router(
    service: InspectionService,
    batcher: MicroBatcher,
    metrics: Metrics,
    executor: ThreadPoolExecutor,
    limits: Limits,
    keyring: KeyRing,
) -> APIRouter:
    authenticate = key_check(keyring, metrics)
    router = APIRouter(prefix="/v1")

    @router.post("/profiles", status_code=201)
    async def create_profile(request: Request, key: str | None = Depends(authenticate)) -> JSONResponse:
        form = await read_form(request, limits.max_profile_images)
        name = text_field(form, "name", required=True)
        assert name is not None
        rate = false_alarm_rate_field(form)
        uploads = await files(form, "images", limits.max_profile_images)
        loop = asyncio.get_running_loop()
        created = await in_worker(loop.run_in_executor(executor, service.create_profile, name, uploads, key, rate))
        return JSONResponse(created, status_code=201)

    @router.get("/profiles")
    def list_profiles(_: str | None = Depends(authenticate)) -> dict[str, Any]:
        items = [profile_json(row) for row in service.audit.profiles()]
        return {"items": items, "total": len(items)}

    @router.get("/profiles/{profile_id}")
    def get_profile(profile_id: str, _: str | None = Depends(authenticate)) -> dict[str, Any]:
        try:
            return profile_json(service.profile_row(profile_id))
        except UnknownProfile as error:
            raise RequestError(404, str(error)) from error

    async def inspect_images(request: Request, key: str | None, field: str, max_images: int) -> tuple[str, list[Any]]:
        started = time.perf_counter()
        form = await read_form(request, max_images)
        profile = text_field(form, "profile", required=True)
        assert profile is not None
        sensitivity = sensitivity_field(form)
        uploads = await files(form, field, max_images)
        job = InspectRequest(uploads, sensitivity, key, started)
        answer = await in_worker(batcher.submit(profile, job, len(uploads)))
        for item in answer:
            metrics.observe_verdict(item["verdict"])
        return profile, answer

    @router.post("/inspect", status_code=201)
    async def inspect(request: Request, key: str | None = Depends(authenticate)) -> JSONResponse:
        _, answer = await inspect_images(request, key, "image", 1)
        return JSONResponse(answer[0], status_code=201)

    @router.post("/inspect/batch", status_code=201)
    async def inspect_batch(request: Request, key: str | None = Depends(authenticate)) -> JSONResponse:
        profile, answer = await inspect_images(request, key, "images", limits.max_batch_images)
        return JSONResponse({"profile": profile, "items": answer, "total": len(answer)}, status_code=201)

    @router.get("/inspections")
    def list_inspections(
        profile: str | None = None,
        since: str | None = None,
        verdict: str | None = None,
        limit: int = 50,
        offset: int = 0,
        _: str | None = Depends(authenticate),
    ) -> dict[str, Any]:
        where = inspection_filter(profile, since, verdict, limit, offset, limits.max_page)
        rows, total = service.audit.inspections(where)
        return {"items": [inspection_json(row) for row in rows], "total": total, "limit": limit, "offset": offset}

    def found(inspection_id: str) -> Any:
        row = service.audit.inspection(inspection_id) if ID_PATTERN.fullmatch(inspection_id) else None
        if row is None:
            raise RequestError(404, f"inspection {inspection_id!r}: no such inspection")
        return row

    @router.get("/inspections/{inspection_id}")
    def get_inspection(inspection_id: str, _: str | None = Depends(authenticate)) -> dict[str, Any]:
        return inspection_json(found(inspection_id))

    @router.get("/inspections/{inspection_id}/overlay")
    def get_overlay(inspection_id: str, _: str | None = Depends(authenticate)) -> FileResponse:
        row = found(inspection_id)
        path = service.audit.blobs.path(row.overlay_sha256, BLOB_SUFFIXES["overlay"])
        return FileResponse(path, media_type="image/png", filename=f"{row.id}-overlay.png")

    @router.get("/inspections/{inspection_id}/map")
    def get_map(inspection_id: str, _: str | None = Depends(authenticate)) -> FileResponse:
        row = found(inspection_id)
        path = service.audit.blobs.path(row.map_sha256, BLOB_SUFFIXES["map"])
        return FileResponse(path, media_type="application/octet-stream", filename=f"{row.id}-map.npy")

    return router


def chat_router(
    chats: ChatService, limits: Limits, keyring: KeyRing, limiter: QuestionLimiter, metrics: Metrics
) -> APIRouter:
    """POST /v1/chat: {"inspection": id, "question": text} -> server-sent events: `piece` events with the checked
    answer's text, then `done` with the recorded answer (its audit id), or `error`."""
    authenticate = key_check(keyring, metrics)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anomalygpt-chat")  # apart from inspections
    router = APIRouter(prefix="/v1")

    @router.post("/chat", response_class=StreamingResponse)
    async def chat(request: Request, key: str | None = Depends(authenticate)) -> StreamingResponse:
        inspection_id, question = await chat_fields(request, limits.max_question_chars)
        row = chats.service.audit.inspection(inspection_id) if ID_PATTERN.fullmatch(inspection_id) else None
        if row is None:
            raise RequestError(404, f"inspection {inspection_id!r}: no such inspection")
        await asyncio.to_thread(limiter.take, key)  # a database write: off the event loop
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def put(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        def work() -> None:  # runs to the end and records the answer even when the client has gone
            try:
                put("done", chats.answer(row, question, key, lambda piece: put("piece", piece)))
            except Exception as error:
                put("error", error)

        loop.run_in_executor(executor, work)
        first = await events.get()
        kind, value = first
        if kind == "error" and isinstance(value, (ImageMissing, ValueError)):  # QuestionError is a ValueError
            raise RequestError(409 if isinstance(value, ImageMissing) else 422, str(value)) from value
        if kind == "error":
            raise value
        return StreamingResponse(
            sse_events(first, events), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
        )

    return router


async def chat_fields(request: Request, max_chars: int) -> tuple[str, str]:
    """(inspection id, question) from a JSON object with exactly those two fields."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise RequestError(415, f"expected application/json, got {content_type or 'no content type'}")
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as error:
        raise RequestError(400, f"malformed JSON: {error}") from error
    if not isinstance(body, dict):
        raise RequestError(422, "expected a JSON object with 'inspection' and 'question'")
    unknown = sorted(set(body) - {"inspection", "question"})
    if unknown:
        raise RequestError(422, f"unknown field {unknown[0]!r}; expected 'inspection' and 'question'")
    for name in ("inspection", "question"):
        if not isinstance(body.get(name), str) or not body[name].strip():
            raise RequestError(422, f"field {name!r}: a non-empty string is required")
    if len(body["question"]) > max_chars:
        raise RequestError(422, f"field 'question': over {max_chars} characters")
    return body["inspection"], body["question"].strip()


async def sse_events(first: tuple[str, Any], events: asyncio.Queue[tuple[str, Any]]) -> AsyncIterator[bytes]:
    """The answer as server-sent events, from its first message on."""
    kind, value = first
    while True:
        if kind == "piece":
            yield sse("piece", {"text": value})
        elif kind == "done":
            yield sse("done", value)
            return
        else:
            yield sse("error", {"error": safe_text(" ".join(str(value).split()))})
            return
        kind, value = await events.get()


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, allow_nan=False)}\n\n".encode()


async def read_form(request: Request, max_files: int) -> FormData:
    """The multipart form (415 for any other content type; starlette answers 400 for a malformed body)."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise RequestError(415, f"expected multipart/form-data, got {content_type or 'no content type'}")
    try:
        return await request.form(max_files=max_files, max_fields=16)
    except HTTPException as error:
        if "too many files" in str(error.detail).lower():  # starlette's parser stopped at the limit: one more file
            raise RequestError(413, f"over {max_files} files in one request") from error
        raise


def text_field(form: FormData, name: str, required: bool) -> str | None:
    value = form.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise RequestError(400, f"missing form field {name!r}")
        return None
    if not isinstance(value, str):
        raise RequestError(400, f"form field {name!r} must be text, not a file")
    if len(value) > 200:
        raise RequestError(400, f"form field {name!r} is over 200 characters")
    return value.strip()


def sensitivity_field(form: FormData) -> float:
    text = text_field(form, "sensitivity", required=False)
    if text is None:
        return 0.0
    try:
        value = float(text)
    except ValueError as error:
        raise RequestError(422, f"sensitivity: {text!r} is not a number") from error
    low, high = SENSITIVITY_RANGE
    if not math.isfinite(value) or not low <= value <= high:
        raise RequestError(422, f"sensitivity: {text!r} is outside [{low:g}, {high:g}] normal spreads")
    return value


def false_alarm_rate_field(form: FormData) -> float | None:
    """The profile's false-alarm rate (as fit's --false-alarm-rate); None: the preset's."""
    text = text_field(form, "false_alarm_rate", required=False)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError as error:
        raise RequestError(422, f"false_alarm_rate: {text!r} is not a number") from error
    if not 0 < value <= MAX_FALSE_ALARM_RATE:  # NaN fails it too
        raise RequestError(422, f"false_alarm_rate: {text!r} must be above 0 and at most {MAX_FALSE_ALARM_RATE:g}")
    return value


async def files(form: FormData, field: str, max_files: int) -> list[Upload]:
    """The uploads of one field, read into memory (the body limit bounds them)."""
    values = form.getlist(field)
    if not values:
        raise RequestError(400, f"missing file field {field!r}")
    if len(values) > max_files:
        raise RequestError(413, f"{len(values)} files in {field!r}; at most {max_files} per request")
    uploads = []
    for index, value in enumerate(values):
        if not isinstance(value, UploadFile):
            raise RequestError(400, f"form field {field!r} must be a file upload")
        uploads.append(Upload(value.filename or f"{field} {index + 1}", await value.read()))
    return uploads


def inspection_filter(
    profile: str | None, since: str | None, verdict: str | None, limit: int, offset: int, max_page: int
) -> InspectionFilter:
    if verdict is not None and verdict not in VERDICTS:
        raise RequestError(422, f"verdict: {verdict!r} is not one of {', '.join(VERDICTS)}")
    if not 1 <= limit <= max_page:
        raise RequestError(422, f"limit: {limit} is outside 1 to {max_page}")
    if offset < 0:
        raise RequestError(422, f"offset: {offset} is negative")
    return InspectionFilter(profile, parse_since(since), verdict, limit, offset)


def parse_since(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        return parse_time(text, "since")
    except ValueError as error:
        raise RequestError(422, str(error)) from error
