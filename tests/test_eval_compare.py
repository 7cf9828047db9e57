"""`anomalygpt eval --method ...`: one full-shot split for every method, fair timings, cache and resume."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image

import anomalygpt.detector as detector_module
from anomalygpt.detector import (
    DetectorError,
    FeatureCache,
    FitReport,
    Prediction,
    Stopwatch,
    gaussian_threshold,
    load_batches,
)
from eval.cli import main
from eval.compare import Costs, charged
from eval.datasets import load_split

SIDE = 64
N_GOOD, N_BAD = 14, 5
PRESET = {"name": "t", "backbone": {"name": "efficientnet-lite0", "image_size": 64}, "memory": {"augment": False}}
FITTED: list[list[str]] = []  # the normals every MeanImageDetector was fitted on, in order


class MeanImageDetector:
    """A minimal real baseline: distance to the mean good image; it also asks the shared cache for features."""

    name = "mean-image"
    config = None

    def __init__(self, features: FeatureCache, seed: int) -> None:
        self.features = features
        self.threshold = float("nan")

    def fit(self, normals: Sequence[Path], workdir: Path | None = None) -> FitReport:
        watch = Stopwatch()
        FITTED.append([str(path) for path in normals])
        images = [image for batch in load_batches(normals, "fit") for image in batch]
        self.mean = np.mean([image.astype(np.float32) for image in images], axis=0)
        self.threshold = gaussian_threshold(self.predict(images).scores)
        return FitReport(len(normals), watch.seconds, self.threshold, "mean + 3 std of the training scores")

    def predict(self, images: Sequence[np.ndarray]) -> Prediction:
        self.features.patches(images)
        maps = np.stack([np.abs(image.astype(np.float32) - self.mean).mean(axis=-1) for image in images])
        return Prediction(maps.reshape(len(images), -1).max(axis=1).astype(np.float64), maps)


def build_mean_detector(features: FeatureCache, seed: int) -> MeanImageDetector:
    return MeanImageDetector(features, seed)


@pytest.fixture
def mean_method(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(detector_module.BASELINES, "mean-image", ("test_eval_compare", "build_mean_detector"))
    monkeypatch.setattr(detector_module, "METHODS", (*detector_module.METHODS, "mean-image"))
    FITTED.clear()
    return "mean-image"


def folder_tree(root: Path) -> Path:
    """A plain folder dataset: good/ crops of one texture and hole/ crops with a dark disk."""
    texture, rng = skimage.data.brick(), np.random.default_rng(0)
    for index in range(N_GOOD + N_BAD):
        y, x = rng.integers(0, texture.shape[0] - SIDE, size=2)
        crop = np.ascontiguousarray(texture[y : y + SIDE, x : x + SIDE])
        folder = "good" if index < N_GOOD else "hole"
        if folder == "hole":
            cv2.circle(crop, (32, 30), 8, 10, thickness=-1)
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(crop).save(root / folder / f"{index:02d}.png")
    return root


def run(*args: str | Path) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main([str(arg) for arg in args])
    return code, err.getvalue()


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    preset = tmp_path / "preset.json"
    preset.write_text(json.dumps(PRESET))
    return folder_tree(tmp_path / "data"), preset


def test_every_method_is_scored_on_the_same_held_out_split(tree: tuple[Path, Path], mean_method: str) -> None:
    root, preset = tree
    out = root.parent / "out"
    args = ("--dataset", "folder", "--root", root, "--method", f"inspector,{mean_method}", "--shots", "1,2")
    code, err = run(*args, "--seeds", "0,1", "--preset", preset, "--out", out)
    assert code == 0, err
    goods = {str(path) for path in sorted((root / "good").iterdir())}
    n_test_good = round(N_GOOD * 0.3)
    for seed in (0, 1):
        results = {
            name: json.loads((out / "cache" / "data" / f"{name}_seed{seed}.json").read_text())["result"]
            for name in ("k1", "k2", f"{mean_method}")
        }
        tested = {name: result["paths"] for name, result in results.items()}
        assert tested["k1"] == tested["k2"] == tested[mean_method]  # one test set for every method
        test_goods = {p for p, label in zip(tested["k1"], results["k1"]["labels"], strict=True) if label == 0}
        assert len(test_goods) == n_test_good and sum(results["k1"]["labels"]) == N_BAD
        train = set(FITTED[seed])
        assert train == goods - test_goods  # the baseline trained on every good image not held out
        assert set(results["k1"]["references"]) <= set(results["k2"]["references"]) <= train  # nested draws
        assert results[mean_method]["k"] == N_GOOD - n_test_good
    document = json.loads((out / "results.json").read_text())
    assert list(document["mean"]) == ["k=1", "k=2", mean_method]
    assert document["mean"][mean_method]["summary"]["auroc"]["mean"] == pytest.approx(1.0)  # a dark disk on brick
    assert "| data | mean-image |" in (out / "results.md").read_text()

    FITTED.clear()
    code, err = run(*args, "--seeds", "0,1", "--preset", preset, "--out", out)
    assert code == 0 and "0 settings computed, 6 reused" in err and FITTED == []


def test_shared_cache_work_is_charged_per_image_asked_for(small_backbone: object) -> None:
    features = FeatureCache(small_backbone, keep=True)  # type: ignore[arg-type]
    images = [np.full((SIDE, SIDE, 3), value, dtype=np.uint8) for value in (10, 90, 170)]
    features.patches(images)  # now cached: asking again costs the cache nothing
    costs = Costs(decode_ms=0.0, encode_ms=40.0)
    _, timed = charged(features, costs, lambda: features.patches(images + images[:1]))
    assert timed.served == 4
    assert timed.backbone_seconds == pytest.approx(4 * 0.040)
    assert 0.160 <= timed.seconds < 0.160 + 0.5  # charged cost plus the cache lookups' real time


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--method", "inspector,nosuch"), "--method: unknown method 'nosuch'"),
        (("--method", "mean-image", "--zero-shot"), "--zero-shot: the decoder alone has no training set"),
        (("--method", "mean-image", "--test-fraction", "1.5"), "--test-fraction: 1.5 must be between 0 and 1"),
        (("--method", "inspector,mean-image", "--shots", "12"), "12 needed"),
    ],
)
def test_bad_method_options_fail_in_one_line_and_write_nothing(
    tree: tuple[Path, Path], mean_method: str, extra: tuple[str, ...], message: str
) -> None:
    root, preset = tree
    out = root.parent / "out"
    code, err = run("--dataset", "folder", "--root", root, "--seeds", "0", "--preset", preset, "--out", out, *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_full_shot_split_holds_out_a_seeded_share_of_the_good_images(tree: tuple[Path, Path]) -> None:
    from eval.datasets import full_shot_split

    split = load_split("folder", tree[0], "data")
    train0, test0 = full_shot_split(split, 0, 0.3)
    train1, _ = full_shot_split(split, 1, 0.3)
    goods = [s.path for s in test0 if s.label == 0]
    assert len(goods) == 4 and len(train0) == 10 and not set(goods) & set(train0)
    assert set(goods) | set(train0) == set(split.reference_pool)
    assert train0 != train1 and full_shot_split(split, 0, 0.3)[0] == train0


def test_normals_of_another_size_are_named_in_one_line(tree: tuple[Path, Path]) -> None:
    goods = sorted((tree[0] / "good").iterdir())
    odd = tree[0].parent / "odd.png"
    Image.fromarray(np.zeros((SIDE, SIDE + 8), dtype=np.uint8)).save(odd)
    with pytest.raises(DetectorError) as caught:
        list(load_batches([*goods[:3], odd], "fit"))
    assert str(caught.value) == f"{odd}: {SIDE + 8}x{SIDE} px, others {SIDE}x{SIDE} px"
