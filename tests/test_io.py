"""Tests for anomalygpt.io: decoding every supported mode, size limits, listing and atomic writes."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import time
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image, ImageFile, ImageOps

import anomalygpt.io as aio
from anomalygpt.io import (
    ImageError,
    list_images,
    load_image,
    ordered_map,
    write_bytes_atomic,
    write_json_atomic,
    write_npy_atomic,
    write_png_atomic,
    write_text_atomic,
)

# 16-bit values and their value*255/65535 rounding; PIL's own high-byte truncation differs on 386, 511, 65280.
DEEP_VALUES = np.array([0, 385, 386, 511, 32767, 65280, 65535], dtype=np.uint16)
DEEP_EXPECTED = np.array([0, 1, 2, 2, 127, 254, 255], dtype=np.uint8)


def random_rgb(height: int = 24, width: int = 32, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 noise."""
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    """image encoded in memory."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def deep_tile(height: int = 16, width: int = 21) -> np.ndarray:
    """(H, W) uint16 with DEEP_VALUES repeated along each row."""
    return np.tile(DEEP_VALUES, (height, width // DEEP_VALUES.size))


def deep_expected(values: np.ndarray) -> np.ndarray:
    """Expected 8-bit value of each 16-bit value, looked up from the hand-computed table."""
    return DEEP_EXPECTED[np.searchsorted(DEEP_VALUES, values)]


def mode_of(path: Path) -> str:
    """PIL mode of an image file."""
    with Image.open(path) as opened:
        return opened.mode


def error_text(source: object, **kwargs: str) -> str:
    """The ImageError message load_image raises for source."""
    with pytest.raises(ImageError) as info:
        load_image(source, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    return message


# --- plain decoding -------------------------------------------------------------------------------


def test_rgb_png_from_path_str_bytes_and_pil(tmp_path: Path) -> None:
    pixels = random_rgb()
    path = tmp_path / "ok.png"
    Image.fromarray(pixels).save(path)
    with Image.open(path) as opened:
        for source in (path, str(path), path.read_bytes(), opened):
            out = load_image(source)
            assert out.dtype == np.uint8 and out.flags.c_contiguous
            np.testing.assert_array_equal(out, pixels)


def test_grey_and_one_bit_and_cmyk() -> None:
    grey = random_rgb()[:, :, 0]
    out = load_image(encoded(Image.fromarray(grey), "PNG"))
    np.testing.assert_array_equal(out, np.repeat(grey[:, :, None], 3, axis=2))
    bits = grey > 127
    out = load_image(encoded(Image.fromarray(bits), "PNG"))
    np.testing.assert_array_equal(out[:, :, 1], np.where(bits, 255, 0))
    cmyk = Image.new("CMYK", (16, 16), (0, 0, 0, 0))  # no ink: white
    assert load_image(encoded(cmyk, "TIFF")).min() == 255


def test_rgba_composited_over_mid_grey() -> None:
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    rgba[0, 1] = (255, 255, 255, 0)
    rgba[0, 2] = (255, 0, 0, 128)
    out = load_image(encoded(Image.fromarray(rgba), "PNG"))
    assert out[0, 0].tolist() == [10, 20, 30]
    assert out[0, 1].tolist() == [128, 128, 128]  # fully transparent: the background
    assert out[0, 2].tolist() == [192, 64, 64]  # 255*128/255 + 128*127/255 = 191.75; 63.75
    np.testing.assert_array_equal(load_image(rgba), out)  # (H, W, 4) arrays agree with PNG


def test_grey_alpha_and_palette_with_transparency() -> None:
    grey = Image.new("L", (16, 16), 200)
    alpha = Image.new("L", (16, 16), 51)
    assert load_image(encoded(Image.merge("LA", (grey, alpha)), "PNG"))[0, 0].tolist() == [142] * 3
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([250, 10, 20, 0, 0, 255] + [0] * 762)
    palette.paste(1, (0, 0, 8, 16))
    out = load_image(encoded(palette, "PNG"))
    assert out[0, 0].tolist() == [0, 0, 255] and out[0, 15].tolist() == [250, 10, 20]
    out = load_image(encoded(palette, "PNG", transparency=1))
    assert out[0, 0].tolist() == [128, 128, 128] and out[0, 15].tolist() == [250, 10, 20]


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_rgb_keeps_all_bits(tmp_path: Path, suffix: str) -> None:
    red = deep_tile()
    rgb = np.stack([red, red[:, ::-1], np.full_like(red, 511)], axis=2)  # (H, W, 3) uint16
    path = tmp_path / f"deep{suffix}"
    assert cv2.imwrite(str(path), rgb[:, :, ::-1])
    out = load_image(path)
    np.testing.assert_array_equal(out[:, :, 0], deep_expected(red))
    np.testing.assert_array_equal(out[:, :, 1], deep_expected(red[:, ::-1]))
    assert np.all(out[:, :, 2] == 2)


def test_sixteen_bit_rgba_png(tmp_path: Path) -> None:
    rgba = np.zeros((16, 16, 4), dtype=np.uint16)
    rgba[:, :, 0] = 511
    rgba[:, :8, 3] = 65535
    path = tmp_path / "deep_rgba.png"
    assert cv2.imwrite(str(path), rgba[:, :, [2, 1, 0, 3]])
    out = load_image(path)
    assert out[0, 0].tolist() == [2, 0, 0] and out[0, 15].tolist() == [128, 128, 128]


def test_sixteen_bit_grey_modes(tmp_path: Path) -> None:
    values = deep_tile()
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    assert mode_of(path) == "I;16"
    np.testing.assert_array_equal(load_image(path)[:, :, 0], deep_expected(values))
    big_endian = Image.frombytes("I;16B", (values.shape[1], values.shape[0]), values.astype(">u2").tobytes())
    np.testing.assert_array_equal(load_image(big_endian)[:, :, 0], deep_expected(values))


def test_float_mode_scaling(tmp_path: Path) -> None:
    unit = np.array([[0.0, 0.25, 1.0]] * 16, dtype=np.float32).repeat(6, axis=1)
    path = tmp_path / "unit.tif"
    Image.fromarray(unit).save(path)
    assert mode_of(path) == "F"
    assert load_image(path)[0, ::6, 0].tolist() == [0, 64, 255]  # max <= 1: scaled by 255
    wide = np.array([[0.0, 100.4, 255.0]] * 16, dtype=np.float32).repeat(6, axis=1)
    assert load_image(Image.fromarray(wide))[0, ::6, 0].tolist() == [0, 100, 255]  # max > 2: [0, 255] as is


def test_arrays_of_every_layout_and_dtype() -> None:
    rgb = random_rgb()
    out = load_image(rgb)
    np.testing.assert_array_equal(out, rgb)
    assert not np.shares_memory(out, rgb)
    assert load_image(rgb[:, ::-1]).flags.c_contiguous
    grey = rgb[:, :, 0]
    np.testing.assert_array_equal(load_image(grey), np.repeat(grey[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(load_image(grey[:, :, None]), load_image(grey))
    np.testing.assert_array_equal(load_image(deep_tile())[:, :, 0], deep_expected(deep_tile()))
    floats = np.zeros((16, 16, 3))
    floats[0, 0] = (0.5, 1.0, 0.0)
    assert load_image(floats)[0, 0].tolist() == [128, 255, 0]
    assert load_image(np.eye(16, dtype=bool))[0, 0].tolist() == [255] * 3


def test_bad_arrays() -> None:
    assert "unsupported array shape (16, 16, 2)" in error_text(np.zeros((16, 16, 2), np.uint8))
    assert "unsupported array shape (256,)" in error_text(np.zeros(256, np.uint8))
    assert error_text(np.zeros((16, 16), np.int64), name="frame") == (
        "frame: unsupported pixel dtype int64 (no defined brightness range); expected uint8, uint16, bool or float"
    )


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pil(tmp_path: Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "oriented.png"
    Image.fromarray(random_rgb(16, 24)).save(path, exif=exif)
    with Image.open(path) as opened:
        expected = np.asarray(ImageOps.exif_transpose(opened).convert("RGB"))
    np.testing.assert_array_equal(load_image(path), expected)


def test_exif_rotate_clockwise_by_hand() -> None:
    pixels = np.zeros((16, 24, 3), dtype=np.uint8)
    pixels[0, 0] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    out = load_image(encoded(Image.fromarray(pixels), "PNG", exif=exif))
    assert out.shape == (24, 16, 3)
    assert out[0, 15].tolist() == [255, 0, 0]  # the top-left pixel ends at the top right


# --- broken inputs ------------------------------------------------------------------------------


def test_missing_directory_and_empty_files(tmp_path: Path) -> None:
    assert error_text(tmp_path / "missing.png") == f"{tmp_path / 'missing.png'}: no such file"
    assert error_text(tmp_path) == f"{tmp_path}: is a directory, not an image file"
    (tmp_path / "empty.png").write_bytes(b"")
    assert error_text(tmp_path / "empty.png") == f"{tmp_path / 'empty.png'}: empty file (0 bytes)"
    assert error_text(b"", name="upload") == "upload: empty file (0 bytes)"


def test_non_image_and_corrupt_files(tmp_path: Path) -> None:
    text = tmp_path / "bad.png"
    text.write_text("not an image at all")
    unknown = "not a readable image (cannot identify image file; supported: PNG, JPEG, BMP, TIFF, WebP)"
    assert error_text(text, name="bad.png") == f"bad.png: {unknown}"
    assert error_text(b"\x89PNG garbage") == f"<bytes>: {unknown}"
    png = encoded(Image.fromarray(random_rgb(64, 64)), "PNG")
    assert error_text(png[: len(png) * 6 // 10], name="cut.png").startswith("cut.png: corrupt or truncated image (")
    jpeg = encoded(Image.fromarray(random_rgb(64, 64)), "JPEG")
    assert "image file is truncated" in error_text(jpeg[: len(jpeg) // 2], name="cut.jpg")


# --- corrupt and truncated files ----------------------------------------------------------------


def smooth_rgb(side: int = 64) -> np.ndarray:
    """(side, side, 3) uint8 gradients with a little noise: compresses like a photograph, not like noise."""
    yy, xx = np.mgrid[:side, :side]
    base = np.stack([xx * 4, yy * 4, (xx + yy) * 2], axis=2) % 256
    noise = np.random.default_rng(0).integers(-8, 9, size=base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def png_chunks(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """(offset, kind, body) of every chunk of a PNG."""
    chunks, position = [], 8
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        chunks.append((position, kind, data[position + 8 : position + 8 + length]))
        position += 12 + length
    return chunks


def png_from_chunks(chunks: list[tuple[bytes, bytes]]) -> bytes:
    """A PNG of the given (kind, body) chunks, each with a correct CRC."""
    parts = [b"\x89PNG\r\n\x1a\n"]
    for kind, body in chunks:
        parts.append(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body)))
    return b"".join(parts)


@pytest.mark.parametrize("fix_crc", [False, True], ids=["stale-crc", "recomputed-crc"])
def test_png_with_a_flipped_bit_is_rejected(fix_crc: bool) -> None:
    png = encoded(Image.fromarray(smooth_rgb()), "PNG")
    chunks = png_chunks(png)
    offset, _, idat = next(chunk for chunk in chunks if chunk[1] == b"IDAT")
    rng = np.random.default_rng(0)
    for position in rng.choice(len(idat), size=25, replace=False):
        body = bytearray(idat)
        body[position] ^= 1 << int(rng.integers(8))
        if fix_crc:  # CRCs right, so only the zlib stream's own checksum and structure can tell
            data = png_from_chunks([(kind, bytes(body) if kind == b"IDAT" else old) for _, kind, old in chunks])
        else:
            data = png[: offset + 8] + bytes(body) + png[offset + 8 + len(idat) :]
        message = error_text(data, name="flip.png")
        assert message.startswith("flip.png: corrupt") and ("IDAT chunk fails its CRC check" in message) != fix_crc


def test_png_with_short_but_valid_pixel_data_is_rejected() -> None:
    # Checksums all right, half the rows missing: PIL decodes what it has. The EXIF lookup used to run this
    # decode first and swallow its error, so the second load returned a half-black image.
    pixels = smooth_rgb()
    rows = b"".join(b"\x00" + row.tobytes() for row in pixels[:32])  # filter byte 0, then the row
    chunks = png_chunks(encoded(Image.fromarray(pixels), "PNG"))
    data = png_from_chunks([(b"IHDR", chunks[0][2]), (b"IDAT", zlib.compress(rows)), (b"IEND", b"")])
    assert error_text(data, name="short.png") == (
        f"short.png: corrupt or truncated image (PNG pixel data holds {len(rows):,} bytes, its header declares "
        f"{2 * len(rows):,})"
    )


ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def interlaced_png(pixels: np.ndarray) -> bytes:
    """(H, W, 3) uint8 as an Adam7-interlaced PNG (PIL cannot write one): each pass's rows, filter byte 0."""
    height, width = pixels.shape[:2]
    rows = [
        b"\x00" + row.tobytes()
        for x0, y0, dx, dy in ADAM7
        if x0 < width and y0 < height
        for row in pixels[y0::dy, x0::dx]
    ]
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 1)
    return png_from_chunks([(b"IHDR", ihdr), (b"IDAT", zlib.compress(b"".join(rows))), (b"IEND", b"")])


