"""Bad requests against a real `anomalygpt serve` (issue 21): every kind gets the right 4xx with a one-line JSON
error, never a 500, and leaves nothing behind (no audit row, no blob, no temp file, no open file descriptor).

One server over a fresh folder (SQLite audit), with an API key made by `anomalygpt serve keys create`, at most
5 chat questions per minute, its TMPDIR a folder of its own (where starlette's multipart parser would spill
uploads). A profile from 4 good odd-numbered (dev half) ELPV mono cells. Controls (requests that must succeed:
a plain inspection, a 16-bit unsigned PNG, a file name that looks like a path, 5 chat questions) run beside the
bad requests, so "nothing behind" is checked against exactly what the controls added.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_service_bad.py --out runs/bench_service_bad.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from bench_service import ANOMALYGPT, Server, bench_images, server_errors, temp_files
from PIL import Image

from anomalygpt.client import Client
from anomalygpt.io import write_json_atomic

BODY_TIMEOUT_S = 30.0  # the service's Limits.body_timeout_s
QUESTIONS_PER_MINUTE = 5


Sender = Callable[[], tuple[int, bytes]]  # sends one request: (status, body)


@dataclass(frozen=True)
class Case:
    kind: str
    expected: int
    send: Callable[[], tuple[int, bytes]]  # (status, body)
    control: bool = False  # must succeed: it adds rows and files on purpose


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def encoded(image: Image.Image, form: str, tiffinfo: dict[int, int] | None = None) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=form, **({"tiffinfo": tiffinfo} if tiffinfo else {}))
    return buffer.getvalue()


def multipart(data: dict[str, str], files: list[Any]) -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data form: text fields, then (field, (file name, bytes)) files."""
    boundary = "bench-boundary-7f3a"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in data.items()
    ]
    for field, (name, content) in files:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
        parts.append(head.encode() + b"Content-Type: application/octet-stream\r\n\r\n" + content + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def raw_request(port: int, data: bytes, timeout: float = BODY_TIMEOUT_S + 15) -> tuple[int, bytes]:
    """Send bytes as they are (no client library fixing them up); the status and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < content_length(answer):
            chunk = connection.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]) if head else 0, body


def content_length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 1 << 30  # no length: read until the server closes


class Bench:
    """The server, its key and profile, and the requests of the table."""

    def __init__(self, server: Server, key: str, profile_id: str, good: bytes, other_size: bytes) -> None:
        self.server, self.key, self.pid = server, key, profile_id
        self.good, self.other_size = good, other_size
        self.http = httpx.Client(base_url=server.url, timeout=120, headers={"Authorization": f"Bearer {key}"})
        self.inspection_id = ""

    def post(self, url: str, **kwargs: Any) -> tuple[int, bytes]:
        response = self.http.post(url, **kwargs)
        return response.status_code, response.content

    def get(self, url: str, **kwargs: Any) -> tuple[int, bytes]:
        response = self.http.get(url, **kwargs)
        return response.status_code, response.content

    def form(self, url: str, data: dict[str, str] | None = None, files: list[Any] | None = None) -> Sender:
        """A multipart form, also when it has no file (httpx would send text fields url-encoded)."""
        return self.typed(url, *multipart(data or {}, files or []))

    def typed(self, url: str, content: Any, content_type: str | None) -> Sender:
        headers = {"content-type": content_type} if content_type else {}
        return lambda: self.post(url, content=content, headers=headers)

    def ask(self, body: Any) -> Sender:
        """POST /v1/chat with a JSON body; INSPECTION in it is replaced by the bench's inspection id."""
        return lambda: self.post(
            "/v1/chat", json=json.loads(json.dumps(body).replace("INSPECTION", self.inspection_id))
        )

    def inspect(self, name: str, data: bytes, **fields: str) -> Callable[[], tuple[int, bytes]]:
        return lambda: self.post("/v1/inspect", data={"profile": self.pid, **fields}, files=[("image", (name, data))])

    def raw(self, head: str, body: bytes = b"") -> Callable[[], tuple[int, bytes]]:
        text = head.replace("KEY", self.key).replace("\n", "\r\n") + "\r\n\r\n"
        return lambda: raw_request(self.server.port, text.encode() + body)


def image_cases(b: Bench) -> list[Case]:
    corrupt = bytearray(b.good)
    corrupt[len(corrupt) // 2] ^= 0xFF  # a flipped bit inside the compressed pixels: the CRC no longer matches
    signed16 = Image.fromarray(np.full((300, 300), 700, dtype=np.uint16))  # saved with SampleFormat 2 (signed)
    int32 = Image.fromarray(np.full((300, 300), 70_000, dtype=np.int32), mode="I")
    unsigned16 = Image.fromarray(np.asarray(Image.open(io.BytesIO(b.good)).convert("L")).astype(np.uint16) * 257)
    bomb = encoded(Image.new("1", (8000, 6000)), "PNG")
    return [
        Case("bad image bytes (text)", 400, b.inspect("a.png", b"this is not an image")),
        Case("empty file", 400, b.inspect("a.png", b"")),
        Case("truncated PNG", 400, b.inspect("a.png", b.good[: len(b.good) // 2])),
        Case("corrupt PNG (flipped bit in the pixels)", 400, b.inspect("a.png", bytes(corrupt))),
        Case("huge pixel count (6 kB PNG declaring 48 MP)", 400, b.inspect("bomb.png", bomb)),
        Case("16-bit signed TIFF", 400, b.inspect("s.tif", encoded(signed16, "TIFF", {339: 2}))),
        Case("32-bit integer TIFF", 400, b.inspect("i.tif", encoded(int32, "TIFF"))),
        Case("4x4 px image", 400, b.inspect("tiny.png", png(np.zeros((4, 4), dtype=np.uint8)))),
        Case("HTML named .png", 400, b.inspect("x.png", b"<html><body>hi</body></html>")),
        Case("image of another size than the profile's", 422, b.inspect("small.png", b.other_size)),
        Case(
            "control: 16-bit unsigned PNG of the profile's size",
            201,
            b.inspect("u16.png", encoded(unsigned16, "PNG")),
            True,
        ),
        Case("control: file name that looks like a path", 201, b.inspect("../../../tmp/owned.png", b.good), True),
    ]


def form_cases(b: Bench) -> list[Case]:
    good = [("image", ("g.png", b.good))]
    multipart = "multipart/form-data; boundary=x"
    corrupt = [("images", ("b.png", b"\x89PNG\r\n\x1a\nxx"))]
    two_sizes = [("images", ("g.png", b.good)), ("images", ("s.png", b.other_size))]
    return [
        Case("unknown profile id", 404, b.form("/v1/inspect", {"profile": "0" * 16}, good)),
        Case("profile id as a path", 404, b.form("/v1/inspect", {"profile": "../../etc/passwd"}, good)),
        Case("profile id as an absolute path", 404, b.form("/v1/inspect", {"profile": "/etc/passwd"}, good)),
        Case("missing image field", 400, b.form("/v1/inspect", {"profile": b.pid})),
        Case("missing profile field", 400, b.form("/v1/inspect", None, good)),
        Case(
            "wrong field name (file, not image)", 400, b.form("/v1/inspect", {"profile": b.pid}, [("file", good[0][1])])
        ),
        Case("image sent as a text field", 400, b.form("/v1/inspect", {"profile": b.pid, "image": "abc"})),
        Case("profile sent as a file", 400, b.form("/v1/inspect", None, [("profile", ("p", b.pid.encode()))])),
        Case("two image files to /v1/inspect", 413, b.form("/v1/inspect", {"profile": b.pid}, good + good)),
        Case("profile field of 300 characters", 400, b.form("/v1/inspect", {"profile": "a" * 300}, good)),
        Case("sensitivity not a number", 422, b.inspect("g.png", b.good, sensitivity="high")),
        Case("sensitivity out of range", 422, b.inspect("g.png", b.good, sensitivity="9")),
        Case("sensitivity NaN", 422, b.inspect("g.png", b.good, sensitivity="nan")),
        Case("JSON body to a form route", 415, b.typed("/v1/inspect", b'{"profile": "x"}', "application/json")),
        Case("text/plain body", 415, b.typed("/v1/inspect", b"hello", "text/plain")),
        Case("no content type", 415, b.typed("/v1/inspect", b"raw", None)),
        Case("malformed multipart (no closing boundary)", 400, b.typed("/v1/inspect", b"--x\r\nbroken", multipart)),
        Case("multipart without a boundary", 400, b.typed("/v1/inspect", b"--x\r\n", "multipart/form-data")),
        Case("profile without images", 400, b.form("/v1/profiles", {"name": "p"})),
        Case("profile without a name", 400, b.form("/v1/profiles", None, [("images", good[0][1])])),
        Case("profile with a corrupt image", 400, b.form("/v1/profiles", {"name": "p"}, corrupt)),
        Case("profile from images of two sizes", 422, b.form("/v1/profiles", {"name": "p"}, two_sizes)),
        Case("control: plain inspection", 201, b.inspect("g.png", b.good), True),
    ]


def limit_cases(b: Bench) -> list[Case]:
    head = "POST /v1/inspect HTTP/1.1\nHost: x\nAuthorization: Bearer KEY\nContent-Type: multipart/form-data; "
    head += "boundary=x"
    part = b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'

    def chunked() -> Iterator[bytes]:
        yield part
        for _ in range(70):
            yield b"\0" * (1 << 20)  # 70 MB, no Content-Length: counted while it streams

    many = [("images", (f"{i}.png", b.good)) for i in range(33)]
    return [
        Case("oversized batch (33 images, limit 32)", 413, b.form("/v1/inspect/batch", {"profile": b.pid}, many)),
        Case("oversized body (65 MB with Content-Length)", 413, b.inspect("big.png", b"\0" * (65 << 20))),
        Case(
            "oversized body streamed without Content-Length",
            413,
            lambda: b.post(
                "/v1/inspect", content=chunked(), headers={"content-type": "multipart/form-data; boundary=x"}
            ),
        ),
        Case(
            "slow-loris: 40 of 5,000 body bytes, then silence", 408, b.raw(f"{head}\nContent-Length: 5000", part[:40])
        ),
        Case("Content-Length not a number", 400, b.raw(f"{head}\nContent-Length: ten", b"0123456789")),
        Case(
            "Content-Length and chunked together",
            400,
            b.raw(f"{head}\nContent-Length: 5\nTransfer-Encoding: chunked", b"0\r\n\r\n"),
        ),
    ]


def read_cases(b: Bench) -> list[Case]:
    def without_key(url: str) -> Callable[[], tuple[int, bytes]]:
        def send() -> tuple[int, bytes]:
            response = httpx.get(f"{b.server.url}{url}", timeout=30)
            return response.status_code, response.content

        return send

    def with_header(value: str) -> Callable[[], tuple[int, bytes]]:
        return lambda: b.get("/v1/profiles", headers={"Authorization": value})

    return [
        Case("no API key", 401, without_key("/v1/profiles")),
        Case("wrong API key", 401, with_header("Bearer agk_not-a-key-at-all-0000000000")),
        Case("key with the Basic scheme", 401, with_header(f"Basic {b.key}")),
        Case("key in the query string", 401, without_key(f"/v1/profiles?key={b.key}")),
        Case("inspection id with encoded ../", 404, lambda: b.get("/v1/inspections/..%2F..%2Fetc%2Fpasswd")),
        Case("overlay of an unknown inspection", 404, lambda: b.get(f"/v1/inspections/{'0' * 16}/overlay")),
        Case("map of an id that is a path", 404, lambda: b.get("/v1/inspections/%2Fetc%2Fpasswd/map")),
        Case("profile id with encoded ../", 404, lambda: b.get("/v1/profiles/..%2Faudit.db")),
        Case("verdict filter not a verdict", 422, lambda: b.get("/v1/inspections?verdict=maybe")),
        Case("limit 0", 422, lambda: b.get("/v1/inspections?limit=0")),
        Case("limit not a number", 422, lambda: b.get("/v1/inspections?limit=ten")),
        Case("since not a time", 422, lambda: b.get("/v1/inspections?since=yesterday")),
        Case("negative offset", 422, lambda: b.get("/v1/inspections?offset=-1")),
        Case("unknown route", 404, lambda: b.get("/v1/secrets")),
        Case("wrong method", 405, lambda: b.get("/v1/inspect")),
    ]


def chat_cases(b: Bench) -> list[Case]:
    question = "Is there a defect?"
    asked = {"inspection": "INSPECTION", "question": question}
    return [
        Case("chat: malformed JSON", 400, b.typed("/v1/chat", b'{"inspection": ', "application/json")),
        Case("chat: a JSON list", 422, b.ask(["INSPECTION", question])),
        Case("chat: missing question", 422, b.ask({"inspection": "INSPECTION"})),
        Case("chat: wrong field name", 422, b.ask({"inspection": "INSPECTION", "query": question})),
        Case("chat: question not text", 422, b.ask({"inspection": "INSPECTION", "question": 3})),
        Case("chat: question of 2,000 characters", 422, b.ask({"inspection": "INSPECTION", "question": "why " * 500})),
        Case("chat: unknown inspection", 404, b.ask({"inspection": "0" * 16, "question": question})),
        Case("chat: inspection id as a path", 404, b.ask({"inspection": "../audit.db", "question": question})),
        Case("chat: a form instead of JSON", 415, lambda: b.post("/v1/chat", data={"inspection": b.inspection_id})),
        *[
            Case(f"control: chat question {n + 1}", 200, b.ask(asked) if n else in_one_minute(b.ask(asked)), True)
            for n in range(QUESTIONS_PER_MINUTE)
        ],
        Case("chat: question over the per-key rate limit", 429, b.ask(asked)),
    ]


def in_one_minute(send: Sender, room_s: float = 20.0) -> Sender:
    """`send` once the clock minute has room_s left: the service counts questions per clock minute, so the limit's
    control questions and the refused one must fall in the same minute."""

    def sent() -> tuple[int, bytes]:
        left = 60.0 - time.time() % 60.0
        if left < room_s:
            time.sleep(left)
        return send()

    return sent


def one_line_json(body: bytes) -> bool:
    try:
        parsed = json.loads(body)
    except ValueError:
        return False
    return isinstance(parsed, dict) and list(parsed) == ["error"] and "\n" not in parsed["error"]


def snapshot(folder: Path, tmpdir: Path, pid: int) -> dict[str, Any]:
    """What a refused request must not change: rows, blob files, temp files, the server's open descriptors."""
    import sqlite3

    with sqlite3.connect(f"file:{folder / 'audit.db'}?mode=ro", uri=True) as db:
        tables = ("inspections", "profiles", "chat_answers")
        counts = {table: db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in tables}
        named = db.execute("SELECT image_sha256, overlay_sha256, map_sha256 FROM inspections").fetchall()
    blobs = {p.name for p in (folder / "blobs").rglob("*") if p.is_file()}
    suffixes = (".img", ".png", ".npy")
    referenced = {f"{digest}{suffix}" for row in named for digest, suffix in zip(row, suffixes, strict=True)}
    return {
        "rows": counts,
        "blobs": blobs,
        "referenced": referenced,
        "temp_files": temp_files(folder) + sorted(str(p) for p in tmpdir.rglob("*")),
        "open_fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def run_case(case: Case) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        status, body = case.send()
    except (httpx.HTTPError, OSError) as error:
        status, body = 0, f"{type(error).__name__}: {error}".encode()
    return {
        "kind": case.kind,
        "expected": case.expected,
        "status": status,
        "ok": status == case.expected,
        "one_line_json": one_line_json(body) if status >= 400 else None,
        "error": body.decode("utf-8", "replace")[:160] if status >= 400 else "",
        "seconds": round(time.perf_counter() - started, 2),
        "control": case.control,
    }


def create_key(folder: Path) -> str:
    done = subprocess.run(
        [ANOMALYGPT, "serve", "keys", "create", "bench", "--profiles", str(folder)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"anomalygpt serve keys create failed: {done.stderr}")
    return done.stdout.strip()


def run(work: Path) -> dict[str, Any]:
    references, queries = bench_images()
    folder, tmpdir = work / "service", work / "tmp"
    tmpdir.mkdir()
    key = create_key(folder)
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    server = Server(folder, 5.0, ["--questions-per-minute", str(QUESTIONS_PER_MINUTE)], env)
    server.start()
    try:
        with Client(server.url, api_key=key, timeout=600) as client:
            profile = client.create_profile("elpv mono dev", references)
            first = client.inspect(profile["id"], queries[0])
        other = png(np.asarray(Image.open(queries[1]).convert("L").resize((128, 128))))
        bench = Bench(server, key, profile["id"], queries[0].read_bytes(), other)
        bench.inspection_id = first["id"]
        assert server.process is not None
        before = snapshot(folder, tmpdir, server.process.pid)
        cases = image_cases(bench) + form_cases(bench) + limit_cases(bench) + read_cases(bench) + chat_cases(bench)
        results = [run_case(case) for case in cases]
        for result in results:
            print(f"{result['status']} (expected {result['expected']}) {result['kind']}", flush=True)
        bench.http.close()
        time.sleep(1.0)  # let closed connections release their descriptors
        after = snapshot(folder, tmpdir, server.process.pid)
        errors_5xx = server_errors(server.metrics(key))
    finally:
        server.stop()
    controls = {
        "inspections": sum(r["control"] and r["status"] == 201 for r in results),
        "chat_answers": sum(r["control"] and r["status"] == 200 for r in results),
    }
    added = {table: after["rows"][table] - before["rows"][table] for table in after["rows"]}
    return {
        "results": results,
        "bad_kinds": sum(not r["control"] for r in results),
        "all_as_expected": all(r["ok"] for r in results),
        "server_5xx": errors_5xx,
        "rows_added": added,
        "rows_added_by_controls": controls,
        "unreferenced_new_blobs": sorted(after["blobs"] - before["blobs"] - after["referenced"]),
        "temp_files": after["temp_files"],
        "open_fds_before_after": [before["open_fds"], after["open_fds"]],
        "outside_file_created": Path("/tmp/owned.png").exists(),
    }


def table(report: dict[str, Any]) -> str:
    lines = ["| kind | expected | got | one-line JSON error | s |", "|---|---:|---:|---|---:|"]
    for r in report["results"]:
        shown = "-" if r["one_line_json"] is None else ("yes" if r["one_line_json"] else "no")
        lines.append(f"| {r['kind']} | {r['expected']} | {r['status']} | {shown} | {r['seconds']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_service_bad.json"))
    args = parser.parse_args()
    machine = (
        f"{platform.platform()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    )
    print(machine, flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_bad_") as temp:
        report = {"machine": machine, "command": " ".join([sys.executable, *sys.argv]), **run(Path(temp))}
    write_json_atomic(args.out, report)
    print(table(report))
    print({k: v for k, v in report.items() if k not in ("results", "machine", "command")})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
