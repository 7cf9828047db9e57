"""Web app uploads (chat/uploads.py, chat/web.py): per-tab limits, deletion once decoded, the private upload
folder's sweeps and removal on exit. No browser needed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import chat.uploads as uploads
from anomalygpt.answerers import GroundedAnswerer
from chat.uploads import (
    ABANDONED_S,
    MAX_WINDOW_MB,
    MAX_WINDOW_UPLOADS,
    UPLOAD_WINDOW_S,
    UploadLog,
    private_upload_folder,
    sweep,
)
from chat.web import Session, WebApp, build_blocks, serve

MB = 1024 * 1024
pytestmark = [  # gradio's own queue code trips pandas 3 deprecations
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
    pytest.mark.filterwarnings("ignore::UserWarning"),  # gr.Warning outside a request is a warnings.warn
]


@pytest.fixture()
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """gradio's upload folder for this test."""
    path = tmp_path / "uploads"
    path.mkdir()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(path))
    return path


def upload(folder: Path, name: str, size: int = 0, pixels: np.ndarray | None = None) -> Path:
    """A file as gradio stores an upload: <folder>/<hash>/<name>; sparse when only a size is given."""
    path = folder / uuid.uuid4().hex / name
    path.parent.mkdir()
    if pixels is not None:
        Image.fromarray(pixels).save(path)
    else:
        with path.open("wb") as handle:
            handle.truncate(size)
    return path


def test_a_burst_of_60_mb_uploads_is_refused_past_the_window_limit(folder: Path) -> None:
    log, now, fitting = UploadLog(), 1000.0, MAX_WINDOW_MB // 60  # 17 files of 60 MB fit in 1024 MB
    files = [upload(folder, f"big{i}.png", 60 * MB) for i in range(fitting + 1)]
    verdicts = [log.admit(path, now + 0.5 * i) for i, path in enumerate(files)]
    assert verdicts[:fitting] == [None] * fitting
    assert verdicts[fitting] == (
        f"big{fitting}.png: not loaded: this tab uploaded {fitting * 60} MB in the last 10 minutes; with this file it "
        f"would pass {MAX_WINDOW_MB} MB; try again later"
    )
    assert [path.exists() for path in files] == [True] * fitting + [False]  # the refused one is deleted at once
    assert log.admit(upload(folder, "later.png", 60 * MB), now + UPLOAD_WINDOW_S + 1) is None  # the window moved


def test_the_number_of_files_per_window_is_limited(folder: Path) -> None:
    log = UploadLog()
    assert all(log.admit(upload(folder, f"{i}.png", 10), 5.0) is None for i in range(MAX_WINDOW_UPLOADS))
    refusal = log.admit(upload(folder, "one-more.png", 10), 6.0)
    assert refusal is not None and refusal.startswith(
        f"one-more.png: not loaded: this tab uploaded {MAX_WINDOW_UPLOADS}"
    )


def test_handlers_refuse_over_the_limit_and_delete_uploads_once_decoded(folder: Path, tmp_path: Path) -> None:
    app = WebApp(None, GroundedAnswerer(), "t")  # type: ignore[arg-type]  # these handlers never inspect
    pixels = np.full((64, 64, 3), 128, np.uint8)
    query, ref = upload(folder, "q.png", pixels=pixels), upload(folder, "r.png", pixels=pixels)
    corrupt = upload(folder, "corrupt.png", 100)
    outside = tmp_path / "mine.png"  # not an upload: never deleted
    Image.fromarray(pixels).save(outside)
    session = app.load_query(Session(), str(query)).session
    assert session.query is not None and session.query.name == "q.png" and not query.exists()
    session = app.add_references(session, [str(ref), str(corrupt), str(outside)]).session
    assert [p.name for p in session.references] == ["r.png", "mine.png"]
    assert not ref.exists() and not corrupt.exists() and outside.exists()
    session.uploads.entries = [(time.monotonic(), 0)] * MAX_WINDOW_UPLOADS  # the tab has used its window
    late = upload(folder, "late.png", pixels=pixels)
    screen = app.load_query(session, str(late))
    assert f"late.png: not loaded: this tab uploaded {MAX_WINDOW_UPLOADS} files" in screen.status.replace("\\", "")
    assert screen.session.query is not None and screen.session.query.name == "q.png"  # the query is kept
    assert not late.exists()