@pytest.mark.parametrize("size", [(16, 16), (17, 23), (37, 53)])
def test_interlaced_png_is_checked_and_decoded(size: tuple[int, int]) -> None:
    pixels = random_rgb(*size)
    data = interlaced_png(pixels)
    np.testing.assert_array_equal(load_image(data), pixels)
    chunks = png_chunks(data)
    short = png_from_chunks([(b"IHDR", chunks[0][2]), (b"IDAT", zlib.compress(zlib.decompress(chunks[1][2])[:-1]))])
    assert "PNG pixel data holds" in error_text(short + data[-12:])


CUT_FORMATS = {
    "png": ("PNG", {}),
    "jpeg": ("JPEG", {"quality": 90}),
    "progressive jpeg": ("JPEG", {"progressive": True}),
    "lossless webp": ("WEBP", {"lossless": True}),
    "lossy webp": ("WEBP", {"quality": 80}),
    "tiff": ("TIFF", {}),
    "lzw tiff": ("TIFF", {"compression": "tiff_lzw"}),
    "bmp": ("BMP", {}),
}


@pytest.mark.parametrize("kind", sorted(CUT_FORMATS))
def test_files_cut_anywhere_are_rejected(kind: str) -> None:
    fmt, options = CUT_FORMATS[kind]
    data = encoded(Image.fromarray(smooth_rgb()), fmt, **options)
    assert load_image(data).shape == (64, 64, 3)
    for cut in (
        12,
        40,
        len(data) // 4,
        len(data) // 2,
        len(data) * 3 // 4,
        len(data) - 16,
        len(data) - 2,
        len(data) - 1,
    ):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            message = error_text(data[:cut], name="cut")
        assert message.startswith("cut: ") and ("truncated" in message or "not a readable image" in message)
        assert caught == []  # PIL's UserWarnings (e.g. "Corrupt EXIF data") would print beside the one error line


