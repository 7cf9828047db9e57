import numpy as np
import pytest
import torch
from conftest import texture_crops, with_dark_blob
from skimage import data

from anomalygpt.memory import (
    MemoryConfig,
    PatchMemory,
    dihedral,
    embed_patches,
    global_descriptor,
    memory_inputs,
    nearest_distance,
    original_positions,
    quadrant_of,
    standardized,
    thin,
    top_mean,
)
from anomalygpt.verdict import STANDARD_GREY


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


def grass_crops(n: int, size: int = 128, seed: int = 0) -> list[np.ndarray]:
    """Good images of a second 'product': crops of skimage's grass texture."""
    field = data.grass()
    rng = np.random.default_rng(seed)
    corners = rng.integers(0, field.shape[0] - size, size=(n, 2))
    return [np.repeat(field[y : y + size, x : x + size, None], 3, axis=2) for y, x in corners]


@pytest.fixture(scope="module")
def memory(small_backbone):
    cfg = MemoryConfig(max_patches=2000, thinning="random")
    return PatchMemory.build(small_backbone, texture_crops(3), cfg, augment=True)


def test_each_reference_keeps_its_share_and_every_patch_knows_its_origin(memory):
    # 3 references x 8 views x 16 x 16 stride-8 cells = 2048 per reference > 2000 // 3 = 666 kept each;
    # stride-16: 8 x 64 = 512 per reference, all kept.
    assert [bank.features.shape[0] for bank in memory.banks] == [3 * 666, 3 * 512]
    assert memory.banks[1].reference.tolist() == sorted(memory.banks[1].reference.tolist())
    assert memory.banks[1].reference.bincount().tolist() == [512, 512, 512]
    # Every view of every cell of an 8 x 8 grid: each original position 8 times per reference.
    assert memory.banks[1].position.bincount(minlength=64).tolist() == [3 * 8] * 64
    assert set(memory.banks[1].quadrant(8).tolist()) == {0, 1, 2, 3}
    assert memory.n_references == 3 and memory.image_size == (128, 128) and not memory.retrieval
    assert memory.descriptors.shape == (3, 112 * 4 * 4) and memory.appearances.shape == (3, 112)
    assert torch.allclose(memory.descriptors.norm(dim=1), torch.ones(3))
    assert torch.allclose(memory.appearances.norm(dim=1), torch.ones(3))


def test_bank_features_are_float16(memory):
    # Half the memory; a profile stores exactly what the fitted memory holds.
    for bank in memory.banks:
        assert bank.features.dtype == torch.float16


def test_standardised_images_keep_their_pattern_and_lose_brightness_and_contrast():
    image = texture_crops(1)[0]
    dimmer = (image.astype(np.float32) * 0.7 + 30).round().astype(np.uint8)  # another exposure of the same part
    a, b = standardized(image), standardized(dimmer)
    assert abs(a.mean() - 128) < 2 and abs(a.std() - 50) < 3  # up to the clipping of the brightest mortar
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 1.0 < np.abs(image.astype(int) - dimmer.astype(int)).mean()
    assert memory_inputs([image], MemoryConfig(standardize=False))[0] is image


def test_standardised_by_lookup_is_every_pixel_mapped_in_float32():
    """standardized looks the 256 levels up: byte for byte what mapping each pixel in float32 gives, on noise,
    flat, nearly flat and grey images of odd sizes."""
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (37, 301, 3), dtype=np.uint8),
        np.full((5, 9, 3), 200, np.uint8),
        np.clip(rng.normal(120, 2, (64, 48, 3)), 0, 255).astype(np.uint8),
        np.repeat(rng.integers(0, 256, (300, 300, 1), dtype=np.uint8), 3, axis=2),
        texture_crops(1)[0],
    ]
    for image in images:
        pixels = image.astype(np.float32)
        scaled = (pixels - pixels.mean()) * (STANDARD_GREY[1] / max(float(pixels.std()), 1e-3)) + STANDARD_GREY[0]
        expected = np.rint(scaled).clip(0, 255).astype(np.uint8)
        found = standardized(image)
        assert found.dtype == np.uint8 and np.array_equal(found, expected)


