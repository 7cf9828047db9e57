"""Tests for anomalygpt.io: decoding every supported mode, size limits, listing and atomic writes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

import anomalygpt.io as aio
from anomalygpt.io import (
    ImageError,
    list_images,
    load_image,
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
    int_mode = Image.fromarray(np.array([[-5, 511, 70000]] * 16, dtype=np.int32).repeat(6, axis=1))
    assert int_mode.mode == "I"
    assert load_image(int_mode)[0, ::6, 0].tolist() == [0, 2, 255]  # clipped to the 16-bit range


def test_float_mode_scaling(tmp_path: Path) -> None:
    unit = np.array([[0.0, 0.25, 1.0]] * 16, dtype=np.float32).repeat(6, axis=1)
    path = tmp_path / "unit.tif"
    Image.fromarray(unit).save(path)
    assert mode_of(path) == "F"
    assert load_image(path)[0, ::6, 0].tolist() == [0, 64, 255]  # max <= 1: scaled by 255
    wide = np.array([[-3.0, 100.4, 300.0]] * 16, dtype=np.float32).repeat(6, axis=1)
    assert load_image(Image.fromarray(wide))[0, ::6, 0].tolist() == [0, 100, 255]  # clipped to [0, 255]


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
    floats[0, 0] = (0.5, 1.0, np.nan)
    assert load_image(floats)[0, 0].tolist() == [128, 255, 0]
    assert load_image(np.eye(16, dtype=bool))[0, 0].tolist() == [255] * 3


def test_bad_arrays() -> None:
    assert "unsupported array shape (16, 16, 2)" in error_text(np.zeros((16, 16, 2), np.uint8))
    assert "unsupported array shape (256,)" in error_text(np.zeros(256, np.uint8))
    assert error_text(np.zeros((16, 16), np.int64), name="frame") == (
        "frame: unsupported pixel dtype int64; expected uint8, uint16, bool or float"
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
    assert error_text(text, name="bad.png") == "bad.png: not a readable image (cannot identify image file)"
    assert error_text(b"\x89PNG garbage") == "<bytes>: not a readable image (cannot identify image file)"
    png = encoded(Image.fromarray(random_rgb(64, 64)), "PNG")
    assert error_text(png[: len(png) * 6 // 10], name="cut.png").startswith("cut.png: corrupt or truncated image (")
    jpeg = encoded(Image.fromarray(random_rgb(64, 64)), "JPEG")
    assert "image file is truncated" in error_text(jpeg[: len(jpeg) // 2], name="cut.jpg")


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
