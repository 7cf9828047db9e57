import numpy as np
import pytest
import torch
from conftest import BLOB_RADIUS, texture_crops, with_dark_blob

from anomalygpt.baselines import simplenet
from anomalygpt.baselines.simplenet import CHECKPOINT_NAME, SimpleNetConfig, SimpleNetDetector, build, truncated_l1
from anomalygpt.detector import DetectorError, build_detector, validation_split
from anomalygpt.state import load_state

SMALL = SimpleNetConfig(steps=300, positions_per_step=1024, checkpoint_every=20)


@pytest.fixture(scope="module")
def normals():
    return texture_crops(12, seed=0)


@pytest.fixture(scope="module")
def fitted(feature_cache, normals):
    detector = build(feature_cache, seed=0, config=SMALL)
    return detector, detector.fit(normals)


def blob_centers(n: int, seed: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    # A blob near the border raises the border's own (already high) scores first: keep it a quarter in.
    return [(int(x), int(y)) for x, y in rng.integers(32, 96, size=(n, 2))]


def test_truncated_l1_against_hand_values():
    normal = torch.tensor([1.0, 0.2, -1.0])  # hinge at 0.5: 0, 0.3, 1.5 -> mean 0.6
    noisy = torch.tensor([-1.0, 0.0, 0.7])  # hinge at -0.5: 0, 0.5, 1.2 -> mean 0.5667
    assert truncated_l1(normal, noisy).item() == pytest.approx(0.6 + 1.7 / 3, abs=1e-6)
    assert truncated_l1(torch.tensor([0.5, 2.0]), torch.tensor([-0.5, -3.0])).item() == 0.0


def test_blobs_score_above_held_out_good_crops(fitted):
    detector, _ = fitted
    good = detector.predict(texture_crops(10, seed=1))
    centers = blob_centers(10, seed=3)
    crops = texture_crops(10, seed=2)
    bad = detector.predict([with_dark_blob(crop, c, BLOB_RADIUS) for crop, c in zip(crops, centers, strict=True)])
    assert bad.scores.min() > good.scores.max()
    assert good.maps.shape == (10, 128, 128) and good.maps.dtype == np.float32
    np.testing.assert_allclose(bad.scores, bad.maps.reshape(10, -1).max(axis=1))
    for anomaly_map, (x, y) in zip(bad.maps, centers, strict=True):
        peak_y, peak_x = np.unravel_index(np.argmax(anomaly_map), anomaly_map.shape)
        assert (peak_x - x) ** 2 + (peak_y - y) ** 2 <= BLOB_RADIUS**2


def test_fit_leaves_the_global_rng_alone(feature_cache, normals):
    before = torch.get_rng_state()
    build(feature_cache, 0, SimpleNetConfig(steps=2, positions_per_step=64)).fit(normals)
    assert torch.equal(torch.get_rng_state(), before)


def test_threshold_is_mean_plus_three_std_of_held_out_normals(fitted, normals):
    detector, report = fitted
    _, validation = validation_split(len(normals), seed=0)
    scores = detector.predict([normals[i] for i in validation]).scores
    assert report.threshold == pytest.approx(scores.mean() + 3 * scores.std(ddof=1), rel=1e-6)
    assert detector.threshold == report.threshold
    assert "held-out" in report.threshold_rule and not report.resumed
    assert report.n_images == len(normals)
    assert len(detector.losses) == SMALL.steps


def test_resume_gives_the_uninterrupted_fit(feature_cache, normals, tmp_path, monkeypatch):
    config = SimpleNetConfig(steps=60, positions_per_step=512, checkpoint_every=20)
    reference = build(feature_cache, 0, config)
    reference.fit(normals)
    queries = texture_crops(3, seed=4)
    expected = reference.predict(queries)

    shorter = build(feature_cache, 0, SimpleNetConfig(steps=40, positions_per_step=512, checkpoint_every=20))
    assert not shorter.fit(normals, tmp_path / "extend").resumed
    extended = build(feature_cache, 0, config)
    assert extended.fit(normals, tmp_path / "extend").resumed
    np.testing.assert_array_equal(extended.predict(queries).maps, expected.maps)
    assert extended.losses == reference.losses

    calls = 0

    def crash_at_step_30(normal: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls > 30:
            raise KeyboardInterrupt
        return truncated_l1(normal, noisy)

    monkeypatch.setattr(simplenet, "truncated_l1", crash_at_step_30)
    with pytest.raises(KeyboardInterrupt):
        build(feature_cache, 0, config).fit(normals, tmp_path / "crash")
    monkeypatch.undo()
    assert load_state(tmp_path / "crash" / CHECKPOINT_NAME)["step"] == 20
    resumed = build(feature_cache, 0, config)
    assert resumed.fit(normals, tmp_path / "crash").resumed
    np.testing.assert_array_equal(resumed.predict(queries).maps, expected.maps)

    assert not build(feature_cache, 1, config).fit(normals, tmp_path / "crash").resumed  # another seed starts over


@pytest.mark.parametrize(
    "field, value",
    [("steps", 0), ("noise_scale", 0.0), ("positions_per_step", -1), ("neighbourhood", 2), ("weight_decay", -1.0)],
)
def test_bad_config_raises(field, value):
    with pytest.raises(DetectorError, match=field):
        SimpleNetConfig(**{field: value})


def test_no_hidden_units_raises(feature_cache):
    with pytest.raises(DetectorError, match="hidden"):
        build(feature_cache, 0, SimpleNetConfig(hidden_ratio=1e-4))


def test_predict_before_fit_raises(feature_cache):
    with pytest.raises(DetectorError, match="before fit"):
        build(feature_cache, 0).predict(texture_crops(1))


def test_build_detector_finds_simplenet(feature_cache):
    assert isinstance(build_detector("simplenet", feature_cache, seed=2), SimpleNetDetector)