def test_coreset_thinning_covers_the_patches_better_than_a_random_subset():
    gen = torch.Generator().manual_seed(0)
    # Clustered points: a random subset misses the small clusters, the k-center coreset never does.
    centres = torch.randn(20, 16, generator=gen) * 5
    sizes = [500] + [10] * 19
    points = torch.cat([c + 0.1 * torch.randn(n, 16, generator=gen) for c, n in zip(centres, sizes, strict=True)])
    for method in ("coreset", "random"):
        chosen = thin(points, 40, method, torch.Generator().manual_seed(1))
        assert len(chosen) == 40 and chosen.tolist() == sorted(set(chosen.tolist()))
    covering = {
        method: torch.cdist(points, points[thin(points, 40, method, torch.Generator().manual_seed(1))]).amin(1).max()
        for method in ("coreset", "random")
    }
    assert covering["coreset"] < 1.0 < covering["random"]
    assert thin(points, 10_000, "coreset", gen).tolist() == list(range(len(points)))  # fewer rows than asked: all


def test_a_reference_scores_near_zero_and_a_dark_blob_is_found_where_it_is(memory):
    good = texture_crops(3)[0]
    bad = with_dark_blob(texture_crops(1, seed=7)[0], center=(96, 32), radius=10)
    maps = memory.anomaly_maps([good, bad])
    assert maps.shape == (2, 128, 128)
    assert memory.image_score(maps[0]) < 0.5 * memory.image_score(maps[1])
    peak_y, peak_x = np.unravel_index(np.argmax(maps[1]), maps[1].shape)
    assert abs(peak_x - 96) <= 12 and abs(peak_y - 32) <= 12


def test_nearest_rows_name_the_reference_and_place_a_patch_came_from(memory, small_backbone):
    image = texture_crops(3)[2]
    feats = embed_patches(small_backbone.encode([image]).patches, memory.cfg.neighbourhood)
    queries = feats[1][0].permute(1, 2, 0).reshape(-1, feats[1].shape[1])  # (64, C) stride-16 cells, row-major
    distance, reference, position = memory.nearest_rows(queries, stage=1)
    assert distance.max() < 1e-3  # reference 2 is in the memory: every patch matches itself
    assert set(reference.tolist()) == {2} and position.tolist() == list(range(64))
    _, reference, _ = memory.nearest_rows(queries, stage=1, references=[0, 1])
    assert set(reference.tolist()) <= {0, 1}


@pytest.fixture(scope="module")
def pool(small_backbone):
    """Two products in one pool: 4 brick crops then 4 grass crops, retrieving the 2 nearest per query."""
    cfg = MemoryConfig(max_patches=4000, retrieve=2, thinning="random")
    return PatchMemory.build(small_backbone, texture_crops(4, seed=4) + grass_crops(4, seed=4), cfg, augment=False)


def test_a_pool_matches_each_query_against_its_nearest_references_of_its_own_product(pool, small_backbone):
    assert pool.retrieval and [bank.features.shape[0] for bank in pool.banks] == [8 * 256, 8 * 64]
    brick, grass = texture_crops(1, seed=40)[0], grass_crops(1, seed=40)[0]
    feats = embed_patches(small_backbone.encode([brick, grass]).patches, pool.cfg.neighbourhood)
    nearest = pool.nearest_references(global_descriptor(feats[-1], pool.cfg.descriptor_grid))
    assert set(nearest[0].tolist()) <= {0, 1, 2, 3} and set(nearest[1].tolist()) <= {4, 5, 6, 7}
    # Retrieval scores each query exactly as a memory of its two retrieved references alone would.
    maps = pool.stage_maps(feats)
    alone = pool.stage_distances([f[1:] for f in feats], pool.bank_of(nearest[1]))
    assert all(torch.equal(m[1:], a) for m, a in zip(maps, alone, strict=True))
    assert pool.nearest_references(pool.descriptors[:1], exclude=0)[0].tolist() != [0, 0]
    assert 0 not in pool.nearest_references(pool.descriptors[:1], exclude=0)[0].tolist()


def test_references_must_share_one_size(small_backbone):
    with pytest.raises(ValueError, match="references differ in size"):
        PatchMemory.build(
            small_backbone,
            [np.zeros((64, 64, 3), np.uint8), np.zeros((64, 80, 3), np.uint8)],
            MemoryConfig(),
            augment=False,
        )
    with pytest.raises(ValueError, match="at least one good reference"):
        PatchMemory.build(small_backbone, [], MemoryConfig(), augment=False)
