"""Robust image decoding to (H, W, 3) uint8 RGB, image listing, and atomic file writes."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import secrets
import struct
import sys
import threading
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

import cv2
import numpy as np
from PIL import Image, ImageFile, TiffImagePlugin, UnidentifiedImageError

MIN_SIDE = 16  # px; smaller images carry less than one backbone patch
MAX_PIXELS = 40_000_000  # checked from the header, before any pixel is decoded
# Transparent pixels are composited over mid-grey: black hides dark products (and alpha-only drawings
# whose RGB is 0), white hides light ones, and choosing per image could give a product's references
# and its test image different backgrounds, which the detector would report as an anomaly.
ALPHA_BACKGROUND = 128
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# The PIL decoders that files and bytes may reach (JPEG includes MPO, the multi-frame JPEG cameras write); the other
# parsers PIL ships (EPS runs Ghostscript, PSD, FITS...) are never tried on untrusted input.
PIL_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
EXIF_ORIENTATION_TAG = 0x0112
TIFF_SAMPLE_FORMAT_TAG, TIFF_COMPRESSION_TAG = 339, 259
TIFF_SIGNED_INTEGER = 2  # SampleFormat value of signed integer pixels
TIFF_LOSSY_COMPRESSIONS = {6: "JPEG-compressed TIFF", 7: "JPEG-compressed TIFF", 34892: "lossy-JPEG TIFF"}
UINT16_MAX = 65535
UNSIGNED_16_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Float pixels whose maximum lies in (1, 2] could be a [0, 1] image that overshoots (a Lanczos resize) or an
# almost black [0, 255] one; reading either way could be silently wrong, so they are refused.
AMBIGUOUS_FLOAT_MAX = 2.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # IHDR colour type -> samples per pixel
ADAM7_PASSES = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
INFLATE_STEP = 1 << 20  # bytes of inflated PNG data held at once while checking it
HASH_STEP = 1 << 20  # bytes read at a time while hashing a file

ImageSource = str | Path | bytes | np.ndarray | Image.Image
Item = TypeVar("Item")
Result = TypeVar("Result")
# What PIL and its codecs raise on corrupt data; struct/zlib errors are not OSError subclasses.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)


class ImageError(ValueError):
    """An image that cannot be used; the message is one line naming the file and the problem."""


def load_image(source: ImageSource, *, name: str | None = None) -> np.ndarray:
    """Decode any supported source to a C-contiguous (H, W, 3) uint8 RGB array, EXIF orientation applied.

    A file is decoded completely or not at all: a truncated file, a PNG whose chunk CRCs or zlib checksum fail or
    whose pixel data is shorter than its header says, or any decoder error is an ImageError (PIL's
    LOAD_TRUNCATED_IMAGES is never honoured). Only PNG, JPEG, BMP, TIFF and WebP files are decoded.
    Value ranges: uint8 as is; bool and 1-bit 0/1 -> 0/255; unsigned 16-bit (PNG, TIFF, arrays) scaled by
    255/65535 over the full 16-bit range; float read as [0, 1] when every value lies in [0, 1] and as [0, 255]
    when they lie in [0, 255] with a maximum above 2. Refused, with an ImageError: signed integers (int8/int16
    TIFFs, int arrays), 32-bit integers (uint32/int32 TIFFs, PIL mode "I" images), NaN or infinite floats,
    negative floats, floats above 255, and floats whose maximum lies in (1, 2] (a [0, 1] image that overshoots
    and a black [0, 255] one cannot be told apart). Transparency is composited over ALPHA_BACKGROUND grey.
    """
    label = name if name is not None else _source_label(source)
    if isinstance(source, np.ndarray):
        _check_array_shape(source, label)
        _check_size(source.shape[1], source.shape[0], label)
        rgb = _array_to_rgb8(source, label)
        return rgb.copy() if np.shares_memory(rgb, source) else rgb  # never alias the caller's array
    if isinstance(source, Image.Image):
        _check_size(source.width, source.height, label)
        return _decode_pil(source, label)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(source), label)
    if isinstance(source, (str, Path)):
        return _decode_file(Path(source), label)[0]
    raise TypeError(f"{label}: unsupported image source type {type(source).__name__}")


def load_source(source: ImageSource, *, name: str | None = None) -> tuple[np.ndarray, str | None]:
    """load_image, and for a file the sha256 of the bytes decoded (None for anything else): read again through the
    same open file, so a file replaced meanwhile (another renamed over it) cannot lend its hash to these pixels."""
    if isinstance(source, (str, Path)):
        return _decode_file(Path(source), name if name is not None else _source_label(source), digest=True)
    return load_image(source, name=name), None


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (hex)."""
    with Path(path).open("rb") as handle:
        return stream_sha256(handle)