def test_libtiff_complaints_stay_off_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    # libtiff prints "ZIPDecode: Decoding error ..." on file descriptor 2 before PIL raises; the error is one line.
    data = bytearray(encoded(Image.fromarray(smooth_rgb()[:, :, 0]), "TIFF", compression="tiff_adobe_deflate"))
    data[len(data) // 3] ^= 0x04  # inside the deflated strip, which comes before the directory
    assert "corrupt or truncated image" in error_text(bytes(data), name="flip.tif")
    print("still here", file=sys.stderr)
    assert capfd.readouterr().err == "still here\n"


def test_pil_load_truncated_images_switch_is_not_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some libraries set it process-wide
    jpeg = encoded(Image.fromarray(smooth_rgb()), "JPEG")
    cut = jpeg[: len(jpeg) * 3 // 4]
    with Image.open(io.BytesIO(cut)) as partial:
        partial.load()  # PIL alone now accepts the cut file
    assert "image file is truncated" in error_text(cut, name="cut.jpg")
    assert "truncated" in error_text(encoded(Image.fromarray(smooth_rgb()), "TIFF")[:5000], name="cut.tif")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored for whoever set it


def test_only_the_supported_formats_are_decoded() -> None:
    # GIF and PGM are images PIL reads, but not formats this project accepts (PIL's other parsers stay unused).
    for fmt in ("GIF", "PPM"):
        message = error_text(encoded(Image.fromarray(smooth_rgb()[:, :, 0]), fmt), name=f"x.{fmt.lower()}")
        assert message.endswith("cannot identify image file; supported: PNG, JPEG, BMP, TIFF, WebP)")


# --- value ranges -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "problem"),
    [
        ("int8", "signed integer pixels have no defined brightness range"),
        ("int16", "signed integer pixels have no defined brightness range"),
        ("int32", "signed integer pixels have no defined brightness range"),
        ("uint32", "32-bit integer pixels have no defined brightness range"),
    ],
)
def test_integer_tiffs_without_a_defined_range_are_refused(tmp_path: Path, dtype: str, problem: str) -> None:
    # Before: int16 negatives wrapped to bright, uint32 clipped to white, int32 was divided by 257.
    values = np.array([[-100, 0, 100, 200]] * 16, dtype=np.int64).repeat(4, axis=1)
    path = tmp_path / f"{dtype}.tif"
    tifffile.imwrite(path, values.astype(dtype) if dtype.startswith("int") else np.abs(values).astype(dtype))
    assert error_text(path, name="x.tif") == f"x.tif: {problem}; save it as 8- or 16-bit unsigned"
    with Image.open(path) as opened:
        assert "integer pixels have no defined brightness range" in error_text(opened)
    assert "no defined brightness range" in error_text(values.astype(dtype))


FLOAT_CASES = {
    # row of pixel values: expected uint8 row, or a fragment of the error
    "unit": ([0.0, 0.25, 1.0, 0.5], [0, 64, 255, 128]),
    "bytes": ([0.0, 100.4, 255.0, 2.5], [0, 100, 255, 2]),
    "all zero": ([0.0, 0.0, 0.0, 0.0], [0, 0, 0, 0]),
    "+inf": ([0.0, 0.25, np.inf, 0.5], "64 pixel values are NaN or infinite"),
    "nan": ([0.0, np.nan, 1.0, 0.5], "64 pixel values are NaN or infinite"),
    "negative": ([-0.5, 0.25, 1.0, 0.5], "float pixel values from -0.5 to 1; expected [0, 1] or [0, 255]"),
    "above 255": ([0.0, 0.25, 300.0, 0.5], "float pixel values from 0 to 300; expected [0, 1] or [0, 255]"),
    "overshoot": ([0.0, 0.25, 1.03, 0.5], "float pixel values up to 1.03 are ambiguous"),
}


@pytest.mark.parametrize("case", sorted(FLOAT_CASES))
def test_float_pixel_ranges(tmp_path: Path, case: str) -> None:
    row, expected = FLOAT_CASES[case]
    values = np.array([row] * 16, dtype=np.float32).repeat(4, axis=1)  # (16, 16): each value in 64 pixels
    path = tmp_path / "float.tif"
    tifffile.imwrite(path, values)
    for source in (path, values, values.astype(np.float64)):
        if isinstance(expected, str):
            assert expected in error_text(source)
        else:
            assert load_image(source)[0, ::4, 0].tolist() == expected


# --- lossy formats and printable names ----------------------------------------------------------


def test_lossy_encoding_is_told_from_the_format(tmp_path: Path) -> None:
    rgb = Image.fromarray(smooth_rgb())
    rgba = Image.fromarray(np.dstack([smooth_rgb(), smooth_rgb()[:, :, :1]]))
    files = {
        "a.png": (rgb, {}, None),
        "a.bmp": (rgb, {}, None),
        "a.tif": (rgb, {"compression": "tiff_lzw"}, None),
        "jpeg.tif": (rgb, {"compression": "jpeg"}, "JPEG-compressed TIFF"),
        "a.jpg": (rgb, {"quality": 95}, "JPEG"),
        "lossless.webp": (rgb, {"lossless": True}, None),
        "lossy.webp": (rgb, {"quality": 80}, "lossy WebP"),
        "alpha_lossless.webp": (rgba, {"lossless": True}, None),  # VP8X, then VP8L
        "alpha_lossy.webp": (rgba, {"quality": 80}, "lossy WebP"),  # VP8X, ALPH, then VP8
    }
    for name, (image, options, expected) in files.items():
        image.save(tmp_path / name, **options)
        assert aio.lossy_encoding(tmp_path / name) == expected, name
    assert aio.lossy_encoding(tmp_path / "missing.png") is None


def test_safe_text_escapes_what_a_terminal_would_obey() -> None:
    assert aio.safe_text("ok/été/漢字 1.png") == "ok/été/漢字 1.png"
    assert aio.safe_text("\x1b[31mred\x1b[0m.png") == "\\x1b[31mred\\x1b[0m.png"
    assert aio.safe_text("a\nb\rc\x9b\u202e.png") == "a\\nb\\rc\\x9b\\u202e.png"
    undecodable = os.fsdecode(b"bad\xff.png")  # a Linux file name that is not UTF-8
    assert aio.safe_text(undecodable) == "bad\\udcff.png"
    aio.safe_text(undecodable).encode("ascii")  # printable on any terminal encoding


def test_json_writer_keeps_undecodable_file_names(tmp_path: Path) -> None:
    name = os.fsdecode(b"bad\xff.png")
    write_json_atomic(tmp_path / "n.json", {"source": name})
    assert json.loads((tmp_path / "n.json").read_text())["source"] == name


def test_too_small() -> None:
    assert error_text(encoded(Image.new("RGB", (1, 1)), "PNG"), name="dot.png") == (
        "dot.png: too small: 1x1 px, need at least 16 px per side"
    )
    assert "too small: 40x15 px" in error_text(np.zeros((15, 40), np.uint8))
    assert load_image(np.zeros((16, 16), np.uint8)).shape == (16, 16, 3)


def test_max_pixels_is_checked_from_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aio, "MAX_PIXELS", 1000)
    png = encoded(Image.fromarray(random_rgb(40, 40)), "PNG")
    # Pixel data cut off: reporting the size rather than the truncation proves nothing was decoded.
    assert error_text(png[:100], name="big.png") == "big.png: too large: 40x40 px (1,600 pixels), limit is 1,000"
    assert error_text(np.zeros((40, 40), np.uint8)) == "<array>: too large: 40x40 px (1,600 pixels), limit is 1,000"


