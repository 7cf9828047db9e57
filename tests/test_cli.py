"""Tests for the `anomalygpt` command line: detect end to end, its one-line input errors, and lazy commands."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image

from anomalygpt import cli, verdict
from anomalygpt.cli import LazyCommand, main, output_stems, unique_paths, verdict_table
from anomalygpt.inspection import Inspection, Inspector
from anomalygpt.profile import read_header
from anomalygpt.verdict import few_references_note

SIDE = 128
# Crops (row, col) of skimage's 512x512 grass texture. Grass is isotropic and fine-grained, so any crop
# matches the references' patches; with these crops good queries score 8-10 normal spreads below the
# threshold and the blob 6-7 above it.
REFERENCE_CROPS = ((0, 0), (0, 256))
GOOD_CROP = (384, 384)
FEW_TWO = few_references_note(2)  # the scene's two references get the note on few references
BAD_CROP = (200, 300)
BLOB_CENTRE, BLOB_RADIUS, BLOB_GREY = (40, 80), 14, 20  # (x, y) px: the left third, middle row -> "left"


@dataclass(frozen=True)
class Scene:
    refs: Path  # folder of good references
    good: Path  # good/x.png: a different crop of the same texture
    bad: Path  # bad/x.png: same stem as good, a dark blob drawn in
    preset: Path
    root: Path


def crop(row: int, col: int) -> np.ndarray:
    """(SIDE, SIDE) uint8 grey crop of the grass texture."""
    return np.ascontiguousarray(skimage.data.grass()[row : row + SIDE, col : col + SIDE])


def save(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Scene:
    root = tmp_path_factory.mktemp("scene")
    for index, (row, col) in enumerate(REFERENCE_CROPS):
        save(root / "refs" / f"ref{index}.png", crop(row, col))
    bad = crop(*BAD_CROP)
    cv2.circle(bad, BLOB_CENTRE, BLOB_RADIUS, BLOB_GREY, thickness=-1)
    preset = root / "preset.json"
    # Small input and no rotation views keep each run to a few seconds on 2 CPU cores.
    preset.write_text(
        json.dumps(
            {"name": "t", "backbone": {"name": "efficientnet-lite0", "image_size": SIDE}, "memory": {"augment": False}}
        )
    )
    return Scene(
        root / "refs", save(root / "good" / "x.png", crop(*GOOD_CROP)), save(root / "bad" / "x.png", bad), preset, root
    )


def run(argv: list[str]) -> tuple[int, str, str]:
    """main(argv) with stdout and stderr captured; works in module-scoped fixtures, unlike capsys."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def table_run(scene: Scene, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, str, Path]:
    out = tmp_path_factory.mktemp("run") / "results"
    code, stdout, stderr = run(
        [
            "detect",
            str(scene.good),
            str(scene.bad),
            "--ref",
            str(scene.refs),
            "--preset",
            str(scene.preset),
            "--class-name",
            "grass",
            "--out",
            str(out),
        ]
    )
    return code, stdout, stderr, out


@pytest.fixture(scope="module")
def json_run(scene: Scene) -> tuple[int, str, str]:
    return run(
        [
            "detect",
            str(scene.good),
            str(scene.bad),
            "--ref",
            str(scene.refs),
            "--preset",
            str(scene.preset),
            "--json",
            "--sensitivity",
            "2",
        ]
    )


def test_detect_flags_the_blob_and_passes_the_good_crop(table_run: tuple[int, str, str, Path]) -> None:
    code, stdout, stderr, out = table_run
    assert code == 0 and "inspecting" not in stderr  # no progress bar when stderr is not a terminal
    good, bad = (json.loads((out / f"{stem}.json").read_text()) for stem in ("good_x", "bad_x"))
    assert good["verdict"] == "normal" and good["regions"] == [] and good["margin"] < -3
    assert bad["verdict"] == "anomalous" and bad["margin"] > 0 and bad["class_name"] == "grass"
    x, y = BLOB_CENTRE
    x0, y0, x1, y1 = bad["regions"][0]["box"]
    assert x0 <= x < x1 and y0 <= y < y1 and bad["regions"][0]["location"] == "left"
    assert bad["regions"][0]["contrast"] == "darker"


def test_one_reference_gets_a_warning_on_stderr_and_still_inspects(
    scene: Scene, table_run: tuple[int, str, str, Path]
) -> None:
    from anomalygpt.verdict import ONE_REFERENCE_CAVEAT

    code, stdout, stderr = run(
        ["detect", str(scene.good), "--ref", str(scene.refs / "ref0.png"), "--preset", str(scene.preset), "--json"]
    )
    assert code == 0 and stderr.strip() == f"anomalygpt detect: warning: {ONE_REFERENCE_CAVEAT}"
    record = json.loads(stdout)[0]  # stdout stays pure JSON
    assert record["n_references"] == 1 and record["calibration"]["method"].startswith("k=1")
    assert ONE_REFERENCE_CAVEAT not in table_run[2]  # two references: not this caveat, the note on few references
    assert table_run[2].splitlines() == [f"anomalygpt detect: note: {FEW_TWO}"]