def stream_sha256(handle: IO[bytes]) -> str:
    """The sha256 (hex) of what is left to read in a binary file, read HASH_STEP bytes at a time."""
    digest = hashlib.sha256()
    while chunk := handle.read(HASH_STEP):
        digest.update(chunk)
    return digest.hexdigest()


def _source_label(source: object) -> str:
    """Name used in error messages when the caller gave none."""
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, Image.Image):
        return str(getattr(source, "filename", "") or "<PIL image>")
    if isinstance(source, np.ndarray):
        return "<array>"
    return "<bytes>"


def _decode_file(path: Path, label: str, digest: bool = False) -> tuple[np.ndarray, str | None]:
    """Decode an image file after checking that it is a non-empty regular file; with `digest`, the sha256 of the
    bytes read (from the same open file), else None."""
    if not path.exists():
        raise ImageError(f"{label}: no such file")
    if path.is_dir():
        raise ImageError(f"{label}: is a directory, not an image file")
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{label}: empty file (0 bytes)")
        with path.open("rb") as handle:
            head = handle.read(32)
            handle.seek(0)
            pixels = _decode_stream(handle, head, label)
            if not digest:
                return pixels, None
            handle.seek(0)
            return pixels, stream_sha256(handle)
    except PermissionError as exc:
        raise ImageError(f"{label}: cannot read ({exc.strerror})") from exc


def _decode_bytes(data: bytes, label: str) -> np.ndarray:
    """Decode an encoded image held in memory."""
    if not data:
        raise ImageError(f"{label}: empty file (0 bytes)")
    return _decode_stream(io.BytesIO(data), data[:32], label)


def _decode_stream(stream: IO[bytes], head: bytes, label: str) -> np.ndarray:
    """Open from a binary stream, check the header size and (PNG) every checksum, then decode."""
    with _open_pil(stream, label) as image:
        _check_size(image.width, image.height, label)
        if image.format == "PNG":
            _check_png(stream, label)
        return _decode_pil(image, label, head, stream)


def _check_png(stream: IO[bytes], label: str) -> None:
    """Every chunk's CRC, the whole IDAT zlib stream to its Adler-32 and its exact size, and IEND.

    PIL checks none of these: it skips IDAT CRCs, stops inflating once it has the pixels it needs, and fills the
    rows of a stream that ends early with zeros, so a flipped bit decodes to wrong pixels and a short or cut file
    to a partly black image. Inflated data is counted and dropped, never held whole.
    """
    try:
        stream.seek(len(PNG_SIGNATURE))
        _walk_png_chunks(stream, label)
    except ImageError:
        raise
    except DECODE_ERRORS as exc:
        raise ImageError(f"{label}: corrupt or truncated image (PNG pixel data: {_first_line(exc)})") from exc
    finally:
        stream.seek(0)


def _walk_png_chunks(stream: IO[bytes], label: str) -> None:
    inflater = zlib.decompressobj()
    expected = 0  # inflated bytes the header declares, set from IHDR
    inflated = 0
    while True:
        header = stream.read(8)
        if len(header) < 8:
            raise ImageError(f"{label}: corrupt or truncated image (PNG ends before its IEND chunk)")
        length, kind = struct.unpack(">I4s", header)
        body, crc = stream.read(length), stream.read(4)
        if len(body) < length or len(crc) < 4:
            raise ImageError(f"{label}: corrupt or truncated image (PNG ends inside its {_chunk_name(kind)} chunk)")
        if zlib.crc32(kind + body) != int.from_bytes(crc, "big"):
            raise ImageError(f"{label}: corrupt image (PNG {_chunk_name(kind)} chunk fails its CRC check)")
        if kind == b"IHDR":
            expected = _png_raw_size(body)
        elif kind == b"IDAT":
            inflated += _inflate(inflater, body, expected - inflated, label)
        elif kind == b"IEND":
            break
    if not inflater.eof or inflated != expected:
        raise ImageError(
            f"{label}: corrupt or truncated image (PNG pixel data holds {inflated:,} bytes, its header declares "
            f"{expected:,})"
        )


