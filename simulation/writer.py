"""Simulated inspection dataset on disk: images, masks, conversations.jsonl, manifest.json, contact sheet.

Sample i depends only on (seed, i), so an interrupted run resumes exactly; see simulation/conversations.py
for the JSONL format.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import io
import json
import platform
import re
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from anomalygpt.io import (
    ImageError,
    list_images,
    load_image,
    write_bytes_atomic,
    write_json_atomic,
    write_png_atomic,
    write_text_atomic,
)
from simulation.anomalies import (
    FAMILIES,
    MIN_SIDE,
    ParamsError,
    SimParams,
    SimulationError,
    known_categories,
    load_params,
    simulate_random,
)
from simulation.conversations import CONFIDENCE_WORDS, conversation_for, region_mask

FORMAT = "anomalygpt-simulated-conversations/1"
MANIFEST = "manifest.json"
CONVERSATIONS = "conversations.jsonl"
CONTACT_SHEET = "contact_sheet.png"
IMAGES, MASKS = "images", "masks"
OWN_ENTRIES = frozenset({MANIFEST, CONVERSATIONS, CONTACT_SHEET, IMAGES, MASKS})
SAMPLE_FILE = re.compile(r"^(\d{6})\.png$")
TEMP_FILE = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")  # what anomalygpt.io's atomic writers leave if killed
DEFAULT_ANOMALY_FRACTION = 0.5
MAX_DRAWS = 8  # normal images tried for one anomalous sample before giving up
SOURCE_CACHE = 64  # decoded normal images kept in memory; ~200 KB each at 256 px
SHEET_SAMPLES = 12
SHEET_COLUMNS = 4
THUMB = 128  # px per image / mask thumbnail on the contact sheet
PAD = 6
TEXT_LINES = 9
LINE_HEIGHT = 12
BOX_COLOUR = (255, 64, 64)
# zlib level 1 encodes 256 px textures about 3x faster than PIL's default 6 (encoding was 60% of the
# run time) for files about 9% larger.
PNG_COMPRESS_LEVEL = 1
VERSION_PACKAGES = ("anomalygpt", "numpy", "opencv-python-headless", "pillow", "scipy")


class WriterError(ValueError):
    """Bad arguments or an output folder this writer must not touch; the message is one line."""


@dataclass
class Sample:
    """One generated sample before it is written."""

    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) bool, exactly the union of the conversation's regions
    family: str | None  # None: a normal image
    normal: Path  # the normal image it was made from
    conversation: dict[str, Any]


class OtherImages(Sequence[np.ndarray]):
    """The normals except one, decoded on first use: patch sources for simulate_random."""

    def __init__(self, paths: Sequence[Path], skip: int, load: Callable[[Path], np.ndarray]) -> None:
        self._paths = [path for index, path in enumerate(paths) if index != skip]
        self._load = load

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        return self._load(self._paths[index])


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of sample `index`: independent of every other sample, so resuming is exact."""
    return np.random.default_rng([seed, index])


def load_square(path: Path, size: int | None) -> np.ndarray:
    """(size, size, 3) uint8 image (aspect not kept, as the backbones see it), or as stored for None."""
    image = load_image(path)
    if size is None:
        return image
    shrink = size <= min(image.shape[:2])
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def anomalous_pair(
    image: np.ndarray, sources: Sequence[np.ndarray], params: SimParams, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, str] | None:
    """(image, region mask, family) of one simulated anomaly; None when only specks were labelled."""
    simulated = simulate_random(image, sources, params, rng)
    mask = region_mask(simulated.mask)  # (H, W) bool
    return (simulated.image, mask, simulated.family) if mask.any() else None


