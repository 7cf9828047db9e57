"""Uploads to the web app: per-tab limits, and a private upload folder swept on a schedule and removed on exit.

gradio limits each upload's size (`max_file_size`) but not how many files a tab sends, nor how much they add up
to, and keeps every upload on disk until its cache cleanup runs. So:
- each tab (Session) may add at most MAX_WINDOW_UPLOADS files and MAX_WINDOW_MB in any UPLOAD_WINDOW_S; a file
  over the limit is refused with a one-line message and deleted at once;
- an upload is deleted as soon as it has been decoded (the Session keeps the pixels, never the file);
- the server gets its own upload folder (GRADIO_TEMP_DIR, named after its process id), where gradio also keeps
  its cache. A sweeper thread deletes files older than MAX_AGE_S, partial uploads abandoned for ABANDONED_S (the
  0-byte temp files of refused or broken uploads) and, oldest first, whatever exceeds FOLDER_CAP_MB, which also
  bounds uploads sent to gradio's endpoint without any event. The folder is removed when the server stops, and a
  folder left by a server that was killed is removed when the next one starts.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

UPLOAD_WINDOW_S = 600.0  # the per-tab limits count the uploads of the last 10 minutes
MAX_WINDOW_UPLOADS = 200  # files per tab and window: a reference pool of 100 and many queries
MAX_WINDOW_MB = 1024  # MB per tab and window (each file is also at most web.MAX_UPLOAD_MB)
SWEEP_EVERY_S = 60.0
MAX_AGE_S = 3600.0  # uploads and gradio's cached outputs (downloads, overlays) live at most an hour
ABANDONED_S = 60.0  # a partial upload not written to for this long is abandoned
FOLDER_CAP_MB = 2048  # the whole upload folder; oldest files go first beyond it
FOLDER_PREFIX = "anomalygpt-uploads-"
FOLDER_NAME = re.compile(rf"{FOLDER_PREFIX}(\d+)-\w+")
PARTIAL = re.compile(r"tmp\w+")  # gradio streams an upload into NamedTemporaryFile(dir=folder), then renames it
MB = 1024 * 1024


@dataclass
class UploadLog:
    """One tab's recent uploads as (monotonic time, bytes), to hold it to the per-window limits."""

    entries: list[tuple[float, int]] = field(default_factory=list)

    def admit(self, path: str | Path, now: float) -> str | None:
        """None when the file fits the tab's limits (it is then counted); else the reason, on one line, and the
        file is deleted."""
        self.entries = [(t, size) for t, size in self.entries if now - t < UPLOAD_WINDOW_S]
        size = file_size(path)
        used = sum(size for _, size in self.entries)
        minutes = f"{UPLOAD_WINDOW_S / 60:g} minutes"
        reason = None
        if len(self.entries) >= MAX_WINDOW_UPLOADS:
            reason = f"this tab uploaded {len(self.entries)} files in the last {minutes} (at most {MAX_WINDOW_UPLOADS})"
        elif used + size > MAX_WINDOW_MB * MB:
            reason = f"this tab uploaded {used / MB:.0f} MB in the last {minutes}; with this file it would pass"
            reason += f" {MAX_WINDOW_MB} MB"
        if reason is not None:
            discard(path)
            return f"{Path(path).name}: not loaded: {reason}; try again later"
        self.entries.append((now, size))
        return None


def file_size(path: str | Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0  # gone already: decoding it will say so


def upload_folder() -> Path:
    """The folder gradio writes uploads and its cache into (GRADIO_TEMP_DIR, read at call time)."""
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder()).resolve()


def discard(path: str | Path) -> None:
    """Delete an upload once it is decoded or refused; files outside the upload folder are never touched."""
    path = Path(path).resolve()
    if path.is_relative_to(upload_folder()) and path.is_file():
        path.unlink(missing_ok=True)


def sweep(folder: Path, now: float, cap_bytes: int = FOLDER_CAP_MB * MB) -> list[Path]:
    """Delete, under folder: files older than MAX_AGE_S, top-level partial uploads idle for ABANDONED_S, then the
    oldest files while the rest exceed cap_bytes; then empty subfolders. Returns the files deleted."""
    files = sorted((p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()), key=modified)
    doomed = {p for p in files if now - modified(p) > MAX_AGE_S}
    doomed |= {p for p in files if p.parent == folder and PARTIAL.fullmatch(p.name) and now - modified(p) > ABANDONED_S}
    total = sum(file_size(p) for p in files if p not in doomed)
    for path in files:  # oldest first
        if total <= cap_bytes:
            break
        if path not in doomed:
            doomed.add(path)
            total -= file_size(path)
    for path in doomed:
        path.unlink(missing_ok=True)
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            sub.rmdir()  # only when empty
    return sorted(doomed)


def modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def remove_dead_folders(parent: Path) -> list[Path]:
    """Upload folders under parent that servers now dead (killed before they could clean up) left; removed."""
    removed = []
    for entry in parent.glob(f"{FOLDER_PREFIX}*"):
        match = FOLDER_NAME.fullmatch(entry.name)
        if match and entry.is_dir() and entry.stat().st_uid == os.getuid() and not alive(int(match[1])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


@contextlib.contextmanager
def private_upload_folder(every: float = SWEEP_EVERY_S) -> Iterator[Path]:
    """GRADIO_TEMP_DIR set to a fresh folder for this server, swept every `every` seconds, removed on exit (and
    the variable restored). Build the gr.Blocks inside: gradio reads the variable when a Blocks is created."""
    parent = Path(tempfile.gettempdir())
    remove_dead_folders(parent)
    folder = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-", dir=parent))
    previous = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    stop = threading.Event()
    sweeper = threading.Thread(target=sweep_until, args=(folder, every, stop), name="upload-sweeper", daemon=True)
    sweeper.start()
    try:
        yield folder
    finally:
        stop.set()
        sweeper.join()
        if previous is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = previous
        shutil.rmtree(folder, ignore_errors=True)


def sweep_until(folder: Path, every: float, stop: threading.Event) -> None:
    while not stop.wait(every):
        sweep(folder, time.time())