def _chunk_name(kind: bytes) -> str:
    return kind.decode("ascii", "backslashreplace")


def _png_raw_size(ihdr: bytes) -> int:
    """Bytes of a PNG's inflated pixel data: each row of each (Adam7) pass, plus one filter byte per row."""
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", ihdr[:13])
    bits = PNG_CHANNELS.get(colour, 4) * depth
    passes = ADAM7_PASSES if interlace else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        columns, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)  # ceiling divisions
        total += rows * (1 + (columns * bits + 7) // 8) if columns > 0 and rows > 0 else 0
    return total


def _inflate(inflater: Any, data: bytes, allowed: int, label: str) -> int:
    """Inflate data and drop it; returns the inflated byte count. Inflating beyond `allowed` (a decompression
    bomb, or data for another image) is corrupt, found within one step of INFLATE_STEP bytes."""
    count = 0
    while data and not inflater.eof:
        count += len(inflater.decompress(data, INFLATE_STEP))
        data = inflater.unconsumed_tail
        if count > allowed:
            raise ImageError(f"{label}: corrupt image (PNG holds more pixel data than its header declares)")
    return count


def _open_pil(stream: IO[bytes], label: str) -> Image.Image:
    """Image.open with PIL's failures turned into ImageError; reads only the header."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # PIL's notes on corrupt metadata: the error says enough
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(stream, formats=PIL_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{label}: too large: {_first_line(exc)} (limit here: {MAX_PIXELS:,})") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(
            f"{label}: not a readable image (cannot identify image file; supported: PNG, JPEG, BMP, TIFF, WebP)"
        ) from exc
    except DECODE_ERRORS as exc:
        raise ImageError(f"{label}: not a readable image ({_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    """Exception text squeezed onto one line."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _check_size(width: int, height: int, label: str) -> None:
    """Reject images too small to inspect or too large to decode safely."""
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"{label}: too large: {width}x{height} px ({width * height:,} pixels), limit is {MAX_PIXELS:,}"
        )
    if min(width, height) < MIN_SIDE:
        raise ImageError(f"{label}: too small: {width}x{height} px, need at least {MIN_SIDE} px per side")