def test_sweep_deletes_old_files_abandoned_partials_and_the_oldest_beyond_the_cap(tmp_path: Path) -> None:
    now = time.time()
    aged = {"old/a.png": 7200, "fresh/b.png": 10, "tmpab12cd34": 120, "tmpfresh99": 5, "cap/c.png": 600}
    for name, age in aged.items():
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x" * 10)
        os.utime(path, (now - age, now - age))
    removed = sweep(tmp_path, now, cap_bytes=25)
    assert {p.relative_to(tmp_path).as_posix() for p in removed} == {"old/a.png", "tmpab12cd34", "cap/c.png"}
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "fresh",
        "fresh/b.png",
        "tmpfresh99",
    ]  # the emptied folders are gone too


def test_the_private_folder_is_swept_removed_on_exit_and_a_dead_servers_folder_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"anomalygpt-uploads-{int(finished.stdout)}-abc"  # a killed server's folder
    live = tmp_path / f"anomalygpt-uploads-{os.getpid()}-live"
    for path in (dead, live):
        (path / "h").mkdir(parents=True)
        (path / "h" / "x.png").write_bytes(b"x")
    with private_upload_folder(every=0.05) as folder:
        assert os.environ["GRADIO_TEMP_DIR"] == str(folder) and uploads.upload_folder() == folder.resolve()
        assert not dead.exists() and live.exists()
        stale = folder / "tmp0123abcd"  # a refused upload's 0-byte temp file, two minutes idle
        stale.touch()
        os.utime(stale, (time.time() - 120, time.time() - 120))
        deadline = time.monotonic() + 5
        while stale.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not stale.exists()  # swept on schedule
        (folder / "kept-until-exit.png").write_bytes(b"x")
    assert not folder.exists() and "GRADIO_TEMP_DIR" not in os.environ


def multipart(names: list[str], size: int) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
        "Content-Type: image/png\r\n\r\n".encode()
        + os.urandom(size)
        + b"\r\n"
        for name in names
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), boundary


def test_uploads_sent_to_the_server_land_in_its_folder_and_go_when_it_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    app = WebApp(None, GroundedAnswerer(), "t")  # type: ignore[arg-type]
    with private_upload_folder() as folder:
        blocks = build_blocks(app)
        port = free_port()
        serve(blocks, "127.0.0.1", port, block=False)
        try:
            body, boundary = multipart([f"burst{i}.png" for i in range(5)], 256 * 1024)
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/gradio_api/upload",
                data=body,
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
            )
            with urllib.request.urlopen(request) as response:
                stored = [Path(p) for p in json.load(response)]
            assert len(stored) == 5 and all(p.is_file() and p.is_relative_to(folder) for p in stored)
            abort_upload(port)  # the client goes away mid-file: gradio leaves the partial file behind
            deadline = time.monotonic() + 10
            while not (partials := list(folder.glob("tmp*"))) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(partials) == 1 and partials[0].stat().st_size == 5000
            assert sweep(folder, time.time() + ABANDONED_S + 1) == partials  # idle past ABANDONED_S: swept
            assert all(p.is_file() for p in stored)  # the finished uploads are not old yet
        finally:
            blocks.close()
    assert not folder.exists()


def abort_upload(port: int) -> None:
    """Start a multipart upload of a 10 MB file, send 5000 bytes of it, and hang up."""
    boundary = uuid.uuid4().hex
    head = (
        "POST /gradio_api/upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10000000\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n--{boundary}\r\n"
        'Content-Disposition: form-data; name="files"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n'
    )
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(head.encode() + b"y" * 5000)
        time.sleep(0.3)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


SERVER = "import sys; from chat.web import main; sys.exit(main(sys.argv[1:]))"


def test_the_ui_server_removes_its_uploads_when_stopped_with_sigterm(tmp_path: Path) -> None:
    preset = tmp_path / "preset.json"
    preset.write_text(json.dumps({"name": "t", "backbone": {"name": "efficientnet-lite0", "image_size": 64}}))
    port = free_port()
    args = ["--preset", str(preset), "--port", str(port), "--answerer", "grounded"]
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    env.pop("GRADIO_TEMP_DIR", None)
    server = subprocess.Popen([sys.executable, "-c", SERVER, *args], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert server.stdout is not None
        while "Serving on" not in (line := server.stdout.readline()):
            assert line, "the server exited before serving"
        (folder,) = tmp_path.glob("anomalygpt-uploads-*")
        body, boundary = multipart([f"burst{i}.png" for i in range(5)], 64 * 1024)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/gradio_api/upload",
            data=body,
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        with urllib.request.urlopen(request) as response:
            assert all(Path(p).is_relative_to(folder) and Path(p).is_file() for p in json.load(response))
        server.terminate()  # SIGTERM
        assert server.wait(timeout=60) == 0
    finally:
        server.kill()
    assert not list(tmp_path.glob("anomalygpt-*"))  # uploads, gradio's cache and download folders: all gone