def test_detect_prints_a_verdict_table(table_run: tuple[int, str, str, Path], scene: Scene) -> None:
    _, stdout, _, out = table_run
    lines = stdout.splitlines()
    assert lines[0].split() == ["file", "verdict", "score", "threshold", "margin", "regions", "locations", "fit"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {str(scene.good), str(scene.bad)}
    assert rows[str(scene.good)][1] == "normal" and rows[str(scene.good)][5:] == ["0", "-", "yes"]
    bad = json.loads((out / "bad_x.json").read_text())
    expected = [f"{bad['score']:.4f}", f"{bad['threshold']:.4f}", f"{bad['margin']:+.1f}", str(len(bad["regions"]))]
    assert rows[str(scene.bad)][1:6] == ["anomalous", *expected]


def test_maps_flagged_writes_the_pictures_of_flagged_images_only(
    table_run: tuple[int, str, str, Path], scene: Scene, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--maps flagged: every record, the map and overlay of the anomalous cell only (the good one fits its
    references; only the anomalous one is decoded again, for its overlay); the same records as --maps all.
    --maps none --overwrite then removes the pictures it no longer writes, so the folder never holds a picture its
    summary does not list."""
    out = tmp_path / "flagged"
    argv = ["detect", str(scene.good), str(scene.bad), "--ref", str(scene.refs), "--preset", str(scene.preset)]
    argv += ["--class-name", "grass", "--out", str(out)]
    drawn = []
    monkeypatch.setattr(verdict, "working_image", lambda image: drawn.append(image.shape) or image)
    assert run([*argv, "--maps", "flagged"])[0] == 0
    assert len(drawn) == 1  # the writer's decode, for the one overlay
    monkeypatch.undo()
    assert {p.name for p in out.iterdir()} == {
        "good_x.json", "bad_x.json", "bad_x_map.npy", "bad_x_overlay.png", "summary.json"
    }  # fmt: skip
    everything = table_run[3]
    for stem in ("good_x", "bad_x"):
        record, full = (json.loads((folder / f"{stem}.json").read_text()) for folder in (out, everything))
        assert {**record, "timings_ms": None} == {**full, "timings_ms": None}
    assert json.loads((out / "good_x.json").read_text())["reference_fit"]["fits"] is True
    summary = json.loads((out / "summary.json").read_text())
    assert summary["maps"] == "flagged"
    assert [sorted(image["files"]) for image in summary["images"]] == [
        ["inspection"], ["anomaly_map", "inspection", "overlay"]
    ]  # fmt: skip
    assert run([*argv, "--maps", "none", "--overwrite"])[0] == 0
    assert {p.name for p in out.iterdir()} == {"good_x.json", "bad_x.json", "summary.json"}


def test_detect_writes_every_output_under_distinct_names(table_run: tuple[int, str, str, Path], scene: Scene) -> None:
    _, _, _, out = table_run
    stems = ("good_x", "bad_x")  # both queries are x.png: the folder name keeps them apart
    expected = {f"{s}{suffix}" for s in stems for suffix in (".json", "_overlay.png", "_map.npy")}
    assert {p.name for p in out.iterdir()} == expected | {"summary.json"}
    for stem in stems:
        record = json.loads((out / f"{stem}.json").read_text())
        anomaly_map = np.load(out / f"{stem}_map.npy")
        assert anomaly_map.shape == (SIDE, SIDE) and anomaly_map.dtype == np.float32
        assert record["score"] > 0 and record["image_size"] == [SIDE, SIDE]
        with Image.open(out / f"{stem}_overlay.png") as figure:
            assert figure.mode == "RGB" and figure.width == 512  # 128 px enlarged 4 times
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 2 and summary["n_anomalous"] == 1 and summary["preset"] == "t"
    assert summary["references"] == [str(scene.refs / "ref0.png"), str(scene.refs / "ref1.png")]
    assert summary["profile"] is None and summary["reference_warnings"] == []
    assert [image["files"]["overlay"] for image in summary["images"]] == ["good_x_overlay.png", "bad_x_overlay.png"]


def test_detect_json_mode_and_sensitivity(
    json_run: tuple[int, str, str], table_run: tuple[int, str, str, Path]
) -> None:
    code, stdout, _ = json_run
    assert code == 0
    records = json.loads(stdout)
    assert [record["verdict"] for record in records] == ["normal", "anomalous"]
    default = json.loads((table_run[3] / "bad_x.json").read_text())
    for record in records:
        calibration = record["calibration"]
        # --sensitivity 2 lowers the threshold by exactly 2 normal spreads; the margin is measured from it.
        shifted = calibration["image_threshold"] - 2 * calibration["normal_spread"]
        assert record["threshold"] == pytest.approx(shifted)
        assert record["margin"] == pytest.approx((record["score"] - shifted) / calibration["normal_spread"])
        assert record["is_anomalous"] == (record["score"] > record["threshold"])
    assert records[1]["calibration"] == default["calibration"] and records[1]["score"] == pytest.approx(
        default["score"]
    )


@pytest.mark.parametrize(
    ("spread", "sensitivity", "expected"),
    [
        (0.05, 0.0, 0.40),  # calibrated
        (0.05, -5.0, 0.65),  # raised by 5 spreads
        (0.05, 2.0, 0.30),  # lowered by 2 spreads
        (0.05, 5.0, 0.20),  # 0.40 - 0.25 = 0.15: held at half the calibrated value
        (0.10, 5.0, 0.20),  # 0.40 - 0.50 < 0: still half, not the whole image
        (0.09, 5.0, 0.20),  # the image threshold stops at the normal mean (0.31), above half
    ],
)
def test_sensitivity_keeps_the_pixel_threshold_sensible(spread: float, sensitivity: float, expected: float) -> None:
    from anomalygpt.calibration import Calibration
    from anomalygpt.verdict import decide

    calibration = Calibration(
        image_threshold=0.46, pixel_threshold=0.40, normal_mean=0.31, normal_spread=spread, n_scores=4, method="t"
    )
    anomaly_map = np.full((64, 64), 0.1, np.float32)
    anomaly_map[10:20, 30:40] = 0.9  # one 10 x 10 px defect on a background of 0.1
    decision = decide(anomaly_map, np.zeros((64, 64, 3), np.uint8), 0.9, calibration, sensitivity)
    assert decision.pixel_threshold == pytest.approx(expected)
    assert decision.is_anomalous and sum(region.area_px for region in decision.regions) == 100
    # More sensitive never goes below the good references' mean score (0.31): 0.46 - 5 x 0.09 would be 0.01
    assert decision.threshold == pytest.approx(max(0.46 - sensitivity * spread, 0.31))


def test_the_image_threshold_follows_a_low_pixel_threshold_down_to_the_normal_mean() -> None:
    """A calibration whose pixel threshold is far above its normal mean: the image threshold, held at the mean, is
    under half the pixel threshold, and the pixel threshold follows it (an anomalous image keeps a region)."""
    from anomalygpt.calibration import Calibration
    from anomalygpt.verdict import decide

    calibration = Calibration(
        image_threshold=0.46, pixel_threshold=0.40, normal_mean=0.15, normal_spread=0.1, n_scores=4, method="t"
    )
    anomaly_map = np.full((64, 64), 0.1, np.float32)
    anomaly_map[10:20, 30:40] = 0.9
    decision = decide(anomaly_map, np.zeros((64, 64, 3), np.uint8), 0.9, calibration, 5.0)
    assert decision.threshold == pytest.approx(0.15) and decision.pixel_threshold == pytest.approx(0.15)
    assert decision.is_anomalous and sum(region.area_px for region in decision.regions) == 100


def write_bad_inputs(folder: Path) -> dict[str, Path]:
    """One file or folder per kind of bad input."""
    folder.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    Image.fromarray(crop(0, 0)).save(png, format="PNG")
    (folder / "empty_folder").mkdir()
    (folder / "out_file").write_text("not a folder")
    (folder / "unknown_backbone.json").write_text(json.dumps({"name": "u", "backbone": {"name": "nope"}}))
    files = {"corrupt": png.getvalue()[: len(png.getvalue()) // 2], "empty": b"", "text": b"just some text\n"}
    for name, data in files.items():
        (folder / f"{name}.png").write_bytes(data)
    save(folder / "many" / "00000.png", crop(0, 0))
    for index in range(1, 10_001):  # hard links: one image under 10,001 names
        os.link(folder / "many" / "00000.png", folder / "many" / f"{index:05d}.png")
    save(folder / "tiny.png", np.zeros((1, 1), np.uint8))
    save(folder / "narrow.png", crop(0, 0)[:, :96])
    names = (
        "corrupt.png",
        "empty.png",
        "text.png",
        "tiny.png",
        "narrow.png",
        "empty_folder",
        "out_file",
        "unknown_backbone.json",
        "many",
    )
    return {name.split(".")[0]: folder / name for name in names}


BAD_INPUTS = {
    # case: (argv template, fragment naming the file or option, fragment naming the problem)
    "corrupt file": (["{corrupt}", "--ref", "{refs}"], "corrupt.png", "corrupt or truncated"),
    "empty file": (["{empty}", "--ref", "{refs}"], "empty.png", "empty file (0 bytes)"),
    "text renamed png": (["{text}", "--ref", "{refs}"], "text.png", "not a readable image"),
    "10,001 references": (["{good}", "--ref", "{many}"], "--ref", "10001 reference images given; at most 10000"),
    "1x1 image": (["{good}", "--ref", "{tiny}"], "tiny.png", "too small: 1x1 px"),
    "query size": (["{good}", "{narrow}", "--ref", "{refs}"], "narrow.png", "96x128 px but the references are"),
    "reference size": (["{good}", "--ref", "{refs}", "{narrow}"], "narrow.png", "all references must have one"),
    "missing folder": (["{root}/missing/", "--ref", "{refs}"], "missing", "no such file or folder"),
    "empty query folder": (["{empty_folder}", "--ref", "{refs}"], "empty_folder", "folder has no images"),
    "no --ref": (["{good}"], "--ref", "no good reference images given"),
    "unknown preset": (["{good}", "--ref", "{refs}", "--preset", "nope"], "'nope'", "unknown preset"),
    "unknown backbone": (
        ["{good}", "--ref", "{refs}", "--preset", "{unknown_backbone}"],
        "unknown_backbone.json:backbone:name",
        "unknown 'nope'; known: clip,",
    ),
    "sensitivity too high": (["{good}", "--ref", "{refs}", "--sensitivity", "9"], "--sensitivity", "from -5 to 5"),
    "sensitivity too low": (["{good}", "--ref", "{refs}", "--sensitivity", "-5.5"], "--sensitivity", "got -5.5"),
    "sensitivity nan": (["{good}", "--ref", "{refs}", "--sensitivity", "nan"], "--sensitivity", "got nan"),
    "sensitivity not a number": (
        ["{good}", "--ref", "{refs}", "--sensitivity", "abc"],
        "--sensitivity",
        "invalid float value",
    ),
    "--out is a file": (["{good}", "--ref", "{refs}", "--out", "{out_file}"], "out_file", "not a folder"),
    "--out under /proc": (
        ["{good}", "--ref", "{refs}", "--out", "/proc/x/results"],
        "/proc/x/results",
        "cannot write the --out folder here (/proc:",
    ),
    "--out empty": (["{good}", "--ref", "{refs}", "--out", ""], "--out", "must be a folder path, got an empty string"),
    "sensitivity -1e9": (["{good}", "--ref", "{refs}", "--sensitivity", "-1e9"], "--sensitivity", "got -1e+09"),
    "sensitivity -inf": (["{good}", "--ref", "{refs}", "--sensitivity", "-inf"], "--sensitivity", "got -inf"),
    "unknown option": (["{good}", "--ref", "{refs}", "--bogus"], "--bogus", "unrecognized arguments"),
    "processes negative": (["{good}", "--ref", "{refs}", "--processes", "-1"], "--processes", "0 or more, got '-1'"),
    "processes over the cores": (["{good}", "--ref", "{refs}", "--processes", "100000"], "--processes", "cores"),
    "maps unknown": (["{good}", "--ref", "{refs}", "--maps", "some"], "--maps", "invalid choice: 'some'"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    case: str, scene: Scene, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    template, where, problem = BAD_INPUTS[case]
    paths = {name: str(path) for name, path in write_bad_inputs(tmp_path / "inputs").items()}
    paths |= {"refs": str(scene.refs), "good": str(scene.good), "root": str(scene.root)}
    argv = [part.format_map(paths) for part in template]
    out = tmp_path / "results"
    if "--out" not in argv:
        argv += ["--out", str(out)]
    argv += [] if "--preset" in argv else ["--preset", str(scene.preset)]
    code = main(["detect", *argv])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("anomalygpt detect: error: ")
    assert where in captured.err and problem in captured.err
    assert not out.exists()
    assert (tmp_path / "inputs" / "out_file").read_text() == "not a folder"


def test_lazy_command_not_built_yet(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(cli.LAZY_COMMANDS, "train", LazyCommand("anomalygpt_missing_package.cli", "x"))
    assert main(["train", "--epochs", "3"]) == 2
    assert capsys.readouterr().err == "anomalygpt train: not available yet (see the README)\n"


def test_lazy_command_gets_the_remaining_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "fake_sim.py").write_text("def main(argv):\n    print(argv)\n    return 7\n")
    (tmp_path / "fake_ui.py").write_text("import gradio_is_not_installed_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.LAZY_COMMANDS, "simulate", LazyCommand("fake_sim", "x"))
    monkeypatch.setitem(cli.LAZY_COMMANDS, "ui", LazyCommand("fake_ui", "x"))
    assert main(["simulate", "--n", "5", "out", "--help"]) == 7
    assert capsys.readouterr().out == "['--n', '5', 'out', '--help']\n"
    assert main(["ui"]) == 2
    assert capsys.readouterr().err == (
        "anomalygpt ui: error: needs the Python package gradio_is_not_installed_here, which is not installed\n"
    )


def test_every_verb_is_registered(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    listed = capsys.readouterr().out
    for verb in ("detect", "simulate", "train", "eval", "chat", "ui", "demo"):
        assert f"    {verb} " in listed
    assert main([]) == 2
    assert capsys.readouterr().err == "anomalygpt: error: the following arguments are required: COMMAND\n"


def test_cli_imports_no_application_package_or_torch() -> None:
    code = (
        "import sys, anomalygpt.cli as c; c.main(['--help']); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('simulation', 'train', 'chat', 'eval', "
        "'torch')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines()[-1] == "[]"


def test_cli_limits_match_the_library() -> None:
    from anomalygpt.calibration import MAX_FALSE_ALARM_RATE
    from anomalygpt.inspection import MAX_REFERENCES

    assert cli.MAX_REFERENCES == MAX_REFERENCES and cli.MAX_FALSE_ALARM_RATE == MAX_FALSE_ALARM_RATE


def test_output_stems_are_unique_and_keep_summary_free() -> None:
    paths = [
        Path("a/x.png"),
        Path("b/x.png"),
        Path("c/y.png"),
        Path("summary.png"),
        Path("d/X.jpg"),
        Path("e/s/z.png"),
        Path("f/s/z.png"),
    ]
    assert output_stems(paths) == ["a_x", "b_x", "y", "summary-2", "d_X", "s_z", "s_z-2"]


def test_unique_paths_drop_a_file_given_twice(tmp_path: Path) -> None:
    first = save(tmp_path / "a.png", crop(0, 0))
    assert unique_paths([first, tmp_path / "." / "a.png", tmp_path / "b.png"]) == [first, tmp_path / "b.png"]


def test_verdict_table_aligns_columns() -> None:
    region = {"location": "top left"}
    records = [
        {
            "source": "a.png",
            "verdict": "anomalous",
            "score": 0.61234,
            "threshold": 0.5,
            "margin": 12.34,
            "regions": [region, {"location": "center"}],
            "reference_fit": {"fits": False, "ratio": 7.2},
        },
        {"source": "long/b.png", "verdict": "normal", "score": 0.1, "threshold": 0.5, "margin": -4.0, "regions": []},
    ]
    assert verdict_table(records).splitlines() == [
        "file        verdict     score  threshold  margin  regions  locations         fit",
        "a.png       anomalous  0.6123     0.5000   +12.3        2  top left, center  NO",
        "long/b.png  normal     0.1000     0.5000    -4.0        0  -                 -",
    ]


def test_simulate_verb_is_wired_to_the_writer(tmp_path, capsys):
    normals = tmp_path / "normals"
    normals.mkdir()
    from PIL import Image
    from skimage import data

    for name in ("brick", "grass"):
        Image.fromarray(getattr(data, name)()[:96, :96]).save(normals / f"{name}.png")
    out = tmp_path / "sim"
    assert main(["simulate", "--normals", str(normals), "--out", str(out), "--n", "3", "--size", "64"]) == 0
    assert len(list((out / "images").glob("*.png"))) == 3
    assert len((out / "conversations.jsonl").read_text().splitlines()) == 3
    assert main(["simulate", "--normals", str(tmp_path / "nope"), "--out", str(tmp_path / "x"), "--n", "3"]) == 2
    assert (
        capsys.readouterr().err.strip().splitlines()[-1]
        == f"anomalygpt simulate: error: --normals {tmp_path / 'nope'}: no such folder"
    )
    assert not (tmp_path / "x").exists()


# --- output safety, printable names, lossy queries --------------------------------------------------


def tree_state(folder: Path) -> dict[str, bytes]:
    """Every file under folder (relative name -> content)."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture
def query_folder(scene: Scene, tmp_path: Path) -> Path:
    """q/ holding q.png (a good crop) and the user's own q_overlay.png, which detect's q.png overlay would hit."""
    folder = tmp_path / "q"
    save(folder / "q.png", crop(*GOOD_CROP))
    save(folder / "q_overlay.png", crop(0, 100))
    return folder


def assert_refused(argv: list[str], where: str, problem: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and where in err and problem in err, err


def test_out_never_replaces_an_input_image(
    scene: Scene, query_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = tree_state(query_folder)
    for extra in ([], ["--overwrite"]):  # not even with --overwrite
        argv = ["detect", str(query_folder), "--ref", str(scene.refs), "--preset", str(scene.preset)]
        assert_refused(
            [*argv, "--out", str(query_folder), *extra],
            str(query_folder / "q_overlay.png"),
            "is one of the input images and would be overwritten; choose another --out",
            capsys,
        )
    hard_link = query_folder / "out" / "q.json"  # one file under two names is still an input
    hard_link.parent.mkdir()
    os.link(query_folder / "q.png", hard_link)
    argv = ["detect", str(query_folder / "q.png"), "--ref", str(scene.refs), "--preset", str(scene.preset)]
    assert_refused([*argv, "--out", str(hard_link.parent), "--overwrite"], str(hard_link), "input images", capsys)
    assert tree_state(query_folder) == before | {"out/q.json": before["q.png"]}


def test_out_replaces_an_existing_file_only_with_overwrite(
    scene: Scene, query_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["detect", str(query_folder / "q.png"), "--ref", str(scene.refs), "--preset", str(scene.preset)]
    before = tree_state(query_folder)
    hint = "already exists; pass --overwrite to replace it, or choose another --out"
    assert_refused([*argv, "--out", str(query_folder)], str(query_folder / "q_overlay.png"), hint, capsys)
    out = tmp_path / "results"
    out.mkdir()
    (out / "summary.json").write_text("{}")  # a summary from another run is not silently replaced either
    other = "--out holds the results of another job (engine, references_sha256, preset, sensitivity differ)"
    assert_refused([*argv, "--out", str(out)], str(out / "summary.json"), other, capsys)
    assert tree_state(query_folder) == before and tree_state(out) == {"summary.json": b"{}"}
    assert main([*argv, "--out", str(query_folder), "--overwrite"]) == 0
    after = tree_state(query_folder)
    assert after["q.png"] == before["q.png"] and after["q_overlay.png"] != before["q_overlay.png"]
    assert set(after) == set(before) | {"q.json", "q_map.npy", "summary.json"}


def test_an_interrupted_detect_resumes_with_the_records_it_kept(
    scene: Scene, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C keeps the records written and says so; the same command then inspects only what is missing (or
    changed), and another job's folder is refused, unchanged."""
    queries = tmp_path / "queries"
    for name, row in (("a", 0), ("b", 40), ("c", 80)):
        save(queries / f"{name}.png", crop(row, 150))
    out = tmp_path / "out"
    argv = ["detect", str(queries), "--ref", str(scene.refs), "--preset", str(scene.preset), "--out", str(out)]
    assert main(argv) == 0
    first = {name: json.loads((out / f"{name}.json").read_text()) for name in "abc"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == "local" and summary["complete"] is True and summary["n_images"] == 3
    capsys.readouterr()
    real_write = cli.write_outputs

    def interrupted(out_dir: Path, stem: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if stem != "a":
            raise KeyboardInterrupt
        return real_write(out_dir, stem, *args, **kwargs)

    for name in ("b", "c"):  # as if the first run had stopped after a
        (out / f"{name}.json").unlink()
    monkeypatch.setattr(cli, "write_outputs", interrupted)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "1 of 3 images are reused from it" in err  # a
    assert "interrupted; the records written are kept: run the same command to resume" in err.splitlines()[-1]
    assert json.loads((out / "summary.json").read_text())["complete"] is False
    monkeypatch.setattr(cli, "write_outputs", real_write)
    assert main(argv) == 0
    assert "1 of 3 images are reused from it" in capsys.readouterr().err
    second = {name: json.loads((out / f"{name}.json").read_text()) for name in "abc"}
    assert second["a"] == first["a"] and second["b"]["score"] == pytest.approx(first["b"]["score"])
    save(queries / "c.png", crop(120, 150))  # changed since: inspected again, not reused
    assert main(argv) == 0
    assert "2 of 3 images are reused from it" in capsys.readouterr().err
    assert json.loads((out / "c.json").read_text())["source_sha256"] != second["c"]["source_sha256"]
    done = json.loads((out / "summary.json").read_text())
    assert done["complete"] is True and [image["source"] for image in done["images"]] == [
        str(queries / f"{name}.png") for name in "abc"
    ]
    before = tree_state(out)
    assert_refused([*argv, "--sensitivity", "1"], str(out / "summary.json"), "(sensitivity differ)", capsys)
    assert tree_state(out) == before


def test_a_row_names_three_places_and_counts_the_rest() -> None:
    assert cli.places_cell([]) == "-" and cli.places_cell(["top", "left"]) == "top, left"
    assert cli.places_cell(["top", "left", "center", "bottom", "right"]) == "top, left, center +2 more"


def test_negative_sensitivity_in_exponent_form_is_a_value(scene: Scene, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.attach_number_values(["detect", "a", "--sensitivity", "-1e9", "--", "--sensitivity", "-1"]) == [
        "detect",
        "a",
        "--sensitivity=-1e9",
        "--",
        "--sensitivity",
        "-1",
    ]
    argv = ["detect", str(scene.good), "--ref", str(scene.refs), "--preset", str(scene.preset), "--json"]
    assert main([*argv, "--sensitivity", "-1e0"]) == 0
    record = json.loads(capsys.readouterr().out)[0]
    calibration = record["calibration"]
    assert record["threshold"] == pytest.approx(calibration["image_threshold"] + calibration["normal_spread"])


def test_control_characters_in_file_names_reach_the_terminal_escaped(
    scene: Scene, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "names"
    folder.mkdir()
    broken = folder / "\x1b[2J\x1b[31mbroken\n.png"  # would clear the screen, then print in red
    broken.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    argv = ["--ref", str(scene.refs), "--preset", str(scene.preset)]
    assert main(["detect", str(broken), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err and "\\x1b[2J\\x1b[31mbroken\\n.png: not a readable image" in err
    title = folder / os.fsdecode(b"\x1b]0;owned\x07q\xff.png")  # sets the terminal's title; not UTF-8
    save(title, crop(*GOOD_CROP))
    out = tmp_path / "results"
    assert main(["detect", str(title), *argv, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    row = captured.out.splitlines()[1]
    assert row.startswith(f"{folder}/\\x1b]0;owned\\x07q\\udcff.png  normal ")
    assert all(char.isprintable() for char in captured.out.replace("\n", "") + captured.err.replace("\n", ""))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"][0]["source"] == str(title)  # the JSON keeps the exact name


def test_lossy_queries_against_lossless_references_get_a_note(
    scene: Scene, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jpeg, webp = tmp_path / "q.jpg", tmp_path / "q.webp"
    Image.fromarray(crop(*GOOD_CROP)).save(jpeg, quality=90)
    Image.fromarray(crop(*GOOD_CROP)).save(webp, lossless=True)
    refs = sorted(scene.refs.iterdir())
    assert cli.lossy_note([webp, scene.good], refs) is None
    assert cli.lossy_note([jpeg], [jpeg]) is None  # references stored the same way: like for like
    argv = ["detect", str(webp), str(jpeg), "--ref", str(scene.refs), "--preset", str(scene.preset), "--json"]
    assert main(argv) == 0
    notes = capsys.readouterr().err.splitlines()
    assert notes == [
        f"anomalygpt detect: note: {FEW_TWO}",
        f"anomalygpt detect: note: 1 of 2 queries are stored lossily (first: {jpeg}, JPEG) but the references "
        "losslessly; compression artefacts can score as defects: inspect lossless files (PNG, TIFF, lossless WebP) "
        "or references saved the same way",
    ]


def test_sixteen_queries_without_references_are_inspected_as_one_batch(scene: Scene, tmp_path: Path) -> None:
    wall = skimage.data.grass()
    folder = tmp_path / "batch"
    for index in range(16):
        row, col = divmod(index, 4)
        pixels = np.ascontiguousarray(wall[row * 96 : row * 96 + SIDE, col * 96 : col * 96 + SIDE])
        if index == 6:
            cv2.circle(pixels, BLOB_CENTRE, 24, BLOB_GREY, thickness=-1)
        save(folder / f"cell{index:02d}.png", pixels)
    code, stdout, stderr = run(["detect", str(folder), "--preset", str(scene.preset), "--json"])
    assert code == 0, stderr
    assert "scored against each other (zero-shot-batch)" in stderr
    records = json.loads(stdout)
    assert [Path(r["source"]).name for r in records] == [f"cell{i:02d}.png" for i in range(16)]
    assert {r["mode"] for r in records} == {"zero-shot-batch"}
    scores = [r["score"] for r in records]
    assert scores.index(max(scores)) == 6 and records[6]["is_anomalous"]

    save(folder / "odd.png", np.zeros((SIDE, SIDE + 8), np.uint8) + 128)
    code, stdout, stderr = run(["detect", str(folder), "--preset", str(scene.preset)])
    assert code == 2 and stdout == "" and len(stderr.strip().splitlines()) == 1
    assert "one batch without references must have one size" in stderr


def test_a_query_unlike_the_references_is_warned_about_before_the_table(scene: Scene, tmp_path: Path) -> None:
    other = save(tmp_path / "brick.png", np.ascontiguousarray(skimage.data.brick()[:SIDE, :SIDE]))
    code, stdout, stderr = run(
        ["detect", str(other), str(scene.good), "--ref", str(scene.refs), "--preset", str(scene.preset)]
    )
    assert code == 0, stderr
    rows = {line.split()[0]: line.split()[-1] for line in stdout.splitlines()[1:]}
    assert rows == {str(other): "NO", str(scene.good): "yes"}
    note, warning, hint = stderr.splitlines()  # the good crop fits: nothing about it
    assert note == f"anomalygpt detect: note: {FEW_TWO}"
    assert warning.startswith(f"anomalygpt detect: warning: {other}: the image does not look like the good references")
    assert hint.startswith("anomalygpt detect: hint: 1 of 2 images do not look like the good references (fit: NO)")
    assert hint.endswith("add good examples like it to the references (pass them with --ref) and inspect again")
    code, stdout, stderr = run(["detect", str(scene.good), "--ref", str(scene.refs), "--preset", str(scene.preset)])
    assert code == 0 and "hint" not in stderr  # every query fits: no advice
    out = tmp_path / "out"
    argv = ["detect", str(other), str(scene.good), "--ref", str(scene.refs), "--preset", str(scene.preset)]
    assert run([*argv, "--out", str(out)])[0] == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_unfit"] == 1 and [image["fits"] for image in summary["images"]] == [False, True]


def test_queries_without_references_or_batch_warn_once_that_the_decoder_alone_is_weak(
    scene: Scene, tmp_path: Path
) -> None:
    from anomalygpt.verdict import ZERO_SHOT_TEXT_CAVEAT

    code, stdout, stderr = run(["detect", str(scene.good), str(scene.bad), "--json"])  # the shipped decoder
    assert code == 0, stderr
    assert {r["mode"] for r in json.loads(stdout)} == {"zero-shot-text"}
    assert all(r["warnings"] == [ZERO_SHOT_TEXT_CAVEAT] for r in json.loads(stdout))
    warned = [line for line in stderr.splitlines() if "warning:" in line]
    assert warned == [f"anomalygpt detect: warning: {ZERO_SHOT_TEXT_CAVEAT}"]  # once, not once per image


def test_image_warnings_leave_out_the_reference_set_and_count_past_the_first_five() -> None:
    shared = "one reference: ..."
    records = [{"source": f"q{i}.png", "warnings": [f"unlike {i}", shared] if i != 1 else [shared]} for i in range(8)]
    lines = cli.image_warnings(records, [shared])
    assert lines[:5] == [
        "q0.png: unlike 0",
        "q2.png: unlike 2",
        "q3.png: unlike 3",
        "q4.png: unlike 4",
        "q5.png: unlike 5",
    ]
    assert len(lines) == 6 and lines[5].startswith("2 more images carry a warning")
    assert cli.image_warnings(records[1:2], [shared]) == []


def test_the_unfit_hint_counts_the_queries_unlike_the_references_and_says_how_to_add_them() -> None:
    records = [{"reference_fit": {"fits": fits}} for fits in (False, True, False)] + [{"reference_fit": None}]
    hint = cli.unfit_hint(records, Path("cells.profile"))
    assert hint is not None and hint.startswith("2 of 4 images do not look like the good references")
    assert "(anomalygpt fit with them added, --out cells.profile --overwrite)" in hint
    assert cli.unfit_hint(records[1:2] + records[3:], None) is None


def test_detect_with_a_profile_keeps_its_class_name_and_notes_lossy_queries(scene: Scene, tmp_path: Path) -> None:
    profile = tmp_path / "grass.profile"
    fit = ["fit", str(scene.refs), "--out", str(profile), "--preset", str(scene.preset), "--class-name", "grass"]
    code, _, stderr = run(fit)
    assert code == 0 and stderr.splitlines() == [f"anomalygpt fit: note: {FEW_TWO}"]  # the profile's 2 references
    jpeg = tmp_path / "q.jpg"
    Image.fromarray(crop(*GOOD_CROP)).save(jpeg, quality=90)
    code, _, stderr = run(["detect", str(jpeg), "--profile", str(profile), "--out", str(tmp_path / "out")])
    note, lossy = stderr.splitlines()
    assert code == 0 and note == f"anomalygpt detect: note: {FEW_TWO}"
    assert lossy.startswith("anomalygpt detect: note: 1 of 1 queries are stored lossily")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["class_name"] == json.loads((tmp_path / "out" / "q.json").read_text())["class_name"] == "grass"
    # The profile's references are named, not read: a name whose file is gone counts as lossless by its suffix only.
    assert cli.stored_losslessly(tmp_path / "gone.png") and not cli.stored_losslessly(tmp_path / "gone.tif")


def test_the_table_names_each_region_as_its_overlay_label_does() -> None:
    from anomalygpt.regions import Region

    spanning = Region(
        1, (107, 59, 201, 145), 4000, 4.4, (150.0, 100.0), "center", 0.3, 0.2, "compact", "similar", "large"
    )
    spanning = dataclasses.replace(spanning, span=("top", "center"))
    record = {"source": "q.png", "verdict": "anomalous", "score": 0.3, "threshold": 0.2, "margin": 1.5}
    row = cli.table_row(record | {"regions": [spanning.to_dict(), {"location": "widespread", "span": ["top", "left"]}]})
    assert spanning.where() == "top to center" and row[6] == "top to center, widespread"


def test_a_pool_profile_from_before_the_conformal_threshold_gets_a_note() -> None:
    from types import SimpleNamespace

    from anomalygpt.verdict import Calibration

    older = Calibration(0.3, 0.2, 0.1, 0.05, 32, "leave-one-out: 32 of 208 references")  # no reference scores
    newer = dataclasses.replace(older, reference_scores=(0.1,) * 208, false_alarm_rate=0.02)
    pool = SimpleNamespace(n_references=208)
    note = cli.older_profile_note(SimpleNamespace(calibration=older, memory=pool))
    assert note is not None and note.startswith("this profile was fitted before thresholds kept a false-alarm rate")
    assert cli.older_profile_note(SimpleNamespace(calibration=newer, memory=pool)) is None
    few = SimpleNamespace(n_references=48)  # too few for a rate of 2 % anyway
    assert cli.older_profile_note(SimpleNamespace(calibration=older, memory=few)) is None


def test_the_table_shows_p_values_only_when_a_conformal_threshold_gave_them() -> None:
    record = {"source": "q.png", "verdict": "anomalous", "score": 0.3, "threshold": 0.2, "margin": 1.5, "regions": []}
    without = cli.verdict_table([record | {"p_value": None}]).splitlines()
    assert without[0].split() == list(cli.TABLE_COLUMNS) and "p" not in without[0].split()
    lines = cli.verdict_table([record | {"p_value": 0.0123}, record | {"source": "r.png", "p_value": None}])
    header, first, second = (line.split() for line in lines.splitlines())
    assert header[4:6] == ["margin", "p"] and first[5] == "0.012" and second[5] == "-"


def test_fit_takes_a_false_alarm_rate_and_says_when_its_references_are_too_few(scene: Scene, tmp_path: Path) -> None:
    fit = ["fit", str(scene.refs), "--preset", str(scene.preset)]
    # 2 references keep a rate of 0.4: the threshold is the higher of their 2 held-out scores, and each image gets
    # its p-value (1, 2 or 3 thirds), in the table and the records.
    code, stdout, stderr = run([*fit, "--out", str(tmp_path / "a.profile"), "--false-alarm-rate", "0.4"])
    assert code == 0 and "held-out score 2 of 2 from the lowest (expected false alarms at most 40.0%" in stdout
    header = read_header(tmp_path / "a.profile")
    assert header["calibration"]["false_alarm_rate"] == 0.4 and len(header["calibration"]["reference_scores"]) == 2
    assert header["preset"]["calibration"]["false_alarm_rate"] == 0.4
    code, stdout, _ = run(["detect", str(scene.bad), "--profile", str(tmp_path / "a.profile"), "--json"])
    (record,) = json.loads(stdout)
    assert code == 0 and record["verdict"] == "anomalous" and record["p_value"] == pytest.approx(1 / 3)
    # At 0.1 they are too few (9 are needed): a note says so, and the threshold is mean + 3 spreads.
    code, stdout, stderr = run([*fit, "--out", str(tmp_path / "b.profile"), "--false-alarm-rate", "0.1"])
    assert code == 0 and "mean + 3 spreads of the held-out scores" in stdout
    assert (
        "anomalygpt fit: note: --false-alarm-rate 0.1 needs 9 held-out references and this fit has 2: its "
        "threshold is mean + 3 spreads of their scores instead"
    ) in stderr.splitlines()
    for wrong in ("0", "0.6", "nan", "x"):
        code, _, stderr = run([*fit, "--out", str(tmp_path / "c.profile"), "--false-alarm-rate", wrong])
        assert code == 2 and f"must be a number above 0 and at most 0.5, got '{wrong}'" in stderr
    assert not (tmp_path / "c.profile").exists()


def test_a_second_run_into_the_query_folder_leaves_the_first_runs_overlays_alone(scene: Scene, tmp_path: Path) -> None:
    folder = tmp_path / "cells"
    save(folder / "q.png", crop(*GOOD_CROP))
    argv = ["detect", str(folder), "--ref", str(scene.refs), "--preset", str(scene.preset), "--out", str(folder)]
    assert run(argv)[0] == 0 and (folder / "q_overlay.png").is_file()
    code, stdout, stderr = run([*argv, "--overwrite"])  # the overlay (another size) was taken for a query
    assert code == 0, stderr
    note = f"not inspecting 1 overlay picture(s) written by an earlier detect (first: {folder / 'q_overlay.png'})"
    assert stderr == f"anomalygpt detect: note: {FEW_TWO}\nanomalygpt detect: note: {note}\n"
    assert [line.split()[0] for line in stdout.splitlines()[1:]] == [str(folder / "q.png")]
    code, _, stderr = run([*argv[:1], str(folder / "q_overlay.png"), *argv[2:]])
    assert code == 2 and "only overlays written by an earlier detect were given" in stderr
    (folder / "q_map.npy").unlink()  # without its record and map beside it, a *_overlay.png is an image like any
    assert cli.query_files([str(folder)]) == ([folder / "q.png", folder / "q_overlay.png"], [])


def test_detect_notes_the_rate_a_conformal_threshold_keeps_and_when_sensitivity_moved_it() -> None:
    from anomalygpt.verdict import Calibration

    plain = Calibration(0.3, 0.2, 0.1, 0.05, 4, "leave-one-out: 4 of 4 references")
    conformal = dataclasses.replace(plain, reference_scores=(0.1,) * 208, false_alarm_rate=0.02)
    assert cli.rate_note(plain, 0.0) is None
    assert cli.rate_note(conformal, 0.0) == (
        "the threshold is set so that good parts like the 208 held-out references score above it at most 2.0% of "
        "the time (column p: how often they score as high)"
    )
    moved = cli.rate_note(conformal, 1.5)
    assert moved is not None and moved.endswith("; --sensitivity +1.5 moved it, so that rate no longer holds")


def test_queries_are_checked_in_threads_in_order_and_the_first_bad_one_is_named(tmp_path: Path) -> None:
    """detect decodes every query before writing anything (image_sizes): in threads, sizes in the files' order,
    and of two corrupt files the first in order is the one named."""
    paths = []
    for index in range(12):
        paths.append(tmp_path / f"q{index:02d}.png")
        Image.fromarray(np.full((20 + index, 30, 3), index * 9, np.uint8)).save(paths[-1])
    assert cli.image_sizes(paths) == [(20 + index, 30) for index in range(12)]
    for index in (5, 9):
        paths[index].write_bytes(paths[index].read_bytes()[:60])
    with pytest.raises(ValueError, match=r"q05\.png: .*(corrupt|truncated)"):
        cli.image_sizes(paths)


def test_records_hash_the_bytes_inspected_and_a_file_replaced_meanwhile_stops_detect(
    scene: Scene, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each record's source_sha256 is the sha256 of the bytes its inspection decoded (read through the same open
    file). A query replaced after its inspection, before its overlay is drawn (another file renamed over it, as a
    camera writes), stops detect with a one-line error naming it, and none of that image's files is written:
    neither a hash nor an overlay of bytes that were not inspected."""
    good, bad = tmp_path / "q" / "good.png", tmp_path / "q" / "bad.png"
    good.parent.mkdir()
    shutil.copyfile(scene.good, good)
    shutil.copyfile(scene.bad, bad)
    argv = ["detect", str(good), str(bad), "--ref", str(scene.refs), "--preset", str(scene.preset), "--out"]
    assert run([*argv, str(tmp_path / "first")])[0] == 0
    for path in (good, bad):
        record = json.loads((tmp_path / "first" / f"{path.stem}.json").read_text())
        assert record["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    inspect_many = Inspector.inspect_many

    def replacing(self: Inspector, *args: Any, **kwargs: Any) -> Iterator[Inspection]:
        for inspection in inspect_many(self, *args, **kwargs):
            if inspection.source == str(bad):
                shutil.copyfile(scene.good, tmp_path / "new.png")
                (tmp_path / "new.png").replace(bad)
            yield inspection

    monkeypatch.setattr(Inspector, "inspect_many", replacing)
    code, _, err = run([*argv, str(tmp_path / "second")])
    *notes, last = err.splitlines()  # the references' notes, then the error
    assert code == 1 and f"{bad}: changed while detect ran (not the bytes inspected)" in last
    assert all(": note: " in line for line in notes)
    assert not list((tmp_path / "second").glob("bad*"))
