import numpy as np
import pytest
from conftest import texture_crops

from anomalygpt.calibration import CalibrationConfig, calibrate, conformal_rank, held_out_choice, held_out_maps
from anomalygpt.memory import MemoryConfig, PatchMemory, top_mean


def build(backbone, images, cfg, augment=True):
    """A memory and every reference's views, as Inspector.fit keeps them for calibration."""
    views = {}
    memory = PatchMemory.build(backbone, images, cfg, augment, on_reference=lambda i, v: views.__setitem__(i, v))
    return memory, views


@pytest.fixture(scope="module")
def memories(small_backbone):
    cfg = MemoryConfig(max_patches=100_000)
    return {k: build(small_backbone, texture_crops(k, seed=3), cfg) for k in (1, 3)}


def test_leave_one_out_scores_every_view_of_every_reference(memories):
    held = held_out_maps(*memories[3])
    maps = list(held.maps)
    assert len(maps) == 3 * 8 and held.views == 8 and maps[0].shape == (128, 128)
    assert "leave-one-out" in held.method


def test_held_out_scores_are_higher_than_scores_against_the_full_memory(memories):
    memory, views = memories[3]
    held_out = [top_mean(m, memory.cfg.top_fraction) for m in list(held_out_maps(memory, views).maps)[::8]]
    seen = [memory.image_score(m) for m in memory.anomaly_maps(texture_crops(3, seed=3))]
    # A reference in the memory matches itself; held out, it must be matched by the others.
    assert min(held_out) > 5 * max(seen)


def test_k1_holds_out_each_quadrant(memories):
    maps, _, method = held_out_maps(*memories[1])
    assert [m.shape for m in maps] == [(64, 64)] * 4
    assert "quadrant" in method


def test_a_pool_scores_held_out_references_like_queries_against_their_nearest_others(small_backbone):
    images = texture_crops(6, seed=8)
    memory, views = build(small_backbone, images, MemoryConfig(retrieve=2), augment=False)
    chosen = held_out_choice(6, CalibrationConfig(max_held_out=4))
    assert len(chosen) == 4 and chosen == sorted(set(chosen)) and held_out_choice(3, CalibrationConfig()) == [0, 1, 2]
    held = held_out_maps(memory, {i: views[i] for i in chosen})
    maps, method = list(held.maps), held.method
    assert len(maps) == 4 and held.views == 1 and "4 of 6 references" in method and "nearest others" in method
    # Reference 0's map is its identity view against the bank of its two nearest other references.
    nearest = memory.nearest_references(memory.descriptors[chosen[0] : chosen[0] + 1], exclude=chosen[0])[0]
    expected = memory.fuse(memory.stage_distances(views[chosen[0]], memory.bank_of(nearest)), memory.image_size)
    assert np.array_equal(maps[0], expected[0])


@pytest.mark.parametrize("k", [1, 3])
def test_threshold_is_mean_plus_z_spreads_of_held_out_scores(memories, k):
    cfg = CalibrationConfig(z=2.5, spread_prior=0.0, pixel_quantile=0.99)
    cal = calibrate(*memories[k], cfg)
    scores = np.array([top_mean(m, 0.01) for m in held_out_maps(*memories[k]).maps])
    assert cal.n_scores == scores.size
    assert cal.normal_mean == pytest.approx(scores.mean(), rel=1e-6)
    assert cal.normal_spread == pytest.approx(scores.std(ddof=1), rel=1e-6)
    assert cal.image_threshold == pytest.approx(scores.mean() + 2.5 * scores.std(ddof=1), rel=1e-6)
    assert 0 < cal.pixel_threshold <= cal.image_threshold
    assert cal.margin(cal.image_threshold + 2 * cal.normal_spread) == pytest.approx(2.0)


