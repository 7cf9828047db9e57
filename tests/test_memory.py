import numpy as np
import pytest
import torch
from conftest import texture_crops, with_dark_blob

from anomalygpt.memory import (
    MemoryConfig,
    PatchMemory,
    dihedral,
    nearest_distance,
    original_positions,
    quadrant_of,
    top_mean,
)


def test_dihedral_views_are_the_eight_distinct_symmetries():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    views = [dihedral(x, i) for i in range(8)]
    assert torch.equal(views[0], x)
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8


@pytest.mark.parametrize("view", range(8))
def test_original_positions_point_back_to_the_source_cell(view):
    x = torch.randn(5, 5)
    rows, cols = original_positions(5, view)
    assert torch.equal(dihedral(x, view), x[rows, cols])


def test_quadrants_split_the_grid_row_major():
    positions = original_positions(4, 0)
    assert quadrant_of(positions, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_nearest_distance_matches_brute_force_for_any_chunk():
    gen = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(37, 8, generator=gen), dim=1)
    bank = torch.nn.functional.normalize(torch.randn(53, 8, generator=gen), dim=1)
    expected = 1 - (queries @ bank.T).max(dim=1).values
    for chunk in (1, 53, 200, 1 << 20):
        assert torch.allclose(nearest_distance(queries, bank, chunk), expected, atol=1e-6)
    # A query that is in the bank is at distance 0.
    assert nearest_distance(bank[:3], bank, 64).abs().max() < 1e-6


def test_top_mean_averages_the_highest_fraction():
    values = np.arange(100, dtype=np.float32)  # top 5% = 95..99, mean 97
    assert top_mean(values, 0.05) == pytest.approx(97.0)
    assert top_mean(values, 0.001) == pytest.approx(99.0)  # at least one value


@pytest.fixture(scope="module")
def memory(small_backbone):
    return PatchMemory.build(small_backbone, texture_crops(3), MemoryConfig(max_patches=2000))


def test_memory_is_capped_and_tracks_each_patch_origin(memory):
    # 3 references x 8 views x 16 x 16 stride-8 cells = 6144 > cap; stride-16: 3 x 8 x 64 = 1536 kept.
    assert [bank.features.shape[0] for bank in memory.banks] == [2000, 1536]
    assert set(memory.banks[1].reference.tolist()) == {0, 1, 2}
    assert set(memory.banks[1].quadrant.tolist()) == {0, 1, 2, 3}
    assert memory.n_references == 3 and memory.image_size == (128, 128)


def test_a_reference_scores_near_zero_and_a_dark_blob_is_found_where_it_is(memory):
    good = texture_crops(3)[0]
    bad = with_dark_blob(texture_crops(1, seed=7)[0], center=(96, 32), radius=10)
    maps = memory.anomaly_maps([good, bad])
    assert maps.shape == (2, 128, 128)
    assert memory.image_score(maps[0]) < 0.5 * memory.image_score(maps[1])
    peak_y, peak_x = np.unravel_index(np.argmax(maps[1]), maps[1].shape)
    assert abs(peak_x - 96) <= 12 and abs(peak_y - 32) <= 12


def test_references_must_share_one_size(small_backbone):
    with pytest.raises(ValueError, match="references differ in size"):
        PatchMemory.build(
            small_backbone, [np.zeros((64, 64, 3), np.uint8), np.zeros((64, 80, 3), np.uint8)], MemoryConfig()
        )
    with pytest.raises(ValueError, match="at least one good reference"):
        PatchMemory.build(small_backbone, [], MemoryConfig())
