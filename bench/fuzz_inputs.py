"""Fuzz `anomalygpt detect` with corrupt images, odd pixel types, options, presets, names and output folders.

Every input is generated here, in a temporary folder; nothing is committed. Each case runs `anomalygpt detect`
in this process (cli.main with stdout and stderr captured, a SIGALRM timeout); in the full run one case of every
class also runs as a real subprocess. A case expects one of:
- "error": exit 2, one printable line "anomalygpt detect: error: ..." naming the file or option, stdout empty,
  and no file created, changed or removed;
- "accept": exit 0, files written only under its --out, and its oracle met (the lossy note, the threshold...);
- "any": a bit flip in a format without a checksum (JPEG, WebP, TIFF, BMP), which no decoder can notice: a clean
  error or an inspection, never a traceback or a hang.
"Silently wrong" counts an "error" case accepted, an "accept" case refused, or an accepted run failing its oracle.

Every "error" case fails before the backbone loads; they form the fast subset (--fast), run by
tests/test_fuzz_inputs.py in `make test`. There a run that gets past every check stops at the inspector and
counts as accepted, so a wrong acceptance costs no inference.

    OMP_NUM_THREADS=2 .venv/bin/python bench/fuzz_inputs.py          # full run
    .venv/bin/python bench/fuzz_inputs.py --fast                     # the fast subset, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import skimage.data
import tifffile
import torch
from PIL import Image

from anomalygpt import cli
from anomalygpt.io import safe_text

SIDE = 128  # px: queries and references; the preset runs the backbone at this size
ERROR_PREFIX = "anomalygpt detect: error: "
FAST_TIMEOUT_S, SLOW_TIMEOUT_S = 60, 300


@dataclass
class Case:
    group: str  # the table row
    name: str
    argv: list[str]  # after "detect"
    expect: str  # "error", "accept" or "any"
    folder: Path  # the case's own files: nothing outside `out` may change
    names: str = ""  # what the error line must name (a file or an option)
    out: Path | None = None  # where an accepted run may write
    inputs: list[Path] = field(default_factory=list)  # files that must never change, even under `out`
    oracle: Callable[[Run], bool] | None = None  # extra check of an accepted run


@dataclass
class Run:
    code: int | None  # None: no exit (a traceback or a hang)
    out: str
    err: str
    outcome: str  # "clean error", "messy error", "traceback", "hang" or "accepted"


class Hang(BaseException):
    """Raised by SIGALRM; a BaseException so that no `except Exception` in the code under test swallows it."""


class Accepted(BaseException):
    """Fast mode: the run passed every check and reached the inspector; no inference needed to know it."""


# --- inputs ---------------------------------------------------------------------------------------


def crop(row: int, col: int) -> np.ndarray:
    """(SIDE, SIDE) uint8 crop of skimage's grass texture."""
    return np.ascontiguousarray(skimage.data.grass()[row : row + SIDE, col : col + SIDE])