def draw_sample(
    normals: Sequence[Path],
    index: int,
    seed: int,
    params: SimParams,
    anomaly_fraction: float,
    load: Callable[[Path], np.ndarray],
) -> Sample:
    """Sample `index`: a normal image, made anomalous with probability anomaly_fraction, and its conversation."""
    rng = sample_rng(seed, index)
    anomalous = bool(rng.random() < anomaly_fraction)
    confidence = CONFIDENCE_WORDS[int(rng.integers(len(CONFIDENCE_WORDS)))]
    tried = []
    for _ in range(MAX_DRAWS if anomalous else 1):
        pick = int(rng.integers(len(normals)))
        image = load(normals[pick])
        if not anomalous:
            mask = np.zeros(image.shape[:2], dtype=bool)
            return Sample(image, mask, None, normals[pick], conversation_for(image, mask, None, rng, confidence))
        try:
            pair = anomalous_pair(image, OtherImages(normals, pick, load), params, rng)
        except SimulationError:
            pair = None
        if pair is not None:
            conversation = conversation_for(pair[0], pair[1], pair[2], rng, confidence)
            return Sample(pair[0], pair[1], pair[2], normals[pick], conversation)
        tried.append(normals[pick].name)
    raise SimulationError(f"sample {index}: no visible anomaly on {MAX_DRAWS} normal images ({', '.join(tried)})")


def sample_name(index: int) -> str:
    """'000042.png'."""
    return f"{index:06d}.png"


def sample_record(index: int, sample: Sample, category: str | None) -> dict[str, Any]:
    """The JSONL line of a sample (see the simulation.conversations docstring)."""
    name = sample_name(index)
    return {
        "id": f"{index:06d}",
        "image": f"{IMAGES}/{name}",
        "mask": f"{MASKS}/{name}",
        "category": category,
        **sample.conversation,
    }