def _decode_pil(image: Image.Image, label: str, head: bytes = b"", stream: IO[bytes] | None = None) -> np.ndarray:
    """Decode pixels (PIL, or OpenCV for 16-bit RGB), convert to RGB8 and apply EXIF orientation.

    head (the first bytes) and stream (the encoded file) are given for files and bytes, not PIL images.
    """
    try:
        _check_pixel_format(image, label)
        with _no_partial_decodes(), _stderr_silenced(image.format == "TIFF"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. "Corrupt EXIF data", printed beside the one error line
            if stream is not None and isinstance(image, ImageFile.ImageFile) and _is_deep_rgb(image, head):
                array = _decode_deep_rgb(stream, label)
            else:
                image.load()
                array = _pil_pixels(image)
            orientation = _orientation(image)  # after the pixels: reading EXIF may decode, and must not hide errors
    except ImageError:
        raise
    except DECODE_ERRORS as exc:
        raise ImageError(f"{label}: corrupt or truncated image ({_first_line(exc)})") from exc
    return np.ascontiguousarray(_apply_orientation(_array_to_rgb8(array, label), orientation))


_TRUNCATION_LOCK = threading.Lock()


@contextmanager
def _no_partial_decodes() -> Iterator[None]:
    """Decode with PIL's process-wide LOAD_TRUNCATED_IMAGES off, even if another library turned it on."""
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        yield
        return
    with _TRUNCATION_LOCK:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = True


_STDERR_LOCK = threading.Lock()


@contextmanager
def _stderr_silenced(active: bool) -> Iterator[None]:
    """File descriptor 2 pointed at /dev/null while active: libtiff (PIL's and OpenCV's) prints its complaints
    about a corrupt file there, beside the one error line. The descriptor is process-wide, hence the lock."""
    if not active:
        yield
        return
    with _STDERR_LOCK:
        sys.stderr.flush()
        try:
            saved = os.dup(2)
        except OSError:  # no descriptor 2 (a windowed process): nothing to silence
            yield
            return
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(null)


def _check_pixel_format(image: Image.Image, label: str) -> None:
    """Refuse pixel types without a defined brightness range (signed or 32-bit integers), from the header."""
    signed = isinstance(image, TiffImagePlugin.TiffImageFile) and TIFF_SIGNED_INTEGER in _tag_tuple(
        image, TIFF_SAMPLE_FORMAT_TAG
    )
    if signed or (image.mode.startswith("I;16") and image.mode not in UNSIGNED_16_BIT_MODES):
        raise ImageError(
            f"{label}: signed integer pixels have no defined brightness range; save it as 8- or 16-bit unsigned"
        )
    if image.mode == "I":
        raise ImageError(
            f"{label}: 32-bit integer pixels have no defined brightness range; save it as 8- or 16-bit unsigned"
        )


def _tag_tuple(image: TiffImagePlugin.TiffImageFile, tag: int) -> tuple[Any, ...]:
    value = image.tag_v2.get(tag, ())
    return value if isinstance(value, tuple) else (value,)


def _orientation(image: Image.Image) -> int:
    """EXIF orientation 1-8; 1 (as stored) when absent or malformed (the pixels are decoded before this)."""
    try:
        value = int(image.getexif().get(EXIF_ORIENTATION_TAG, 1))
    except (TypeError, ValueError, *DECODE_ERRORS):
        return 1
    return value if 1 <= value <= 8 else 1


def _is_deep_rgb(image: ImageFile.ImageFile, head: bytes) -> bool:
    """True for 16-bit-per-channel RGB(A) PNG/TIFF, which PIL silently truncates to the high byte."""
    if image.mode not in ("RGB", "RGBA"):
        return False
    if image.format == "PNG":
        return len(head) > 24 and head[24] == 16  # IHDR bit depth, right after width and height
    if isinstance(image, TiffImagePlugin.TiffImageFile):
        bits = _tag_tuple(image, 258)  # BitsPerSample
        return len(bits) >= 3 and all(b == 16 for b in bits)
    return False


def _decode_deep_rgb(stream: IO[bytes], label: str) -> np.ndarray:
    """Decode 16-bit RGB(A) with OpenCV, keeping all 16 bits; returns (H, W, 3|4) uint16 RGB(A)."""
    stream.seek(0)
    data = np.frombuffer(stream.read(), dtype=np.uint8)
    decoded = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)  # (H, W, 3|4) BGR(A); ignores EXIF orientation
    if decoded is None or decoded.ndim != 3 or decoded.dtype != np.uint16:
        raise ImageError(f"{label}: corrupt or truncated image (16-bit RGB decode failed)")
    order = [2, 1, 0, 3][: decoded.shape[2]]
    return decoded[:, :, order]


def _pil_pixels(image: Image.Image) -> np.ndarray:
    """Pixels as (H, W) uint8/uint16/float32 or (H, W, 3|4) uint8, transparency kept as alpha."""
    mode = image.mode
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16)
    if mode == "F":
        return np.asarray(image, dtype=np.float32)
    if "transparency" in image.info or mode in ("P", "PA", "LA", "La", "RGBA", "RGBa"):
        return np.asarray(image.convert("RGBA"))
    if mode in ("1", "L"):
        return np.asarray(image.convert("L"))
    return np.asarray(image.convert("RGB"))


def _check_array_shape(array: np.ndarray, label: str) -> None:
    """Accept (H, W), (H, W, 1), (H, W, 3) and (H, W, 4) only."""
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))):
        raise ImageError(
            f"{label}: unsupported array shape {tuple(array.shape)}; expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"
        )


