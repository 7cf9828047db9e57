"""`anomalygpt eval` end to end on generated MVTec AD trees: outputs, resume, input errors, a hand-checked case."""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image

from eval.cli import main

SIDE = 64
CATEGORIES = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)
TEXTURES = (skimage.data.brick, skimage.data.grass, skimage.data.gravel)  # bundled 512x512 grey, BSD
BLOB_RADIUS, BLOB_GREY = 9, 10
# Small input and no rotation views keep a category to a fraction of a second on 2 CPU cores.
PRESET = {
    "name": "t",
    "backbone": {"name": "efficientnet-lite0", "image_size": 64, "stages": [4, 10]},
    "memory": {"augment": False},
}


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str
    seconds: float


def run_eval(*args: str | Path) -> Outcome:
    """eval.cli.main with captured output and its wall time."""
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(arg) for arg in args])
    return Outcome(code, out.getvalue(), err.getvalue(), time.perf_counter() - start)


def save(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def with_blob(image: np.ndarray, centre: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A copy with a dark disk at centre (x, y), and its (H, W) uint8 0/255 mask."""
    mask = np.zeros(image.shape[:2], dtype=np.uint8)
    cv2.circle(mask, centre, BLOB_RADIUS, 255, thickness=-1)
    return np.where(mask > 0, np.uint8(BLOB_GREY), image), mask


def write_category(root: Path, name: str, goods: list[np.ndarray], bads: list[np.ndarray], n_train: int) -> None:
    """MVTec layout: the first n_train goods in train/good, the rest in test/good, bads with masks in test/hole."""
    rng = np.random.default_rng(len(name))
    for index, image in enumerate(goods):
        folder = "train/good" if index < n_train else "test/good"
        save(root / name / folder / f"{index:03d}.png", image)
    for index, image in enumerate(bads):
        centre = tuple(int(v) for v in rng.integers(BLOB_RADIUS + 2, SIDE - BLOB_RADIUS - 2, size=2))
        defective, mask = with_blob(image, centre)
        save(root / name / "test" / "hole" / f"{index:03d}.png", defective)
        save(root / name / "ground_truth" / "hole" / f"{index:03d}_mask.png", mask)


def texture_crops(texture: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    corners = rng.integers(0, texture.shape[0] - SIDE, size=(n, 2))
    return [np.ascontiguousarray(texture[y : y + SIDE, x : x + SIDE]) for y, x in corners]


def mvtec_tree(root: Path) -> Path:
    """15 categories, each 2 train/good, 2 test/good and 2 test/hole crops of one bundled texture."""
    for index, name in enumerate(CATEGORIES):
        crops = texture_crops(TEXTURES[index % len(TEXTURES)](), 6, seed=index)
        write_category(root, name, crops[:4], crops[4:], n_train=2)
    return root


def twin_tree(root: Path, names: tuple[str, ...]) -> Path:
    """Categories whose good test images are exact copies of the references: only the blobs can score high."""
    for index, name in enumerate(names):
        crop = texture_crops(TEXTURES[index % len(TEXTURES)](), 1, seed=10 + index)[0]
        write_category(root, name, [crop] * 4, [crop] * 2, n_train=2)
    return root


def write_preset(path: Path, **memory: float) -> Path:
    path.write_text(json.dumps({**PRESET, "memory": {**PRESET["memory"], **memory}}))
    return path


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Outcome, Path]:
    base = tmp_path_factory.mktemp("mvtec15")
    root = mvtec_tree(base / "mvtec")
    preset = write_preset(base / "preset.json")
    out = base / "out"
    return run_eval(
        "--dataset", "mvtec", "--root", root, "--shots", "1", "--seeds", "0", "--preset", preset, "--out", out
    ), out


def test_fifteen_categories_end_to_end(full_run: tuple[Outcome, Path]) -> None:
    outcome, out = full_run
    assert outcome.code == 0, outcome.stderr
    results = json.loads((out / "results.json").read_text())
    assert list(results["categories"]) == list(CATEGORIES)
    for name in CATEGORIES:
        block = results["categories"][name]["k=1"]
        assert list(block["seeds"]) == ["0"]
        metrics = block["seeds"]["0"]
        for key in ("auroc", "aupr", "f1_max", "pixel_auroc", "aupro", "pixel_f1_max", "accuracy", "recall"):
            assert 0.0 <= metrics[key] <= 1.0 and math.isfinite(metrics[key]), (name, key)
        assert metrics["n_good"] == 2 and metrics["n_defective"] == 2
        assert block["summary"]["auroc"] == {"mean": metrics["auroc"], "std": 0.0, "n": 1}
    mean_auroc = np.mean([results["categories"][n]["k=1"]["seeds"]["0"]["auroc"] for n in CATEGORIES])
    assert results["mean"]["k=1"]["summary"]["auroc"]["mean"] == pytest.approx(mean_auroc)
    assert results["config"]["preset"]["backbone"]["image_size"] == 64
    assert results["config"]["args"]["shots"] == [1]
    assert {"torch", "numpy", "scikit-learn", "anomalygpt"} <= set(results["versions"])
    assert results["machine"]["cpu_count"] >= 1


def test_markdown_has_a_row_per_category_and_a_mean_row(full_run: tuple[Outcome, Path]) -> None:
    _, out = full_run
    rows = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| ")]
    names = [row.split("|")[1].strip() for row in rows]
    assert [n for n in names if n in CATEGORIES] == list(CATEGORIES)
    assert "**mean**" in names
    bottle = rows[names.index("bottle")]
    assert bottle.count("±") == 8  # every column has masks here: no em dash


def test_plots_exist_and_are_not_blank(full_run: tuple[Outcome, Path]) -> None:
    _, out = full_run
    pictures = [out / "roc.png", out / "histograms.png", out / "speed.png"]
    pictures += [out / "examples" / f"{name}.png" for name in CATEGORIES]
    for path in pictures:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"))
        assert min(pixels.shape) >= 200, path
        assert pixels.std() > 5, path  # drawn content, not a single colour
    assert not list(out.rglob(".*.tmp"))


def test_obvious_defects_give_auroc_one(tmp_path: Path) -> None:
    root = twin_tree(tmp_path / "data", ("tile",))
    preset = write_preset(tmp_path / "preset.json")
    outcome = run_eval(
        "--dataset",
        "mvtec",
        "--root",
        root,
        "--shots",
        "1",
        "--seeds",
        "0",
        "--preset",
        preset,
        "--out",
        tmp_path / "out",
    )
    assert outcome.code == 0, outcome.stderr
    metrics = json.loads((tmp_path / "out" / "results.json").read_text())["categories"]["tile"]["k=1"]["seeds"]["0"]
    # Good test images equal the reference, so their patches sit at distance ~0 (float16 rounding); blobs do not.
    assert (metrics["auroc"], metrics["aupr"], metrics["f1_max"]) == (1.0, 1.0, 1.0)
    assert metrics["false_alarm_rate"] == 0.0
    cached = json.loads((tmp_path / "out" / "cache" / "tile" / "k1_seed0.json").read_text())["result"]
    assert cached["labels"] == [0, 0, 1, 1]
    good, bad = cached["scores"][:2], cached["scores"][2:]
    assert max(good) < 1e-3 < min(bad)


def test_resume_recomputes_only_the_missing_setting(tmp_path: Path) -> None:
    root = twin_tree(tmp_path / "data", ("tile", "wood"))
    preset = write_preset(tmp_path / "preset.json")
    out = tmp_path / "out"
    args = ["--dataset", "mvtec", "--root", root, "--shots", "1", "--seeds", "0,1", "--preset", preset, "--out", out]
    first = run_eval(*args)
    assert first.code == 0, first.stderr
    files = sorted((out / "cache").glob("*/k*_seed*.json"))
    assert [f"{p.parent.name}/{p.name}" for p in files] == [
        "tile/k1_seed0.json",
        "tile/k1_seed1.json",
        "wood/k1_seed0.json",
        "wood/k1_seed1.json",
    ]
    stamps = {path: path.stat().st_mtime_ns for path in files}
    removed = out / "cache" / "wood" / "k1_seed0.json"
    removed.unlink()
    second = run_eval(*args)
    assert second.code == 0, second.stderr
    assert "1 settings computed, 3 reused" in second.stderr
    assert removed.is_file()
    assert all(path.stat().st_mtime_ns == stamp for path, stamp in stamps.items() if path != removed)
    before = (out / "results.json").read_text()
    changed = run_eval(*args[:-4], "--preset", write_preset(tmp_path / "other.json", sigma=2.0), "--out", out)
    assert changed.code == 2
    assert changed.stderr.count("\n") == 1 and "different configuration (preset.memory.sigma changed)" in changed.stderr
    assert (out / "results.json").read_text() == before


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return twin_tree(tmp_path_factory.mktemp("small"), ("tile",))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"--dataset": "kolektor"}, "--dataset: unknown dataset 'kolektor'; known: mvtec, visa, elpv, folder"),
        ({"--root": "{missing}"}, "--root: folder"),
        ({"--root": None}, "--root: required for --dataset mvtec"),
        ({"--categories": "tile,wood"}, "--categories: unknown mvtec category 'wood'; known: tile"),
        ({"--shots": "1,x"}, "--shots: 'x' is not an integer"),
        ({"--shots": "0"}, "--shots: 0 is out of range"),
        ({"--shots": "17"}, "--shots: 17 is out of range"),
        ({"--seeds": "-1"}, "--seeds: -1 is out of range"),
        ({"--shots": "3"}, "--shots: k=3 is larger than the reference pool of tile (2 good images)"),
        ({"--out": "{file}"}, "--out exists and is not a folder"),
        ({"--zero-shot": "", "--preset": "{plain}"}, "--zero-shot: preset 'plain' has no trained decoder"),
        ({"--preset": "nope"}, "unknown preset 'nope'"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    small_tree: Path, tmp_path: Path, changes: dict[str, str | None], message: str
) -> None:
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("x")
    out = tmp_path / "out"
    options = {"--dataset": "mvtec", "--root": str(small_tree), "--shots": "1", "--seeds": "0", "--out": str(out)}
    options.update(changes)
    argv = [part for option, value in options.items() if value is not None for part in (option, value) if part]
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({**PRESET, "name": "plain"}))
    outcome = run_eval(*[arg.format(missing=tmp_path / "missing", file=a_file, plain=plain) for arg in argv])
    assert outcome.code == 2
    assert outcome.stderr.startswith("anomalygpt eval: error: ") and outcome.stderr.count("\n") == 1
    assert message in outcome.stderr
    assert not out.exists()
    assert a_file.read_text() == "x"


def test_held_out_samples_are_scored_apart_only_when_asked(tmp_path: Path) -> None:
    from anomalygpt.config import load_preset
    from anomalygpt.inspection import build_inspector
    from eval.datasets import Sample, load_split
    from eval.runner import EvalConfig, run_eval

    root = twin_tree(tmp_path / "data", ("tile",))
    split = load_split("mvtec", root, "tile")
    blobs = [sample for sample in split.test if sample.label == 1]
    held = (Sample(blobs[0].path, 1, "tile", "p=1/3"), Sample(split.test[0].path, 0, "tile", "good"))
    split = type(split)("tile", split.reference_pool, tuple(blobs), pool_is_test=True, held_out=held)
    preset = load_preset(str(write_preset(tmp_path / "preset.json")))
    inspector = build_inspector(preset)
    config = EvalConfig("mvtec", root, ("tile",), (1,), (0,), preset, tmp_path / "out")
    without = run_eval(inspector, config, {"tile": split}).results[0]
    assert without.metrics["held_out_flagged"] is None and without.held_out_scores == []
    run = run_eval(inspector, EvalConfig(**{**config.__dict__, "held_out": True}), {"tile": split})
    assert run.computed == [("tile", 1, 0)]  # the cached result lacks the held-out scores: scored again
    result = run.results[0]
    # The blob copy scores as its twin in the test set; the good copy equals the reference and stays below.
    assert result.held_out_scores[0] == pytest.approx(result.scores[result.paths.index(str(blobs[0].path))])
    assert result.held_out_scores[1] < 1e-3
    assert result.metrics["held_out_flagged"] == pytest.approx(
        0.5 if result.held_out_scores[0] > result.metrics["threshold"] else 0.0
    )


def test_zero_shot_batch_scores_each_test_set_against_itself(tmp_path: Path) -> None:
    root = tmp_path / "data"
    crop = texture_crops(skimage.data.brick(), 1, seed=3)[0]
    write_category(root, "tile", [crop] * 16, [crop] * 4, n_train=2)  # 14 good copies and 4 blobs to score
    preset = write_preset(tmp_path / "preset.json")
    out = tmp_path / "out"
    outcome = run_eval("--dataset", "mvtec", "--root", root, "--zero-shot", "batch", "--preset", preset, "--out", out)
    assert outcome.code == 0, outcome.stderr
    metrics = json.loads((out / "results.json").read_text())["categories"]["tile"]["k=0"]["seeds"]["0"]
    # The good copies match each other exactly; each blob matches nothing: a clean split, with no reference at all.
    assert metrics["auroc"] == 1.0 and (metrics["n_good"], metrics["n_defective"]) == (14, 4)
    assert metrics["false_alarm_rate"] == 0.0 and metrics["recall"] == 1.0  # the batch's own threshold
    assert metrics["pixel_auroc"] > 0.9
    cached = json.loads((out / "cache" / "tile" / "k0_seed0.json").read_text())["result"]
    assert cached["references"] == [] and "zero-shot batch" in cached["calibration"]["method"]
    # Example pictures as the other modes get them: the picked images' batch maps, made again, score as in the run.
    examples = json.loads((out / "results.json").read_text())["examples"]["tile"]
    run_scores = dict(zip(cached["paths"], cached["scores"], strict=True))
    assert [e["caption"] for e in examples][:2] == ["highest-scoring defective", "lowest-scoring defective"]
    for example in examples:
        assert example["score"] == pytest.approx(run_scores[example["path"]], rel=1e-4, abs=1e-6)
        assert example["threshold"] == cached["calibration"]["image_threshold"]
    with Image.open(out / "examples" / "tile.png") as picture:
        assert np.asarray(picture.convert("L")).std() > 5
    text = run_eval("--dataset", "mvtec", "--root", root, "--zero-shot", "--preset", preset, "--out", out)
    assert text.code == 2 and "--zero-shot: preset 't' has no trained decoder" in text.stderr
    few = tmp_path / "few"
    write_category(few, "tile", [crop] * 6, [crop] * 2, n_train=2)
    small = run_eval("--dataset", "mvtec", "--root", few, "--zero-shot", "batch", "--out", tmp_path / "o2")
    assert small.code == 2 and "--zero-shot batch: tile has fewer than 16 test images" in small.stderr
    assert not (tmp_path / "o2").exists()
