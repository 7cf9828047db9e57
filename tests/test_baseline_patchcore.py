import math

import numpy as np
import pytest
import torch
from conftest import BLOB_RADIUS

from anomalygpt.baselines.patchcore import (
    PatchCoreConfig,
    PatchCoreDetector,
    build,
    coreset_size,
    reweighted_scores,
)
from anomalygpt.detector import DetectorError, build_detector, validation_split


@pytest.fixture(scope="module")
def fitted(feature_cache, blob_data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("patchcore")
    detector = build(feature_cache, seed=0)
    report = detector.fit(blob_data["normals"], workdir)
    return detector, report, workdir


def test_every_blob_scores_above_every_held_out_good_crop(fitted, blob_data):
    detector, _, _ = fitted
    good = detector.predict(blob_data["good"]).scores
    bad = detector.predict(blob_data["anomalous"]).scores
    assert bad.min() > good.max()


def test_map_peaks_inside_the_blob(fitted, blob_data):
    detector, _, _ = fitted
    maps = detector.predict(blob_data["anomalous"]).maps
    assert maps.shape == (12, 128, 128) and maps.dtype == np.float32
    for anomaly_map, (cx, cy) in zip(maps, blob_data["centres"], strict=True):
        y, x = np.unravel_index(anomaly_map.argmax(), anomaly_map.shape)
        assert (x - cx) ** 2 + (y - cy) ** 2 <= BLOB_RADIUS**2


def test_threshold_is_mean_plus_3_std_of_held_out_normals(fitted, blob_data):
    detector, report, _ = fitted
    _, held_out = validation_split(12, seed=0)
    scores = detector.predict([blob_data["normals"][i] for i in held_out]).scores
    assert report.threshold == detector.threshold
    assert report.threshold == pytest.approx(scores.mean() + 3 * scores.std(ddof=1), rel=1e-5)
    assert report.n_images == 12 and not report.resumed and "held-out" in report.threshold_rule


def test_bank_is_the_minimum_coreset_of_the_training_patches(fitted):
    detector, _, _ = fitted
    assert detector.bank is not None
    # 10 training crops x 16 x 16 stride-8 positions = 2560 patches; 1% is below the minimum of 1000.
    assert detector.bank.shape == (1000, 40 + 112)


def test_coreset_size_honours_ratio_and_minimum():
    assert coreset_size(1_600_000, 0.01, 1000) == 16_000
    assert coreset_size(50_000, 0.01, 1000) == 1000  # the minimum
    assert coreset_size(500, 0.01, 1000) == 500  # never more than there are
    assert coreset_size(2560, 0.1, 1) == 256


def test_coreset_ratio_sets_the_bank_size_without_the_global_rng(feature_cache, blob_data):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    detector = build(feature_cache, seed=0, config=PatchCoreConfig(coreset_ratio=0.1, min_coreset=1))
    detector.fit(blob_data["normals"])
    assert detector.bank is not None and detector.bank.shape[0] == math.ceil(0.1 * 2560)
    assert torch.equal(before, torch.random.get_rng_state())


def test_reweighting_matches_hand_computed_weight_and_stays_finite():
    bank = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    # Worst patch 0.4: nearest m* = 0 (s* = 0.4); its b = 2 neighbours are 0 and 1, at 0.4 and 0.6 from the patch.
    score = reweighted_scores(torch.tensor([[0.4]]), torch.tensor([0]), bank, 2, 1 << 20)
    weight = 1 - math.exp(0.4) / (math.exp(0.4) + math.exp(0.6))
    assert score.item() == pytest.approx(weight * 0.4, rel=1e-5)
    # Worst patch 1000, m* = 10 (s* = 990); b = 9 is capped at the 4 bank rows, at 1000, 999, 998 and 990.
    far = reweighted_scores(torch.tensor([[1000.0]]), torch.tensor([3]), bank, 9, 1 << 20)  # exp(990) overflows
    expected = 990 * (1 - 1 / (1 + math.exp(8) + math.exp(9) + math.exp(10)))
    assert torch.isfinite(far).all()
    assert far.item() == pytest.approx(expected, rel=1e-6)


def test_second_fit_with_the_same_workdir_resumes(fitted, feature_cache, blob_data):
    detector, report, workdir = fitted
    assert (workdir / "patchcore.safetensors").is_file()
    again = build(feature_cache, seed=0)
    resumed = again.fit(blob_data["normals"], workdir)
    assert resumed.resumed and resumed.threshold == report.threshold
    first, second = detector.predict(blob_data["anomalous"]), again.predict(blob_data["anomalous"])
    np.testing.assert_array_equal(first.scores, second.scores)
    np.testing.assert_array_equal(first.maps, second.maps)


def test_another_seed_does_not_reuse_the_checkpoint(fitted, feature_cache, blob_data):
    _, _, workdir = fitted
    report = build(feature_cache, seed=1).fit(blob_data["normals"], workdir)
    assert not report.resumed


@pytest.mark.parametrize(
    "config",
    [
        PatchCoreConfig(coreset_ratio=0.0),
        PatchCoreConfig(coreset_ratio=1.5),
        PatchCoreConfig(min_coreset=0),
        PatchCoreConfig(neighbourhood=2),
        PatchCoreConfig(projection_dim=0),
        PatchCoreConfig(reweight_neighbours=0),
        PatchCoreConfig(sigma=-1.0),
    ],
)
def test_bad_config_raises(feature_cache, config):
    with pytest.raises(DetectorError, match="patchcore: "):
        build(feature_cache, seed=0, config=config)


def test_predict_before_fit_raises(feature_cache, blob_data):
    with pytest.raises(DetectorError, match="before fit"):
        build(feature_cache, seed=0).predict(blob_data["good"])


def test_built_by_name(feature_cache):
    assert isinstance(build_detector("patchcore", feature_cache, seed=0), PatchCoreDetector)