def _array_to_rgb8(array: np.ndarray, label: str) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8/uint16/bool/float -> (H, W, 3) uint8."""
    _check_array_shape(array, label)
    pixels = _to_uint8(array[:, :, None] if array.ndim == 2 else array, label)  # (H, W, C)
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    elif pixels.shape[2] == 4:
        pixels = _composite(pixels)
    return np.ascontiguousarray(pixels)


def _to_uint8(pixels: np.ndarray, label: str) -> np.ndarray:
    """Scale uint16 by 255/65535, floats from [0, 1] or [0, 255] (see load_image), bools to 0/255; uint8 as is."""
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == np.bool_:
        return pixels.astype(np.uint8) * 255
    if pixels.dtype == np.uint16:
        return np.rint(pixels.astype(np.float64) * (255.0 / UINT16_MAX)).astype(np.uint8)
    if np.issubdtype(pixels.dtype, np.floating):
        return np.rint(pixels.astype(np.float64) * _float_scale(pixels, label)).astype(np.uint8)
    raise ImageError(
        f"{label}: unsupported pixel dtype {pixels.dtype} (no defined brightness range); "
        "expected uint8, uint16, bool or float"
    )


def _float_scale(pixels: np.ndarray, label: str) -> float:
    """255 for [0, 1] data, 1 for [0, 255] data; anything else is an ImageError (see load_image)."""
    finite = np.isfinite(pixels)
    if not finite.all():
        raise ImageError(f"{label}: {int(pixels.size - finite.sum())} pixel values are NaN or infinite")
    low, high = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
    if low < 0.0 or high > 255.0:
        raise ImageError(f"{label}: float pixel values from {low:g} to {high:g}; expected [0, 1] or [0, 255]")
    if 1.0 < high <= AMBIGUOUS_FLOAT_MAX:
        raise ImageError(
            f"{label}: float pixel values up to {high:g} are ambiguous ([0, 1] overshooting, or a black [0, 255] "
            "image); clip to [0, 1] or scale to [0, 255]"
        )
    return 255.0 if high <= 1.0 else 1.0


def _composite(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 -> (H, W, 3) uint8 over the ALPHA_BACKGROUND grey."""
    alpha = rgba[:, :, 3:].astype(np.float64) / 255.0  # (H, W, 1)
    rgb = rgba[:, :, :3].astype(np.float64) * alpha + ALPHA_BACKGROUND * (1.0 - alpha)
    return np.rint(rgb).astype(np.uint8)


def _apply_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1-8) to (H, W, C) pixels, as PIL's ImageOps.exif_transpose does."""
    if orientation == 2:
        return pixels[:, ::-1]
    if orientation == 3:
        return pixels[::-1, ::-1]
    if orientation == 4:
        return pixels[::-1]
    if orientation == 5:
        return pixels.transpose(1, 0, 2)
    if orientation == 6:
        return np.rot90(pixels, k=-1)
    if orientation == 7:
        return pixels[::-1, ::-1].transpose(1, 0, 2)
    if orientation == 8:
        return np.rot90(pixels, k=1)
    return pixels


def lossy_encoding(path: str | Path) -> str | None:
    """'JPEG', 'lossy WebP' or a lossy TIFF compression when the file is stored lossily; None when lossless.

    Told from the format (and, for WebP, from its VP8 (lossy) or VP8L (lossless) bitstream chunk), not from the
    pixels; an unreadable file is None (decoding it reports the problem).
    """
    try:
        with Image.open(path, formats=PIL_FORMATS) as image:
            if image.format in ("JPEG", "MPO"):
                return "JPEG"
            if image.format == "WEBP":
                return "lossy WebP" if _webp_is_lossy(Path(path)) else None
            if isinstance(image, TiffImagePlugin.TiffImageFile):
                compression = _tag_tuple(image, TIFF_COMPRESSION_TAG)
                return TIFF_LOSSY_COMPRESSIONS.get(compression[0]) if compression else None
    except (UnidentifiedImageError, Image.DecompressionBombError, *DECODE_ERRORS):
        return None
    return None


def _webp_is_lossy(path: Path) -> bool:
    """True when the first image bitstream in the RIFF container is VP8 (lossy); VP8L is lossless."""
    with path.open("rb") as handle:
        handle.seek(12)  # after "RIFF", the size and "WEBP"
        while len(header := handle.read(8)) == 8:
            kind, size = header[:4], int.from_bytes(header[4:], "little")
            if kind in (b"VP8 ", b"VP8L"):
                return kind == b"VP8 "
            # An animation frame's own chunks start after its 16-byte frame header; other chunks are skipped.
            handle.seek(16 if kind == b"ANMF" else size + (size & 1), os.SEEK_CUR)
    return False


def safe_text(text: object) -> str:
    """str(text) safe to print on a terminal: control and other unprintable characters (ANSI escapes, bidi
    overrides, undecodable file-name bytes) are shown as Python escapes, e.g. '\\x1b'."""
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii") for char in str(text))


