"""Zero-shot from a batch (anomalygpt.mutual): patches scored against the other images, the batch's threshold."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import texture_crops, with_dark_blob
from PIL import Image

from anomalygpt.config import load_preset
from anomalygpt.inspection import InspectionError, Inspector
from anomalygpt.mutual import MIN_BATCH, batch_calibration, mutual_maps, others_of


def test_a_patch_unlike_every_other_image_scores_highest() -> None:
    generator = torch.Generator().manual_seed(0)
    base = F.normalize(torch.randn(8, 6, generator=generator), dim=0)  # 6 "good" patch kinds
    feats = base[:, None, :].expand(8, 20, 6).clone()  # 20 images, each showing the 6 kinds (C=8, h=1, w=6)
    feats = feats + 0.01 * torch.randn(feats.shape, generator=generator)
    feats[:, 3, 2] = F.normalize(torch.randn(8, generator=generator), dim=0)  # image 3, patch 2: a defect
    feats = F.normalize(feats.permute(1, 0, 2)[:, :, None, :], dim=1)  # (20, 8, 1, 6)
    scores = mutual_maps(feats)
    assert scores.shape == (20, 1, 6)
    assert int(scores.flatten().argmax()) == 3 * 6 + 2
    assert float(scores[3, 0, 2]) > 10 * float(scores[[i for i in range(20) if i != 3]].max())


def test_a_defect_shared_by_a_few_images_still_scores_high() -> None:
    generator = torch.Generator().manual_seed(1)
    feats = F.normalize(torch.randn(1, 16, 4, 4, generator=generator).expand(30, -1, -1, -1).clone(), dim=1)
    defect = F.normalize(torch.randn(16, generator=generator), dim=0)
    for index in (0, 1, 2):  # three images carry the same defect: each finds it in the other two only
        feats[index, :, 1, 1] = defect
    scores = mutual_maps(feats, fraction=0.3)  # 8 of 29 others averaged: 2 matches cannot hide it
    assert all(float(scores[i, 1, 1]) > 0.5 for i in (0, 1, 2))
    assert float(scores[3:].max()) < 1e-3


def test_each_image_meets_at_most_max_others() -> None:
    generator = torch.Generator().manual_seed(0)
    others = others_of(5, 50, 10, generator)
    assert len(others) == 10 and 5 not in others.tolist() and len(set(others.tolist())) == 10
    assert others_of(5, 8, 10, generator).tolist() == [0, 1, 2, 3, 4, 6, 7]
    with pytest.raises(ValueError, match="at least 2 images"):
        mutual_maps(torch.ones(1, 4, 2, 2))


def test_chosen_rows_are_the_whole_batchs_maps_of_those_images() -> None:
    feats = F.normalize(torch.randn(12, 8, 3, 3, generator=torch.Generator().manual_seed(2)), dim=1)
    whole = mutual_maps(feats, max_others=5, seed=4)  # each image meets a seeded sample of 5 of the 11 others
    assert torch.equal(mutual_maps(feats, max_others=5, seed=4, rows=[7, 2]), whole[[7, 2]])


def test_the_batch_threshold_ignores_an_anomalous_minority() -> None:
    rng = np.random.default_rng(0)
    good = rng.normal(1.0, 0.1, 60)
    scores = np.r_[good, [3.0, 4.0, 5.0, 9.0, 9.0]]
    calibration = batch_calibration(scores)
    assert calibration.normal_spread == pytest.approx(0.1, rel=0.3)
    assert 1.1 < calibration.image_threshold < 1.4  # the outliers did not pull it up
    assert (scores > calibration.image_threshold).sum() == 5 + (good > calibration.image_threshold).sum()
    assert "fewer than 50%" in calibration.method


@pytest.fixture(scope="module")
def inspector(small_backbone) -> Inspector:
    return Inspector(small_backbone, load_preset("default"))


def test_a_batch_without_references_finds_its_defective_images(inspector: Inspector) -> None:
    crops = texture_crops(MIN_BATCH + 2, seed=5)  # brick crops at random offsets: they vary a lot
    defective = {3, 11}
    batch = [with_dark_blob(crop, (64, 64), 24) if i in defective else crop for i, crop in enumerate(crops)]
    names = [f"part{i}.png" for i in range(len(batch))]
    results = list(inspector.inspect_batch(batch, sources=names))
    assert [r.source for r in results] == names and {r.mode for r in results} == {"zero-shot-batch"}
    scores = np.array([r.score for r in results])
    assert set(np.argsort(scores)[-2:].tolist()) == defective
    assert all(results[i].is_anomalous and results[i].regions for i in defective)
    assert sum(r.is_anomalous for r in results) <= len(defective) + 1
    assert len({r.threshold for r in results}) == 1 and "batch" in results[0].calibration["method"]


def test_a_batch_too_small_or_of_mixed_sizes_is_refused_before_any_result(inspector: Inspector) -> None:
    with pytest.raises(InspectionError, match=f"at least {MIN_BATCH} images"):
        inspector.inspect_batch(texture_crops(MIN_BATCH - 1))
    mixed = texture_crops(MIN_BATCH) + texture_crops(1, size=96)
    with pytest.raises(InspectionError, match="must be of one size"):
        inspector.inspect_batch(mixed)


def test_batch_files_name_their_bytes_and_one_replaced_between_passes_is_refused(
    inspector: Inspector, tmp_path: Path
) -> None:
    """A batch of files: each inspection's source_sha256 is its file's; the batch is scored on a first decode and
    each image decoded again as its result is made, so a file replaced in between is an InspectionError naming
    it, not a verdict on bytes that were not scored."""
    paths = []
    for index, crop in enumerate(texture_crops(MIN_BATCH, seed=5)):
        paths.append(tmp_path / f"part{index:02d}.png")
        Image.fromarray(crop).save(paths[-1])
    results = inspector.inspect_batch(paths, sources=[str(p) for p in paths])  # scored now
    first = next(results)
    assert first.source_sha256 == hashlib.sha256(paths[0].read_bytes()).hexdigest()
    Image.fromarray(with_dark_blob(texture_crops(1, seed=9)[0], (64, 64), 24)).save(tmp_path / "new.png")
    (tmp_path / "new.png").replace(paths[1])
    with pytest.raises(InspectionError, match=r"part01\.png: changed while the batch was inspected"):
        next(results)