@pytest.mark.parametrize("k", [1, 3])
def test_spread_floor_shrinks_with_the_number_of_references(memories, k):
    cal = calibrate(*memories[k], CalibrationConfig(z=3.0, spread_prior=10.0))
    floor = 10.0 / np.sqrt(k)
    assert cal.normal_spread == pytest.approx(floor * cal.normal_mean)
    assert cal.image_threshold == pytest.approx((1 + 3 * floor) * cal.normal_mean)


def test_conformal_rank_needs_enough_scores_and_keeps_its_rate():
    assert [conformal_rank(n, 0.02) for n in (0, 48, 49, 99, 208)] == [None, None, 49, 98, 205]
    assert conformal_rank(98, 0.01) is None and conformal_rank(99, 0.01) == 99
    # A new score from the same distribution passes the threshold with probability 1 - rank / (n + 1) <= rate.
    rng = np.random.default_rng(0)
    for n, rate in ((60, 0.05), (208, 0.02)):
        draws = rng.lognormal(size=(20_000, n + 1))
        thresholds = np.sort(draws[:, :n], axis=1)[:, conformal_rank(n, rate) - 1]
        passed = float((draws[:, n] > thresholds).mean())
        assert rate - 0.02 < passed <= rate + 0.003  # sampling error of 20,000 draws: ~0.0015


def test_a_pool_with_enough_references_takes_the_conformal_threshold(small_backbone):
    images = texture_crops(6, seed=8)
    memory, views = build(small_backbone, images, MemoryConfig(retrieve=2), augment=False)
    cfg = CalibrationConfig(false_alarm_rate=0.3)  # (1 - 0.3) / 0.3 = 2.3: 3 held-out references are enough
    in_order = [top_mean(m, 0.01) for m in held_out_maps(memory, views).maps]
    scores = np.sort(in_order)
    cal = calibrate(memory, views, cfg)
    assert cal.reference_scores == pytest.approx(in_order)  # kept for profiles and eval results, not for records
    assert "reference_scores" not in cal.to_dict() and cal.to_dict(scores=True)["reference_scores"] == list(in_order)
    assert cal.image_threshold == pytest.approx(scores[4])  # ceil(7 * 0.7) = 5th of 6 from the lowest
    assert "held-out score 5 of 6 from the lowest (expected false alarms at most 30.0%" in cal.method
    assert cal.normal_mean == pytest.approx(scores.mean()) and 0 < cal.pixel_threshold <= cal.image_threshold
    # The p-value: the share of the 6 references scoring as high, the query counted; anomalous exactly at <= 30 %.
    assert cal.false_alarm_rate == 0.3 and cal.p_value(scores[-1] + 1) == pytest.approx(1 / 7)
    assert cal.p_value(scores[0]) == pytest.approx(1.0) and cal.p_value(scores[2]) == pytest.approx(5 / 7)
    for score in np.linspace(scores[0] - 0.1, scores[-1] + 0.1, 101):
        p_value = cal.p_value(float(score))
        assert p_value is not None and (p_value <= 0.3) == (score > cal.image_threshold)
    # Two held-out references are too few at 30 %: mean + z spreads, as with a few references.
    few = calibrate(memory, {i: views[i] for i in (0, 1)}, cfg)
    assert "mean + 3 spreads" in few.method
    assert few.image_threshold == pytest.approx(few.normal_mean + 3 * few.normal_spread)
    assert few.false_alarm_rate is None and few.p_value(few.image_threshold + 1) is None


def test_with_every_view_held_out_the_conformal_rank_counts_references_not_views(memories):
    memory, views = memories[3]  # 3 references, 8 views each, no retrieval: 24 maps
    cal = calibrate(memory, views, CalibrationConfig(false_alarm_rate=0.25))  # 3 references: rank 3 of 3
    identity = [top_mean(m, 0.01) for m in list(held_out_maps(memory, views).maps)[::8]]
    assert cal.n_scores == 24 and cal.image_threshold == pytest.approx(max(identity))
    assert "held-out score 3 of 3" in cal.method