def png_bytes(array: np.ndarray) -> bytes:
    """(H, W) or (H, W, 3) uint8 array encoded as PNG at PNG_COMPRESS_LEVEL."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def write_sample(out: Path, index: int, sample: Sample, category: str | None, jsonl: IO[str]) -> dict[str, Any]:
    """Image and mask PNGs, then the JSONL line last, so a listed sample always has both files."""
    write_bytes_atomic(out / IMAGES / sample_name(index), png_bytes(sample.image))
    write_bytes_atomic(out / MASKS / sample_name(index), png_bytes(sample.mask.astype(np.uint8) * 255))
    record = sample_record(index, sample, category)
    jsonl.write(json.dumps(record, ensure_ascii=False) + "\n")
    jsonl.flush()
    return record


# ---------------------------------------------------------------- parameters and the manifest


def check_arguments(normals: Sequence[Path], n: int, seed: int, anomaly_fraction: float, size: int | None) -> None:
    """Raise WriterError on arguments no dataset can be written from."""
    if not normals:
        raise WriterError("normals: no normal images given")
    if n < 1:
        raise WriterError(f"n: need at least 1 sample, got {n}")
    if seed < 0:
        raise WriterError(f"seed: must be >= 0, got {seed}")
    if not 0.0 <= anomaly_fraction <= 1.0:
        raise WriterError(f"anomaly_fraction: must be in [0, 1], got {anomaly_fraction}")
    if size is not None and size < MIN_SIDE:
        raise WriterError(f"size: must be at least {MIN_SIDE} px, got {size}")


def dataset_header(
    normals: Sequence[Path], n: int, seed: int, category: str | None, anomaly_fraction: float, size: int | None
) -> dict[str, Any]:
    """What must match for a folder to be resumed: format, parameters and the simulation bounds."""
    parameters = {
        "normals": [str(path.resolve()) for path in normals],
        "normals_sha256": normals_fingerprint(normals),
        "n": n,
        "seed": seed,
        "category": category,
        "anomaly_fraction": anomaly_fraction,
        "size": size,
    }
    sim_params = dataclasses.asdict(load_params(category))
    return json.loads(json.dumps({"format": FORMAT, "parameters": parameters, "sim_params": sim_params}))


def normals_fingerprint(normals: Sequence[Path]) -> str:
    """sha256 over the normal images' bytes in order: an edited normal changes every sample drawn from it."""
    digest = hashlib.sha256()
    for path in normals:
        try:
            data = path.read_bytes()
        except OSError as err:
            raise WriterError(f"{path}: cannot read normal image ({err.strerror})") from err
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def header_differences(found: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Names of the header fields that differ, e.g. ['format', 'n', 'sim_params']."""
    differences = [key for key in ("format", "sim_params") if found.get(key) != wanted[key]]
    stored = found.get("parameters")
    old = stored if isinstance(stored, dict) else {}
    differences += [key for key, value in wanted["parameters"].items() if old.get(key, ...) != value]
    return differences


def command_line(parameters: dict[str, Any], out: Path) -> str | None:
    """The `anomalygpt simulate` command that reproduces these parameters; None when no command can."""
    normals = [Path(path) for path in parameters["normals"]]
    folder = normals[0].parent
    expressible = parameters["anomaly_fraction"] == DEFAULT_ANOMALY_FRACTION and parameters["size"] is not None
    if not expressible or any(path.parent != folder for path in normals):
        return None
    try:
        if list_images([folder]) != normals:  # the CLI takes the whole folder
            return None
    except ImageError:
        return None
    words = ["anomalygpt", "simulate", "--normals", str(folder)]
    words += [] if parameters["category"] is None else ["--category", parameters["category"]]
    words += ["--out", str(out.resolve()), "--n", str(parameters["n"]), "--seed", str(parameters["seed"])]
    return shlex.join([*words, "--size", str(parameters["size"])])


def package_versions() -> dict[str, str]:
    """Python and the versions of the packages that shape the pixels and the text."""
    versions = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def dataset_counts(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Samples per family (null family counted as 'normal'), regions, turns and intents."""
    families = dict.fromkeys(("normal", *FAMILIES), 0)
    intents: dict[str, int] = {}
    for record in records:
        families[record["family"] or "normal"] += 1
        for turn in record["turns"]:
            intents[turn["intent"]] = intents.get(turn["intent"], 0) + 1
    return {
        "samples": len(records),
        "anomalous": len(records) - families["normal"],
        "families": families,
        "regions": sum(len(record["regions"]) for record in records),
        "turns": sum(intents.values()),
        "intents": dict(sorted(intents.items())),
    }


def final_manifest(header: dict[str, Any], records: Sequence[dict[str, Any]], out: Path) -> dict[str, Any]:
    """The complete manifest.json."""
    return {
        **header,
        "complete": True,
        "counts": dataset_counts(records),
        "command": command_line(header["parameters"], out),
        "files": {"images": IMAGES, "masks": MASKS, "conversations": CONVERSATIONS, "contact_sheet": CONTACT_SHEET},
        "versions": package_versions(),
    }


# ---------------------------------------------------------------- the output folder


def prepare_folder(out: Path, header: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Complete samples already in out (empty for a new folder); WriterError for a folder that is not ours."""
    if out.exists() and not out.is_dir():
        raise WriterError(f"{out}: exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return {}
    check_manifest(out, header)
    check_entries(out, header["parameters"]["n"])
    records = read_records(out / CONVERSATIONS, header["parameters"]["n"])
    return {
        index: record
        for index, record in records.items()
        if (out / IMAGES / sample_name(index)).is_file() and (out / MASKS / sample_name(index)).is_file()
    }


def check_manifest(out: Path, header: dict[str, Any]) -> None:
    """Refuse a non-empty folder without our manifest, or with one written for other parameters."""
    path = out / MANIFEST
    if not path.is_file():
        raise WriterError(f"{out}: folder is not empty and has no {MANIFEST}; give a new or empty folder")
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WriterError(f"{path}: unreadable manifest ({err}); give a new or empty folder") from err
    if not isinstance(found, dict) or found.get("format") != FORMAT:
        raise WriterError(f"{path}: not a manifest written by anomalygpt simulate ({FORMAT})")
    differences = header_differences(found, header)
    if differences:
        raise WriterError(
            f"{out}: holds a dataset made with different {', '.join(differences)}; "
            "re-run with the same parameters to resume, or give a new folder"
        )


def check_entries(out: Path, n: int) -> None:
    """Refuse files this writer did not write; remove temp files left by a killed run."""
    for entry in sorted(out.iterdir()):
        folder_wanted = entry.name in (IMAGES, MASKS)
        if TEMP_FILE.match(entry.name) and entry.is_file():
            entry.unlink()
        elif entry.name not in OWN_ENTRIES or entry.is_dir() != folder_wanted:
            raise WriterError(f"{entry}: not written by anomalygpt simulate; give a new or empty folder")
        elif folder_wanted:
            check_sample_files(entry, n)


def check_sample_files(folder: Path, n: int) -> None:
    """Every entry of images/ or masks/ must be one of the n sample PNGs (or a stale temp file)."""
    for entry in sorted(folder.iterdir()):
        match = SAMPLE_FILE.match(entry.name)
        if TEMP_FILE.match(entry.name) and entry.is_file():
            entry.unlink()
        elif match is None or int(match.group(1)) >= n or not entry.is_file():
            raise WriterError(f"{entry}: not written by anomalygpt simulate; give a new or empty folder")


def read_records(path: Path, n: int) -> dict[int, dict[str, Any]]:
    """JSONL records by index; a line cut short by a crash, or out of range, is skipped (redone)."""
    if not path.is_file():
        return {}
    records = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            index = int(record["id"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        if 0 <= index < n:
            records[index] = record
    return records


def jsonl_text(records: dict[int, dict[str, Any]]) -> str:
    """All records, one JSON line each, in index order."""
    return "".join(json.dumps(records[index], ensure_ascii=False) + "\n" for index in sorted(records))


def write_dataset(
    normals: Sequence[Path],
    out: Path,
    n: int,
    seed: int,
    category: str | None,
    anomaly_fraction: float = DEFAULT_ANOMALY_FRACTION,
    size: int | None = 256,
    progress: bool = True,
) -> Path:
    """Write (or resume) n samples into out; returns the manifest path."""
    normals, out = [Path(path) for path in normals], Path(out)
    check_arguments(normals, n, seed, anomaly_fraction, size)
    header = dataset_header(normals, n, seed, category, anomaly_fraction, size)
    records = prepare_folder(out, header)
    # Parameters go to disk before any sample, so a crashed run can only be resumed with the same ones.
    write_json_atomic(out / MANIFEST, {**header, "complete": False})
    write_text_atomic(out / CONVERSATIONS, jsonl_text(records))
    params = load_params(category)
    load = functools.lru_cache(maxsize=SOURCE_CACHE)(functools.partial(load_square, size=size))
    with (out / CONVERSATIONS).open("a", encoding="utf-8") as jsonl:
        for index in missing_samples(n, records, progress):
            sample = draw_sample(normals, index, seed, params, anomaly_fraction, load)
            records[index] = write_sample(out, index, sample, category, jsonl)
    write_text_atomic(out / CONVERSATIONS, jsonl_text(records))
    write_contact_sheet(out, records)
    return write_json_atomic(out / MANIFEST, final_manifest(header, [records[i] for i in range(n)], out))


def missing_samples(n: int, records: dict[int, dict[str, Any]], progress: bool) -> Iterator[int]:
    """Indices still to write, ticking a tqdm bar that starts at the samples already done."""
    with tqdm(total=n, initial=len(records), disable=not progress, desc="simulate", unit="sample") as bar:
        for index in range(n):
            if index not in records:
                yield index
                bar.update()


# ---------------------------------------------------------------- contact sheet


def sheet_indices(records: dict[int, dict[str, Any]], count: int = SHEET_SAMPLES) -> list[int]:
    """Up to count samples, anomalous and normal alternating, so both kinds can be judged."""
    anomalous = [i for i in sorted(records) if records[i]["family"] is not None]
    normal = [i for i in sorted(records) if records[i]["family"] is None]
    mixed = [i for pair in zip(anomalous, normal, strict=False) for i in pair]
    rest = anomalous[len(normal) :] + normal[len(anomalous) :]
    return sorted((mixed + rest)[:count])


def write_contact_sheet(out: Path, records: dict[int, dict[str, Any]]) -> Path:
    """contact_sheet.png: image, mask with boxes, and the first question and answer of ~12 samples."""
    font = ImageFont.load_default()
    cells = [sheet_cell(out, records[index], font) for index in sheet_indices(records)]
    rows = [cells[start : start + SHEET_COLUMNS] for start in range(0, len(cells), SHEET_COLUMNS)]
    cell_w, cell_h = cells[0].size
    sheet = Image.new("RGB", (cell_w * min(len(cells), SHEET_COLUMNS), cell_h * len(rows)), "white")
    for row, row_cells in enumerate(rows):
        for column, cell in enumerate(row_cells):
            sheet.paste(cell, (column * cell_w, row * cell_h))
    return write_png_atomic(out / CONTACT_SHEET, np.asarray(sheet))


def sheet_cell(out: Path, record: dict[str, Any], font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> Image.Image:
    """One sample: image and mask thumbnails side by side, caption and the first turns below."""
    width = 2 * THUMB + 3 * PAD
    cell = Image.new("RGB", (width, THUMB + 2 * PAD + TEXT_LINES * LINE_HEIGHT + PAD), "white")
    with Image.open(out / record["image"]) as image_file, Image.open(out / record["mask"]) as mask_file:
        image, mask = image_file.convert("RGB"), mask_file.convert("RGB")
    cell.paste(image.resize((THUMB, THUMB), Image.Resampling.BILINEAR), (PAD, PAD))
    cell.paste(boxed_mask(mask, record["regions"]), (2 * PAD + THUMB, PAD))
    caption = f"#{record['id']} {record['family'] or 'normal'}, {len(record['regions'])} region(s)"
    text = [caption, *turn_lines(record["turns"], font, width - 2 * PAD)]
    draw = ImageDraw.Draw(cell)
    for line_number, line in enumerate(text[:TEXT_LINES]):
        draw.text((PAD, THUMB + 2 * PAD + line_number * LINE_HEIGHT), line, fill="black", font=font)
    return cell


def turn_lines(
    turns: Sequence[dict[str, Any]], font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int
) -> list[str]:
    """The first turn's Q and A wrapped to width, then later turns while they fit whole in TEXT_LINES - 1."""
    lines: list[str] = []
    for number, turn in enumerate(turns):
        more = wrapped(f"Q: {turn['question']}", font, width) + wrapped(f"A: {turn['answer']}", font, width)
        if number and len(lines) + len(more) > TEXT_LINES - 1:
            break
        lines += more
    return lines


def boxed_mask(mask: Image.Image, regions: Sequence[dict[str, Any]]) -> Image.Image:
    """THUMB x THUMB mask thumbnail with every region's box outlined."""
    scale_x, scale_y = THUMB / mask.width, THUMB / mask.height
    thumb = mask.resize((THUMB, THUMB), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(thumb)
    for region in regions:
        x0, y0, x1, y1 = region["box"]
        corners = (x0 * scale_x, y0 * scale_y, max(x0 * scale_x, x1 * scale_x - 1), max(y0 * scale_y, y1 * scale_y - 1))
        draw.rectangle(corners, outline=BOX_COLOUR)
    return thumb


def wrapped(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Text broken into lines no wider than width pixels in font."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(candidate) <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines


# ---------------------------------------------------------------- CLI entry


def run_simulate(normals_dir: str, out: str, n: int, seed: int, category: str | None, size: int) -> int:
    """`anomalygpt simulate`: write the dataset, print a summary; 0 on success, 2 for bad input, 1 on failure."""
    try:
        normals = normal_images(normals_dir)
        if category is not None and category not in known_categories():
            print(f"anomalygpt simulate: note: no parameters for category {category!r}; using generic", file=sys.stderr)
        manifest = write_dataset(normals, Path(out), n, seed, category, size=size)
    except (WriterError, ImageError, ParamsError) as err:
        print(f"anomalygpt simulate: error: {err}", file=sys.stderr)
        return 2
    except SimulationError as err:
        print(f"anomalygpt simulate: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"anomalygpt simulate: error: {err.filename or out}: {err.strerror or err}", file=sys.stderr)
        return 1
    print(summary_line(json.loads(manifest.read_text(encoding="utf-8")), manifest))
    return 0


def normal_images(normals_dir: str) -> list[Path]:
    """Images directly inside normals_dir; WriterError / ImageError naming the folder otherwise."""
    folder = Path(normals_dir)
    if not folder.exists():
        raise WriterError(f"--normals {normals_dir}: no such folder")
    if not folder.is_dir():
        raise WriterError(f"--normals {normals_dir}: not a folder")
    return list_images([folder])


def summary_line(manifest: dict[str, Any], path: Path) -> str:
    """'wrote 100 samples (52 anomalous: nsa 20, ...) to OUT; manifest OUT/manifest.json'."""
    counts = manifest["counts"]
    families = ", ".join(f"{name} {count}" for name, count in counts["families"].items() if name != "normal" and count)
    anomalous = f"{counts['anomalous']} anomalous" + (f": {families}" if families else "")
    return f"wrote {counts['samples']} samples ({anomalous}) to {path.parent}; manifest {path}"