def list_images(paths: Sequence[str | Path]) -> list[Path]:
    """Expand folders (sorted, non-recursive, visible image files only); keep files as given."""
    if isinstance(paths, (str, Path)):
        paths = [paths]  # a bare string is a Sequence of characters; never what the caller meant
    if not paths:
        raise ImageError("no image paths given")
    images: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            images.extend(_folder_images(path))
        elif not path.exists():
            raise ImageError(f"{raw}: no such file or folder")
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ImageError(f"{raw}: not an image file (suffix must be one of {' '.join(IMAGE_SUFFIXES)})")
        else:
            images.append(path)
    return images


def _folder_images(folder: Path) -> list[Path]:
    """Visible image files directly inside folder, sorted by name."""
    found = sorted(
        entry
        for entry in folder.iterdir()
        if entry.is_file() and not entry.name.startswith(".") and entry.suffix.lower() in IMAGE_SUFFIXES
    )
    if not found:
        raise ImageError(f"{folder}: folder has no images ({' '.join(IMAGE_SUFFIXES)})")
    return found


def _write_atomic(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write through a temp file in the target folder, then rename over path; the temp never survives."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    # os.open with 0o666 lets the umask decide permissions, as a plain open() would.
    descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return target


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Atomically replace path with data."""

    def write(handle: IO[bytes]) -> None:
        handle.write(data)

    return _write_atomic(path, write)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Atomically replace path with UTF-8 text."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_lines_atomic(path: str | Path, lines: Iterable[str]) -> Path:
    """Atomically replace path with UTF-8 text written piece by piece as `lines` yields it (memory stays bounded
    however long the text); an error while iterating leaves path as it was."""

    def write(handle: IO[bytes]) -> None:
        for line in lines:
            handle.write(line.encode("utf-8"))

    return _write_atomic(path, write)


def loading_bars_on_terminal_only() -> None:
    """transformers' weight-loading progress bars on an interactive stderr only: in logs and pipes they are noise."""
    if not sys.stderr.isatty():
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Atomically write obj as indented JSON; NaN/Infinity or non-JSON types fail before any file exists."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False, ensure_ascii=False)
    except ValueError as exc:
        raise ValueError(f"{path}: cannot write JSON: NaN or Infinity is not valid JSON ({exc})") from exc
    except TypeError as exc:
        raise TypeError(f"{path}: cannot write JSON: {exc}") from exc
    # A lone surrogate (a file name's undecodable byte) cannot be UTF-8; as a JSON \\u escape it reads back the same.
    return write_bytes_atomic(path, (text + "\n").encode("utf-8", "backslashreplace"))


def write_png_atomic(path: str | Path, array: np.ndarray, compress_level: int = 6) -> Path:
    """Atomically write a (H, W) grey or (H, W, 3) RGB uint8 array as PNG (png_bytes)."""
    return write_bytes_atomic(path, png_bytes(array, compress_level, str(path)))


def png_bytes(array: np.ndarray, compress_level: int = 6, name: str = "image") -> bytes:
    """A (H, W) grey or (H, W, 3) RGB uint8 array encoded as PNG (zlib level 0-9: 6 is PIL's default; 1 encodes an
    overlay figure in about a third of the time for a fifth more bytes)."""
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f"{name}: PNG needs a uint8 (H, W) or (H, W, 3) array, got {array.dtype} {tuple(array.shape)}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def ordered_map(function: Callable[[Item], Result], items: Iterable[Item], threads: int) -> Iterator[Result]:
    """function(item) for each item in `threads` threads, yielded in the items' order; items are drawn lazily, at
    most 2 x threads ahead of what was yielded (an iterator of large results never piles up). For writing outputs
    beside the work that makes them: the caller's thread draws the items, the threads write. An item's exception is
    raised when its turn comes."""
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        pending: deque[Future[Result]] = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def write_npy_atomic(path: str | Path, array: np.ndarray) -> Path:
    """Atomically write array in .npy format (no pickled objects)."""
    return _write_atomic(path, lambda handle: np.save(handle, array, allow_pickle=False))


def package_dir(name: str) -> Path | None:
    """Folder of an installed package, found without importing it (some import unrelated things); None if absent."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent
