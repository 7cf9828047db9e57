"""Report arithmetic (mean and spread over seeds, the mean row), the markdown table and example picks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eval.report import markdown_report, results_document, showcase, spread, summaries
from eval.runner import EvalRun, SettingResult, example_picks, flat


def setting(category: str, k: int, seed: int, auroc: float, pixel: float | None = None) -> SettingResult:
    """A result whose metrics are all 0.5 except image AUROC (and pixel AUROC/AUPRO when given)."""
    metrics: dict[str, float | int | None] = dict.fromkeys(
        ("aupr", "f1_max", "accuracy", "false_alarm_rate", "recall", "threshold", "index_ms", "peak_rss_mb"), 0.5
    )
    metrics |= {"auroc": auroc, "pixel_auroc": pixel, "aupro": pixel, "pixel_f1_max": pixel}
    metrics |= {"held_out_flagged": None, "encode_ms_per_image": 10.0, "score_ms_per_image": 5.0, "ms_per_image": 15.0}
    return SettingResult(
        category, k, seed, metrics, ["ref.png"], ["a.png", "b.png"], [0, 1], ["good", "hole"], [0.1, 0.9], {}
    )


def test_spread_is_mean_and_sample_std() -> None:
    assert spread([0.8, 0.9, 1.0]) == pytest.approx({"mean": 0.9, "std": 0.1, "n": 3})
    assert spread([0.7]) == {"mean": 0.7, "std": 0.0, "n": 1}
    assert spread([0.7, None]) is None


def test_mean_row_averages_categories_within_each_seed_first() -> None:
    results = [setting("a", 1, 0, 0.8), setting("a", 1, 1, 0.9), setting("b", 1, 0, 1.0), setting("b", 1, 1, 0.7)]
    table = summaries(results)
    assert table["categories"]["a"]["k=1"]["summary"]["auroc"] == pytest.approx(
        {"mean": 0.85, "std": 0.0707107, "n": 2}
    )
    # per-seed means over categories: 0.9 and 0.8 -> mean 0.85, std sqrt(2 * 0.05^2 / 1)
    assert table["mean"]["k=1"]["seeds"]["0"]["auroc"] == pytest.approx(0.9)
    assert table["mean"]["k=1"]["summary"]["auroc"] == pytest.approx({"mean": 0.85, "std": math.sqrt(0.005), "n": 2})
    assert table["mean"]["k=1"]["summary"]["pixel_auroc"] is None  # no masks anywhere


def test_markdown_rows_cells_and_dashes() -> None:
    results = [
        setting("a", 1, 0, 0.8, pixel=0.9),
        setting("a", 1, 1, 0.9, pixel=0.7),
        setting("a", 4, 0, 1.0, pixel=0.8),
    ]
    results += [setting("a", 4, 1, 1.0, pixel=0.8), setting("b", 1, 0, 0.6), setting("b", 1, 1, 0.6)]
    results += [setting("b", 4, 0, 0.6), setting("b", 4, 1, 0.6)]
    run = EvalRun(results, computed=[("a", 1, 0)], reused=[], seconds=3.0)
    config = {"args": {"dataset": "mvtec", "shots": [1, 4], "seeds": [0, 1]}, "preset": {"name": "t"}}
    text = markdown_report(results_document(config, run, examples={}))
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in text.splitlines() if line.startswith("| ")}
    assert "| 0.850 ± 0.071 |" in rows[("a", "1")]  # image AUROC of seeds 0.8 and 0.9
    assert "| 0.800 ± 0.141 |" in rows[("a", "1")]  # pixel AUROC of seeds 0.9 and 0.7
    assert rows[("b", "1")].count("—") == 2  # no masks: pixel AUROC and AUPRO
    assert rows[("**mean**", "4")].count("—") == 2  # a category without masks: no mean pixel figure
    assert "| 0.800 ± 0.000 |" in rows[("**mean**", "4")]  # (1.0 + 0.6) / 2 on both seeds
    assert "uncertain flagged" not in text


def test_showcase_is_the_largest_k_and_its_first_seed() -> None:
    results = [setting("a", k, seed, 0.5) for k in (1, 4, 2) for seed in (2, 1)]
    chosen = showcase(results)["a"]
    assert (chosen.k, chosen.seed) == (4, 1)


def test_example_picks_best_worst_and_borderline() -> None:
    result = setting("a", 1, 0, 0.5)
    result.labels = [0, 0, 0, 1, 1, 1]
    result.scores = [0.10, 0.45, 0.30, 0.90, 0.52, 0.20]
    result.metrics["threshold"] = 0.5
    picks = dict(example_picks(result))
    assert picks["highest-scoring defective"] == 3
    assert picks["lowest-scoring defective"] == 5
    assert picks["highest-scoring good"] == 1
    assert picks["defective nearest the threshold"] == 4
    assert "good nearest the threshold" not in picks  # index 1 again: shown once
    assert len(picks) == 4 and np.unique(list(picks.values())).size == 4


def test_flat_names_nested_keys() -> None:
    assert flat({"a": 1, "b": {"c": 2, "d": {"e": [3]}}}) == {"a": 1, "b.c": 2, "b.d.e": [3]}


def test_the_markdown_title_names_the_elpv_half() -> None:
    run = EvalRun([setting("mono", 4, 0, 0.8)], computed=[("mono", 4, 0)], reused=[], seconds=1.0)
    for half, title in [
        ("dev", "# anomalygpt eval: elpv, development half (odd-numbered cells)"),
        ("test", "# anomalygpt eval: elpv, test half (even-numbered cells)"),
        ("all", "# anomalygpt eval: elpv"),
    ]:
        config = {"args": {"dataset": "elpv", "shots": [4], "seeds": [0], "half": half}, "preset": {"name": "t"}}
        assert markdown_report(results_document(config, run, examples={})).splitlines()[0] == title


def test_the_examples_title_names_cyan_only_when_there_is_ground_truth() -> None:
    from eval.report import examples_title
    from eval.runner import ExamplePanel

    def panel(mask: np.ndarray | None) -> ExamplePanel:
        image, scores = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.float32)
        return ExamplePanel("highest-scoring good", "a.png", 0, "good", 0.1, 0.5, image, scores, mask, [], (0.0, 1.0))

    assert examples_title("mono", [panel(None)]) == "mono: examples (white boxes: detected regions)"
    with_mask = examples_title("bottle", [panel(None), panel(np.ones((8, 8), bool))])
    assert with_mask == "bottle: examples (white boxes: detected regions; cyan: ground truth)"