def encode(pixels: np.ndarray, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def png_chunks(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """(offset, kind, body) of every chunk of a PNG."""
    chunks, position = [], 8
    while position < len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        chunks.append((position, data[position + 4 : position + 8], data[position + 8 : position + 8 + length]))
        position += 12 + length
    return chunks


def chunk(kind: bytes, body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


@dataclass
class Workspace:
    root: Path
    refs: Path  # 4 good PNG references
    preset: Path  # 128 px, no rotation views: a few seconds per run
    good: np.ndarray  # a good query's pixels
    counter: int = 0

    def folder(self) -> Path:
        self.counter += 1
        path = self.root / f"case{self.counter:04d}"
        path.mkdir()
        return path

    def base(self, argv: list[str], preset: Path | None = None) -> list[str]:
        return [*argv, "--ref", str(self.refs), "--preset", str(preset or self.preset)]


def workspace(root: Path) -> Workspace:
    for index, (row, col) in enumerate(((0, 0), (0, 256), (256, 0), (256, 256))):
        write(root / "refs" / f"ref{index}.png", encode(crop(row, col), "PNG"))
    preset = root / "preset.json"
    preset.write_text(json.dumps({"name": "fuzz", "backbone": {"image_size": SIDE}, "memory": {"augment": False}}))
    return Workspace(root, root / "refs", preset, crop(384, 384))


# --- cases ----------------------------------------------------------------------------------------


def query_case(ws: Workspace, group: str, name: str, data: bytes, expect: str = "error", suffix: str = ".png") -> Case:
    """One query file holding `data`, inspected against the good references with --out."""
    folder = ws.folder()
    query = write(folder / f"query{suffix}", data)
    out = folder / "out"
    argv = ws.base([str(query), "--out", str(out)])
    return Case(group, name, argv, expect, folder, safe_text(query), out, [query])


def png_flip_cases(ws: Workspace, rng: np.random.Generator, count: int, fix_crc: bool) -> list[Case]:
    png = encode(ws.good, "PNG")
    offset, _, idat = next(c for c in png_chunks(png) if c[1] == b"IDAT")
    group = f"PNG bit flip, CRC {'recomputed' if fix_crc else 'stale'}"
    cases = []
    for index in range(count):
        body = bytearray(idat)
        body[int(rng.integers(len(idat)))] ^= 1 << int(rng.integers(8))
        head, tail = png[:offset], png[offset + 12 + len(idat) :]
        data = head + (chunk(b"IDAT", bytes(body)) if fix_crc else png[offset : offset + 8] + body + png[-16:-12])
        cases.append(query_case(ws, group, f"flip {index}", data + tail))
    return cases


def png_short_cases(ws: Workspace, count: int) -> list[Case]:
    """Valid CRCs and zlib checksum, rows missing: PIL fills them with zeros (the original EXIF bug's path)."""
    ihdr = png_chunks(encode(ws.good, "PNG"))[0][2]
    cases = []
    for rows in np.linspace(8, SIDE - 1, count).astype(int):
        raw = b"".join(b"\x00" + row.tobytes() for row in ws.good[:rows])
        data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
        cases.append(query_case(ws, "PNG short pixel data, checksums valid", f"{rows} rows", data))
    return cases


CUT_FORMATS = {
    "png": ("PNG", {}, ".png"),
    "jpeg": ("JPEG", {"quality": 90}, ".jpg"),
    "webp-lossless": ("WEBP", {"lossless": True}, ".webp"),
    "webp-lossy": ("WEBP", {"quality": 80}, ".webp"),
    "tiff": ("TIFF", {}, ".tif"),
    "tiff-lzw": ("TIFF", {"compression": "tiff_lzw"}, ".tif"),
    "bmp": ("BMP", {}, ".bmp"),
}


def cut_cases(ws: Workspace, fractions: list[float]) -> list[Case]:
    cases = []
    for kind, (fmt, options, suffix) in CUT_FORMATS.items():
        data = encode(ws.good, fmt, **options)
        for fraction in fractions:
            cut = min(len(data) - 1, max(1, int(len(data) * fraction)))
            cases.append(query_case(ws, "cut file (7 formats)", f"{kind} at {cut}", data[:cut], suffix=suffix))
    return cases


def unchecked_flip_cases(ws: Workspace, rng: np.random.Generator, count: int) -> list[Case]:
    """Bit flips past the header of formats with no checksum: undetectable, so only crashes and hangs count."""
    cases = []
    for kind in ("jpeg", "webp-lossless", "tiff", "bmp"):
        fmt, options, suffix = CUT_FORMATS[kind]
        data = encode(ws.good, fmt, **options)
        for index in range(count):
            flipped = bytearray(data)
            flipped[int(rng.integers(len(data) // 4, len(data)))] ^= 1 << int(rng.integers(8))
            group = "bit flip, no checksum (JPEG, WebP, TIFF, BMP)"
            cases.append(query_case(ws, group, f"{kind} {index}", bytes(flipped), "any", suffix))
    return cases


def reference_cases(ws: Workspace, rng: np.random.Generator, count: int) -> list[Case]:
    """A bit-flipped PNG among good references: the error names that reference."""
    png = encode(ws.good, "PNG")
    cases = []
    for index in range(count):
        folder = ws.folder()
        bad = bytearray(png)
        bad[int(rng.integers(100, len(png) - 20))] ^= 0x10
        ref = write(folder / "refs" / "ref_bad.png", bytes(bad))
        query = write(folder / "query.png", png)
        argv = [str(query), "--ref", str(ws.refs), str(ref), "--preset", str(ws.preset), "--out", str(folder / "o")]
        cases.append(Case("corrupt reference", f"flip {index}", argv, "error", folder, safe_text(ref), None, [ref]))
    return cases


VALUE_ERRORS = {
    # case: (pixel values written as a TIFF, (H, W))
    "int8": np.full((SIDE, SIDE), -3, np.int8),
    "int16 with negatives": np.full((SIDE, SIDE), -300, np.int16),
    "int32": np.full((SIDE, SIDE), 70_000, np.int32),
    "uint32": np.full((SIDE, SIDE), 3_000_000_000, np.uint32),
    "float +inf": np.where(np.eye(SIDE, dtype=bool), np.inf, 0.5).astype(np.float32),
    "float NaN": np.where(np.eye(SIDE, dtype=bool), np.nan, 0.5).astype(np.float32),
    "float negative": np.full((SIDE, SIDE), -0.25, np.float32),
    "float above 255": np.full((SIDE, SIDE), 300.0, np.float32),
    "float max 1.03": np.linspace(0, 1.03, SIDE * SIDE, dtype=np.float32).reshape(SIDE, SIDE),
}


def value_range_cases(ws: Workspace, slow: bool) -> list[Case]:
    cases = []
    for name, values in VALUE_ERRORS.items():
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, values)
        cases.append(query_case(ws, "TIFF value ranges", name, buffer.getvalue(), suffix=".tif"))
    if slow:
        cases += [valid_tiff_case(ws, name, values) for name, values in valid_tiffs(ws).items()]
    return cases


def valid_tiffs(ws: Workspace) -> dict[str, np.ndarray]:
    """The good query's 8-bit pixels in each range the rule defines; each must decode back to them exactly."""
    grass = ws.good.astype(np.float64)
    return {
        "uint16": (grass * 257).astype(np.uint16),  # 255 -> 65535: x 255/65535 gives the 8-bit value back
        "float [0, 1]": (grass / 255).astype(np.float32),
        "float [0, 255]": grass.astype(np.float32),
    }


def valid_tiff_case(ws: Workspace, name: str, values: np.ndarray) -> Case:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, values)
    case = query_case(ws, "TIFF value ranges", f"{name} (valid)", buffer.getvalue(), "accept", ".tif")
    query, expected = case.inputs[0], ws.good

    def decoded_by_the_rule(run: Run) -> bool:
        from anomalygpt.io import load_image

        return bool(np.array_equal(load_image(query)[:, :, 0], expected))

    case.oracle = decoded_by_the_rule
    return case


def lossy_cases(ws: Workspace) -> list[Case]:
    """Queries against PNG references: a note on stderr for JPEG and lossy WebP, none for lossless files."""
    kinds = {"jpeg q90": ("JPEG", {"quality": 90}, ".jpg", True), "webp q80": ("WEBP", {"quality": 80}, ".webp", True)}
    kinds |= {"webp lossless": ("WEBP", {"lossless": True}, ".webp", False), "png": ("PNG", {}, ".png", False)}
    cases = []
    for name, (fmt, options, suffix, noted) in kinds.items():
        case = query_case(ws, "lossy queries, PNG references", name, encode(ws.good, fmt, **options), "accept", suffix)
        case.oracle = lambda run, noted=noted: ("are stored lossily" in run.err) == noted
        cases.append(case)
    return cases


def out_cases(ws: Workspace, slow: bool) -> list[Case]:
    """Output folders that must be refused before any inference, and one allowed --overwrite."""
    group = "--out safety"
    png = encode(ws.good, "PNG")
    cases = []

    def make(name: str, build: Callable[[Path], tuple[list[str], str, list[Path]]]) -> Case:
        folder = ws.folder()
        argv, names, inputs = build(folder)
        return Case(group, name, ws.base(argv), "error", folder, names, None, inputs)

    def query_folder(folder: Path) -> tuple[Path, Path]:
        return write(folder / "q" / "q.png", png), write(folder / "q" / "q_overlay.png", png[:-1] + b"\x00")

    def into_inputs(folder: Path, extra: list[str]) -> tuple[list[str], str, list[Path]]:
        q, own = query_folder(folder)
        return [str(q.parent), "--out", str(q.parent), *extra], safe_text(own), [q, own]

    def onto_existing(folder: Path) -> tuple[list[str], str, list[Path]]:
        q, own = query_folder(folder)
        return [str(q), "--out", str(q.parent)], safe_text(own), [q, own]

    def summary(folder: Path) -> tuple[list[str], str, list[Path]]:
        q = write(folder / "q.png", png)
        old = write(folder / "out" / "summary.json", b"{}")
        return [str(q), "--out", str(old.parent)], safe_text(old), [q, old]

    def hard_link(folder: Path) -> tuple[list[str], str, list[Path]]:
        q = write(folder / "q.png", png)
        (folder / "out").mkdir()
        os.link(q, folder / "out" / "q_map.npy")
        return [str(q), "--out", str(folder / "out"), "--overwrite"], safe_text(folder / "out" / "q_map.npy"), [q]

    def plain(out: str, names: str) -> Callable[[Path], tuple[list[str], str, list[Path]]]:
        def build(folder: Path) -> tuple[list[str], str, list[Path]]:
            q = write(folder / "q.png", png)
            write(folder / "a_file", b"x")
            os.symlink(folder / "missing", folder / "dangling")
            return [str(q), "--out", out.format(folder=folder)], names.format(folder=folder), [q]

        return build

    cases.append(make("--out is the query folder", lambda f: into_inputs(f, [])))
    cases.append(make("--out is the query folder, --overwrite", lambda f: into_inputs(f, ["--overwrite"])))
    cases.append(make("an existing output file", onto_existing))
    cases.append(make("an existing summary.json", summary))
    cases.append(make("an output hard-linked to the query, --overwrite", hard_link))
    cases.append(make("--out /proc/x", plain("/proc/x/out", "/proc/x/out")))
    cases.append(make("--out ''", plain("", "--out")))
    cases.append(make("--out is a file", plain("{folder}/a_file", "{folder}/a_file")))
    cases.append(make("--out under a file", plain("{folder}/a_file/sub", "{folder}/a_file/sub")))
    cases.append(make("--out is a dangling link", plain("{folder}/dangling", "{folder}/dangling")))
    cases.append(make("--out under a dangling link", plain("{folder}/dangling/sub", "{folder}/dangling/sub")))
    if slow:
        folder = ws.folder()
        q, own = query_folder(folder)
        argv = ws.base([str(q), "--out", str(q.parent), "--overwrite"])
        replaced = Case(
            group, "an existing output file, --overwrite (valid)", argv, "accept", folder, "", q.parent, [q]
        )
        replaced.oracle = lambda run: own.read_bytes() != png[:-1] + b"\x00"  # the old overlay was replaced
        cases.append(replaced)
    return cases


SENSITIVITY_ERRORS = ("-1e9", "1e9", "nan", "inf", "-inf", "abc", "", "5.0000001", "-5.0000001", "0x10")


def option_cases(ws: Workspace, slow: bool) -> list[Case]:
    png = encode(ws.good, "PNG")
    cases = []
    for value in SENSITIVITY_ERRORS:
        folder = ws.folder()
        q = write(folder / "q.png", png)
        argv = ws.base([str(q), "--sensitivity", value, "--out", str(folder / "o")])
        cases.append(Case("options", f"--sensitivity {value!r}", argv, "error", folder, "--sensitivity", None, [q]))
    folder = ws.folder()
    q = write(folder / "q.png", png)
    many = too_many_references(ws, png)
    extra = {
        "unknown option": ([str(q), "--bogus", *ws.base([])], "--bogus"),
        "one reference too many": ([str(q), "--ref", str(many), "--preset", str(ws.preset)], "--ref"),
        "no references, no decoder": ([str(q), "--preset", str(ws.preset)], "--ref"),
        "--ref without a value": ([str(q), "--preset", str(ws.preset), "--ref"], "--ref"),
        "--processes over the cores": ([str(q), "--processes", "100000", *ws.base([])], "--processes"),
        "--maps unknown": ([str(q), "--maps", "some", *ws.base([])], "--maps"),
        "--maps without --out": ([str(q), "--maps", "none", *ws.base([])], "--maps"),
        "--overwrite without --out": ([str(q), "--overwrite", *ws.base([])], "--overwrite"),
    }
    for name, (argv, names) in extra.items():
        cases.append(Case("options", name, argv, "error", folder, names, None, [q]))
    if slow:
        cases += [sensitivity_case(ws, value) for value in ("-5", "-1e0", "5", "2.5e-1")]
    return cases


def too_many_references(ws: Workspace, png: bytes) -> Path:
    """A folder of cli.MAX_REFERENCES + 1 names of one good image (hard links: no copies, and not one file to
    unique_paths, which resolves names); outside every case folder, so no case hashes them."""
    folder = ws.root / "too_many_refs"
    first = write(folder / "r00000.png", png)
    for index in range(1, cli.MAX_REFERENCES + 1):
        os.link(first, folder / f"r{index:05d}.png")
    return folder


def sensitivity_case(ws: Workspace, value: str) -> Case:
    """A valid sensitivity (exponent forms included): the threshold moves by exactly that many spreads, down to the
    good references' mean score at most."""
    folder = ws.folder()
    q = write(folder / "q.png", encode(ws.good, "PNG"))
    argv = ws.base([str(q), "--json", "--sensitivity", value])

    def shifted(run: Run) -> bool:
        record = json.loads(run.out)[0]
        calibration = record["calibration"]
        lowest = min(calibration["normal_mean"], calibration["image_threshold"])
        expected = max(calibration["image_threshold"] - float(value) * calibration["normal_spread"], lowest)
        return abs(record["threshold"] - expected) < 1e-9 and record["pixel_threshold"] > 0

    return Case("options", f"--sensitivity {value} (valid)", argv, "accept", folder, "", None, [q], shifted)


HOSTILE_NAMES = {
    "ANSI clear screen": b"\x1b[2J\x1b[31mq.png",
    "terminal title (OSC)": b"\x1b]0;owned\x07q.png",
    "newline": b"q\nanomalygpt detect: all good.png",
    "bidi override": "q\u202egnp.png".encode(),
    "not UTF-8": b"q\xff\xfe.png",
    "C1 control": "q\u009b31m.png".encode(),
}


def name_cases(ws: Workspace, slow: bool) -> list[Case]:
    """Hostile file names: corrupt files (the error line) and, in the full run, good ones (the table)."""
    png = encode(ws.good, "PNG")
    cases = []
    for name, raw in HOSTILE_NAMES.items():
        for good in (False, True) if slow else (False,):
            folder = ws.folder()
            path = write(folder / os.fsdecode(raw), png if good else png[: len(png) // 2])
            argv = ws.base([str(path), "--out", str(folder / "o")])
            expect = "accept" if good else "error"
            case = Case("control characters in names", name, argv, expect, folder, safe_text(path), None, [path])
            case.out = folder / "o" if good else None
            case.oracle = lambda run: all(char.isprintable() for char in run.out.replace("\n", ""))
            cases.append(case)
    return cases


def bad_presets() -> dict[str, tuple[str, str]]:
    """case: (preset file text, the field the error must name)."""
    cuda = "cpu" if torch.cuda.is_available() else "cuda"  # an unavailable device on this machine
    return {
        "a list": ("[1, 2]", "a preset is a JSON object"),
        "null": ("null", "a preset is a JSON object"),
        "empty file": ("", "not a readable JSON preset"),
        "not UTF-8": ('{"name": "\udcff"}', "not a readable JSON preset"),
        "deeply nested": ('{"memory": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
        "z NaN": ('{"calibration": {"z": NaN}}', "calibration:z"),
        "z -Infinity": ('{"calibration": {"z": -Infinity}}', "calibration:z"),
        "z 1e308": ('{"calibration": {"z": 1e308}}', "calibration:z"),
        "z with 400 digits": ('{"calibration": {"z": ' + "9" * 400 + "}}", "calibration:z"),
        "seed with 5000 digits": ('{"memory": {"seed": ' + "9" * 5000 + "}}", "not a readable JSON preset"),
        "spread_prior 1e308": ('{"calibration": {"spread_prior": 1e308}}', "calibration:spread_prior"),
        "pixel_quantile 1.5": ('{"calibration": {"pixel_quantile": 1.5}}', "calibration:pixel_quantile"),
        "max_patches 0": ('{"memory": {"max_patches": 0}}', "memory:max_patches"),
        "image_size 0": ('{"backbone": {"image_size": 0}}', "backbone:image_size"),
        "image_size 7": ('{"backbone": {"image_size": 7}}', "backbone:image_size"),
        "negative sigma": ('{"memory": {"sigma": -1}}', "memory:sigma"),
        "neighbourhood 0": ('{"memory": {"neighbourhood": 0}}', "memory:neighbourhood"),
        "neighbourhood 2": ('{"memory": {"neighbourhood": 2}}', "memory:neighbourhood"),
        "top_fraction 0": ('{"memory": {"top_fraction": 0}}', "memory:top_fraction"),
        "top_fraction 2": ('{"memory": {"top_fraction": 2}}', "memory:top_fraction"),
        "chunk_elements 0": ('{"memory": {"chunk_elements": 0}}', "memory:chunk_elements"),
        "seed -1": ('{"memory": {"seed": -1}}', "memory:seed"),
        "fusion_weight NaN": ('{"decoder": {"fusion_weight": NaN}}', "decoder:fusion_weight"),
        "stages [-1]": ('{"backbone": {"stages": [-1]}}', "backbone:stages"),
        "unavailable device": (json.dumps({"device": cuda if cuda == "cuda" else "cuda:99"}), "device"),
        "invalid device": ('{"device": "gpu0"}', "device"),
        "unknown backbone": ('{"backbone": {"name": "nope"}}', "backbone:name"),
        "unknown option": ('{"memory": {"augmnt": true}}', "augmnt"),
        "1 for a bool": ('{"memory": {"augment": 1}}', "memory:augment"),
        "memory as a list": ('{"memory": [1]}', "memory"),
        "a megabyte string": ('{"device": "' + "x" * 1_000_000 + '"}', "device"),
        "no LoRA modules": ('{"llm": {"lora": {"target_modules": []}}}', "llm:lora:target_modules"),
    }


def preset_cases(ws: Workspace, slow: bool) -> list[Case]:
    png = encode(ws.good, "PNG")
    cases = []
    for name, (text, names) in bad_presets().items():
        folder = ws.folder()
        preset = folder / "preset.json"
        preset.write_bytes(text.encode("utf-8", "surrogateescape"))
        q = write(folder / "q.png", png)
        argv = ws.base([str(q), "--out", str(folder / "o")], preset)
        cases.append(Case("presets", name, argv, "error", folder, names, None, [q, preset]))
    if slow:
        for name, data in {
            "device auto": {"device": "auto"},
            "edges": {"memory": {"top_fraction": 1, "sigma": 0}},
        }.items():
            folder = ws.folder()
            preset = folder / "preset.json"
            preset.write_text(json.dumps({"backbone": {"image_size": SIDE}, "memory": {"augment": False}} | data))
            q = write(folder / "q.png", png)
            cases.append(Case("presets", f"{name} (valid)", ws.base([str(q)], preset), "accept", folder, "", None, [q]))
    return cases


def all_cases(ws: Workspace, fast: bool) -> list[Case]:
    rng = np.random.default_rng(0)
    slow = not fast
    cases = png_flip_cases(ws, rng, 4 if fast else 40, fix_crc=False)
    cases += png_flip_cases(ws, rng, 4 if fast else 40, fix_crc=True)
    cases += png_short_cases(ws, 2 if fast else 8)
    cases += cut_cases(ws, [0.5] if fast else [0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999])
    cases += [] if fast else unchecked_flip_cases(ws, rng, 5)
    cases += reference_cases(ws, rng, 2 if fast else 6)
    cases += value_range_cases(ws, slow)
    cases += [] if fast else lossy_cases(ws)
    cases += out_cases(ws, slow) + option_cases(ws, slow) + name_cases(ws, slow) + preset_cases(ws, slow)
    return cases


# --- running and judging --------------------------------------------------------------------------


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def expire(signum: int, frame: FrameType | None) -> None:
        raise Hang

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def stop_at_the_inspector() -> Iterator[None]:
    """Fast mode: a run that reaches build_inspector passed every check; stop it there as accepted."""
    import anomalygpt.inspection as inspection

    def accepted(*args: Any, **kwargs: Any) -> Any:
        raise Accepted

    original = inspection.build_inspector
    inspection.build_inspector = accepted  # type: ignore[assignment]
    try:
        yield
    finally:
        inspection.build_inspector = original  # type: ignore[assignment]


def run_in_process(argv: list[str], timeout: int) -> Run:
    out, err = io.StringIO(), io.StringIO()
    try:
        with time_limit(timeout), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code: int | None = cli.main(["detect", *argv])
    except Hang:
        return Run(None, out.getvalue(), err.getvalue(), "hang")
    except Accepted:
        return Run(0, out.getvalue(), err.getvalue(), "accepted")
    except Exception as error:  # noqa: BLE001 - a traceback is what the fuzz looks for
        return Run(None, out.getvalue(), f"{err.getvalue()}Traceback: {error!r}", "traceback")
    return Run(code, out.getvalue(), err.getvalue(), outcome(code, out.getvalue(), err.getvalue()))


def run_subprocess(argv: list[str], timeout: int) -> Run:
    command = [sys.executable, "-c", "import sys; from anomalygpt.cli import main; sys.exit(main())", "detect", *argv]
    try:
        done = subprocess.run(command, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Run(None, "", "", "hang")
    out, err = (stream.decode("utf-8", "surrogateescape") for stream in (done.stdout, done.stderr))
    if "Traceback (most recent call last)" in err:
        return Run(done.returncode, out, err, "traceback")
    return Run(done.returncode, out, err, outcome(done.returncode, out, err))


def outcome(code: int | None, out: str, err: str) -> str:
    if code == 0:
        return "accepted"
    line = err.removesuffix("\n")
    clean = code == 2 and out == "" and err.count("\n") == 1 and line.startswith(ERROR_PREFIX)
    return "clean error" if clean and line.isprintable() else "messy error"


def snapshot(paths: list[Path]) -> dict[str, str]:
    """Every file (links not followed) under paths: name -> content digest."""
    state = {}
    for root in paths:
        for path in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if path.is_file() and not path.is_symlink():
                state[str(path)] = hashlib.sha1(path.read_bytes()).hexdigest()
    return state


def changed_files(case: Case, before: dict[str, str], after: dict[str, str], accepted: bool) -> list[str]:
    """Files created, changed or removed that the case may not touch."""
    touched = [name for name in before.keys() | after.keys() if before.get(name) != after.get(name)]
    inputs = {str(path) for path in case.inputs}
    allowed = str(case.out) + os.sep if accepted and case.out is not None else None
    return [name for name in touched if name in inputs or allowed is None or not name.startswith(allowed)]


@dataclass
class Judged:
    case: Case
    run: Run
    wrong: bool
    changed: list[str]


def judge(case: Case, run: Run, changed: list[str]) -> Judged:
    if run.outcome == "clean error" and case.names not in run.err:
        run.outcome = "messy error"  # one line, but not naming the file or option
    if case.expect == "error":
        wrong = run.outcome == "accepted"
    elif case.expect == "accept":
        wrong = run.outcome != "accepted" or (case.oracle is not None and not case.oracle(run))
    else:
        wrong = False
    return Judged(case, run, wrong, changed)


def run_case(ws: Workspace, case: Case, fast: bool, in_subprocess: bool = False) -> Judged:
    watched = [case.folder, ws.refs, ws.preset]
    before = snapshot(watched)
    timeout = FAST_TIMEOUT_S if case.expect == "error" else SLOW_TIMEOUT_S
    with stop_at_the_inspector() if fast else contextlib.nullcontext():
        run = run_subprocess(case.argv, timeout) if in_subprocess else run_in_process(case.argv, timeout)
    after = snapshot(watched)
    changed = changed_files(case, before, after, run.outcome == "accepted" and not fast)
    return judge(case, run, changed)


def run(root: Path, fast: bool, verbose: bool = False) -> list[Judged]:
    """Build every case under root and run it; in the full run, one case per class again as a subprocess."""
    ws = workspace(root)
    cases = all_cases(ws, fast)
    results = []
    for case in cases:
        results.append(run_case(ws, case, fast))
        if verbose and (results[-1].wrong or results[-1].changed or results[-1].run.outcome in BAD_OUTCOMES):
            print(
                f"  {case.group} / {safe_text(case.name)}: {results[-1].run.outcome} {safe_text(results[-1].run.err)}"
            )
    if not fast:
        firsts = {case.group: case for case in reversed(cases)}
        for case in firsts.values():
            remove_run_outputs(case)
            results.append(run_case(ws, replace(case, group="subprocess: first case of each class"), fast, True))
    return results


def remove_run_outputs(case: Case) -> None:
    """Before a case runs again: its own --out folder goes (never one holding its inputs, as with --overwrite)."""
    if case.out is not None and case.out.is_dir() and not any(case.out in path.parents for path in case.inputs):
        shutil.rmtree(case.out)


BAD_OUTCOMES = ("messy error", "traceback", "hang")
COLUMNS = ("class", "cases", "clean errors", "messy errors", "tracebacks", "hangs", "accepted", "silently wrong")


def table(results: list[Judged]) -> str:
    """Markdown table: one row per class, then the totals."""
    groups: dict[str, list[Judged]] = {}
    for judged in results:
        groups.setdefault(judged.case.group, []).append(judged)
    rows = [row(name, items) for name, items in groups.items()] + [row("**total**", results)]
    lines = ["| " + " | ".join((*COLUMNS, "files changed")) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in r) + " |" for r in rows])


def row(name: str, items: list[Judged]) -> tuple[Any, ...]:
    count = {kind: sum(j.run.outcome == kind for j in items) for kind in ("clean error", "messy error", "traceback")}
    hangs = sum(j.run.outcome == "hang" for j in items)
    accepted = sum(j.run.outcome == "accepted" for j in items)
    wrong = sum(j.wrong for j in items)
    changed = sum(len(j.changed) for j in items)
    return (name, len(items), *count.values(), hangs, accepted, wrong, changed)


def failures(results: list[Judged]) -> list[Judged]:
    """Cases that miss the target: a traceback, a hang, a messy error, a wrong result or a changed file."""
    return [j for j in results if j.wrong or j.changed or j.run.outcome in BAD_OUTCOMES]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="only the cases that fail before the backbone loads")
    parser.add_argument("--keep", type=Path, default=None, help="build the cases here and keep them")
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fuzz-") as temp:
        root = args.keep or Path(temp)
        root.mkdir(parents=True, exist_ok=True)
        results = run(root, args.fast, verbose=True)
    print(table(results))
    seconds = time.perf_counter() - start
    print(
        f"\n{len(results)} cases in {seconds:.0f} s; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, CUDA {'yes' if torch.cuda.is_available() else 'no'}"
    )
    bad = failures(results)
    for judged in bad:
        print(
            f"MISSED: {judged.case.group} / {safe_text(judged.case.name)}: {judged.run.outcome}, "
            f"wrong={judged.wrong}, changed={judged.changed}: {safe_text(judged.run.err)[:300]}"
        )
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