def test_pil_decompression_bomb_warning_and_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    warned = error_text(encoded(Image.new("L", (40, 40)), "PNG"), name="w.png")  # > limit: a warning
    assert warned.startswith("w.png: too large: Image size (1600 pixels) exceeds limit of 1000 pixels")
    failed = error_text(encoded(Image.new("L", (50, 50)), "PNG"), name="e.png")  # > 2x limit: an error
    assert failed.startswith("e.png: too large: Image size (2500 pixels) exceeds limit of 2000 pixels")


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 20000x20000 1-bit PNG written by PIL: about 50 kB on disk, 1.2 GB once decoded as RGB."""
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    Image.new("1", (20000, 20000)).save(path)
    return path


def test_huge_png_fails_fast_without_allocating(huge_png: Path) -> None:
    assert huge_png.stat().st_size < 100_000
    start = time.perf_counter()
    assert "too large" in error_text(huge_png)
    assert time.perf_counter() - start < 0.5
    probe = (
        "import resource, sys\n"
        "from anomalygpt.io import ImageError, load_image\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n    load_image(sys.argv[1])\nexcept ImageError:\n    pass\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe, str(huge_png)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) < 100_000  # KiB of peak-memory growth; decoding would need > 400 MB


# --- listing ------------------------------------------------------------------------------------


def test_list_images_expands_folders_and_keeps_files(tmp_path: Path) -> None:
    folder = tmp_path / "good"
    folder.mkdir()
    for name in ("b.png", "a.JPG", "c.tiff", ".hidden.png", "notes.txt"):
        (folder / name).write_bytes(b"x")
    (folder / "nested.png").mkdir()  # a folder named like an image is not an image
    single = tmp_path / "z.webp"
    single.write_bytes(b"x")
    found = list_images([single, folder, str(folder / "b.png")])
    assert found == [single, folder / "a.JPG", folder / "b.png", folder / "c.tiff", folder / "b.png"]
    assert list_images(str(single)) == [single]  # a bare string is one path, not characters


def test_list_images_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file or folder"):
        list_images([tmp_path / "nope"])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ImageError, match="notes.txt: not an image file"):
        list_images([tmp_path / "notes.txt"])
    with pytest.raises(ImageError, match=f"{tmp_path}: folder has no images"):
        list_images([tmp_path])
    with pytest.raises(ImageError, match="no image paths given"):
        list_images([])


# --- atomic writes ------------------------------------------------------------------------------


def test_writers_round_trip_and_create_folders(tmp_path: Path) -> None:
    assert write_bytes_atomic(tmp_path / "a" / "b" / "x.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert write_text_atomic(tmp_path / "t.txt", "héllo").read_text(encoding="utf-8") == "héllo"
    path = write_json_atomic(tmp_path / "r.json", {"b": 1, "a": [1.5, None], "é": "ü"})
    assert path.read_text(encoding="utf-8") == '{\n  "b": 1,\n  "a": [\n    1.5,\n    null\n  ],\n  "é": "ü"\n}\n'
    rgb, grey = random_rgb(), random_rgb()[:, :, 1]
    np.testing.assert_array_equal(load_image(write_png_atomic(tmp_path / "rgb.png", rgb)), rgb)
    with Image.open(write_png_atomic(tmp_path / "g.png", grey)) as written:
        assert written.mode == "L" and np.asarray(written).tolist() == grey.tolist()
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(np.load(write_npy_atomic(tmp_path / "m.npy", array)), array)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "g.png", "m.npy", "r.json", "rgb.png", "t.txt"]


def test_new_files_get_umask_permissions(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        path = write_text_atomic(tmp_path / "p.txt", "x")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


def test_json_errors_leave_existing_file_untouched(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text("old")
    with pytest.raises(ValueError, match=r"r\.json: cannot write JSON: NaN or Infinity"):
        write_json_atomic(path, {"score": float("nan")})
    with pytest.raises(TypeError, match=r"r\.json: cannot write JSON: .*not JSON serializable"):
        write_json_atomic(path, {"when": object()})
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.json"]
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "new.json", {1j})
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_failure_mid_write_removes_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "m.npy"
    path.write_bytes(b"old")
    # np.save writes the header, then refuses the object array: the temp file already exists by then.
    with pytest.raises(ValueError, match="allow_pickle"):
        write_npy_atomic(path, np.array([object()]))
    with pytest.raises(ValueError, match="allow_pickle"):
        write_npy_atomic(tmp_path / "fresh.npy", np.array([object()]))
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["m.npy"]


def test_failure_at_rename_removes_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.txt"
    path.write_text("old")

    def refuse(source: object, target: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_png_writer_rejects_bad_arrays(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"f\.png: PNG needs a uint8 \(H, W\) or \(H, W, 3\) array, got float64"):
        write_png_atomic(tmp_path / "f.png", np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"got uint8 \(4, 4, 4\)"):
        write_png_atomic(tmp_path / "f.png", np.zeros((4, 4, 4), np.uint8))
    assert list(tmp_path.iterdir()) == []
    assert json.loads(write_json_atomic(tmp_path / "ok.json", [1]).read_text()) == [1]


def test_ordered_map_keeps_the_order_draws_lazily_and_raises_in_turn() -> None:

    drawn: list[int] = []

    def items() -> Iterator[int]:
        for index in range(40):
            drawn.append(index)
            yield index

    def slow_square(value: int) -> int:
        time.sleep(0.002 * (value % 5))  # later items often finish first
        return value * value

    results = ordered_map(slow_square, items(), threads=3)
    seen = []
    for value in results:
        seen.append(value)
        assert len(drawn) <= len(seen) + 2 * 3  # never more than 2 x threads ahead of what was yielded
    assert seen == [index * index for index in range(40)]

    def fails_on_five(value: int) -> int:
        if value == 5:
            raise OSError("disk full")
        return value

    done = ordered_map(fails_on_five, range(10), threads=2)
    assert [next(done) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(OSError, match="disk full"):
        next(done)


def test_write_png_atomic_compress_level_changes_size_not_pixels(tmp_path: Path) -> None:
    image = np.repeat(np.repeat(random_rgb(24, 32, seed=3) // 32 * 32, 8, axis=0), 8, axis=1)
    fast, small = write_png_atomic(tmp_path / "fast.png", image, 1), write_png_atomic(tmp_path / "small.png", image)
    assert np.array_equal(load_image(fast), image) and np.array_equal(load_image(small), image)
    assert fast.stat().st_size > small.stat().st_size
