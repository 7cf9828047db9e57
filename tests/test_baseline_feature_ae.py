import numpy as np
import pytest
import torch
from conftest import BLOB_RADIUS
from torch import nn

from anomalygpt.baselines.feature_ae import FeatureAEConfig, FeatureAEDetector, build
from anomalygpt.detector import DetectorError, build_detector

# Twelve 128 px crops give 3 steps an epoch: more epochs and a higher rate than the ELPV-sized default.
SMALL = FeatureAEConfig(epochs=60, batch_images=4, learning_rate=1e-2)
QUICK = FeatureAEConfig(epochs=3, batch_images=4)  # checkpoint mechanics only


@pytest.fixture(scope="module")
def fitted(feature_cache, blob_data):
    detector = build(feature_cache, seed=0, config=SMALL)
    return detector, detector.fit(blob_data["normals"])


def test_every_blob_scores_above_every_held_out_good_crop(fitted, blob_data):
    detector, _ = fitted
    good = detector.predict(blob_data["good"]).scores
    bad = detector.predict(blob_data["anomalous"]).scores
    assert bad.min() > good.max()


def test_map_peaks_inside_the_blob(fitted, blob_data):
    detector, _ = fitted
    maps = detector.predict(blob_data["anomalous"]).maps
    assert maps.shape == (12, 128, 128) and maps.dtype == np.float32
    for anomaly_map, (cx, cy) in zip(maps, blob_data["centres"], strict=True):
        y, x = np.unravel_index(anomaly_map.argmax(), anomaly_map.shape)
        assert (x - cx) ** 2 + (y - cy) ** 2 <= BLOB_RADIUS**2


def test_threshold_is_mean_plus_3_std_of_the_training_scores(fitted, blob_data):
    detector, report = fitted
    scores = detector.predict(blob_data["normals"]).scores
    assert report.threshold == detector.threshold
    assert report.threshold == pytest.approx(scores.mean() + 3 * scores.std(ddof=1), rel=1e-6)
    assert report.n_images == 12 and not report.resumed and "training normals" in report.threshold_rule


def test_training_lowers_the_loss_and_widths_follow_the_features(fitted):
    detector, _ = fitted
    assert len(detector.losses) == SMALL.epochs and detector.losses[-1] < 0.5 * detector.losses[0]
    convs = [layer for layer in detector.model or [] if isinstance(layer, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(152, 64), (64, 32), (32, 64), (64, 152)]


def test_refit_with_the_same_workdir_resumes_and_another_seed_does_not(feature_cache, blob_data, tmp_path):
    first = build(feature_cache, seed=0, config=QUICK)
    assert not first.fit(blob_data["normals"], tmp_path).resumed
    assert (tmp_path / "feature-ae.safetensors").is_file()
    again = build(feature_cache, seed=0, config=QUICK)
    report = again.fit(blob_data["normals"], tmp_path)
    assert report.resumed and report.threshold == first.threshold and again.losses == first.losses
    a, b = first.predict(blob_data["anomalous"]), again.predict(blob_data["anomalous"])
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.maps, b.maps)
    assert not build(feature_cache, seed=1, config=QUICK).fit(blob_data["normals"], tmp_path).resumed


def test_interrupted_training_resumes_from_the_last_epoch_to_the_same_model(
    feature_cache, blob_data, tmp_path, monkeypatch
):
    unbroken = build(feature_cache, seed=0, config=QUICK)
    unbroken.fit(blob_data["normals"])
    original = FeatureAEDetector.train_epoch
    epochs_run: list[int] = []

    def crash_in_second_epoch(self, model, optimiser, grids, epoch):
        epochs_run.append(epoch)
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, model, optimiser, grids, epoch)

    monkeypatch.setattr(FeatureAEDetector, "train_epoch", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        build(feature_cache, seed=0, config=QUICK).fit(blob_data["normals"], tmp_path)
    monkeypatch.setattr(FeatureAEDetector, "train_epoch", original)
    resumed = build(feature_cache, seed=0, config=QUICK)
    report = resumed.fit(blob_data["normals"], tmp_path)
    assert epochs_run == [0, 1] and report.resumed
    assert resumed.losses == unbroken.losses and report.threshold == unbroken.threshold
    np.testing.assert_array_equal(
        resumed.predict(blob_data["anomalous"]).maps, unbroken.predict(blob_data["anomalous"]).maps
    )


def test_training_uses_no_global_rng(feature_cache, blob_data):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    build(feature_cache, seed=0, config=QUICK).fit(blob_data["normals"])
    assert torch.equal(before, torch.random.get_rng_state())


@pytest.mark.parametrize(
    "config",
    [
        FeatureAEConfig(epochs=0),
        FeatureAEConfig(hidden=0),
        FeatureAEConfig(bottleneck=0),
        FeatureAEConfig(batch_images=0),
        FeatureAEConfig(neighbourhood=4),
        FeatureAEConfig(learning_rate=0.0),
        FeatureAEConfig(sigma=-1.0),
        FeatureAEConfig(top_fraction=0.0),
    ],
)
def test_bad_config_raises(feature_cache, config):
    with pytest.raises(DetectorError, match="feature-ae: "):
        build(feature_cache, seed=0, config=config)


def test_predict_before_fit_raises(feature_cache, blob_data):
    with pytest.raises(DetectorError, match="before fit"):
        build(feature_cache, seed=0).predict(blob_data["good"])


def test_built_by_name(feature_cache):
    assert isinstance(build_detector("feature-ae", feature_cache, seed=0), FeatureAEDetector)
