"""Evidence against the good references, on the real 64 px backbone: the matched reference and place, the shade."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import texture_crops, with_dark_blob

from anomalygpt.backbones import BackboneConfig
from anomalygpt.config import Preset
from anomalygpt.evidence import (
    EvidenceIndex,
    EvidenceSource,
    crop,
    luma,
    profile_evidence,
    region_evidence,
    region_masks,
    searched,
)
from anomalygpt.inspection import build_inspector
from anomalygpt.io import write_png_atomic
from anomalygpt.memory import MemoryConfig


@pytest.fixture(scope="module")
def case() -> dict[str, object]:
    inspector = build_inspector(
        Preset(name="t", backbone=BackboneConfig(image_size=64), memory=MemoryConfig(augment=False))
    )
    references = texture_crops(3, size=64, seed=11)
    query = with_dark_blob(references[1], center=(44, 20), radius=9)  # reference 2 with a dark spot, top right
    fitted = inspector.fit(references)
    inspection = inspector.inspect(query, fitted)
    index = EvidenceIndex.build(fitted, references)
    patches = list(inspector.backbone.encode([query]).patches)
    evidence = region_evidence(query, inspection, index, patches)
    return {"inspection": inspection, "evidence": evidence, "query": query, "references": references}


def test_the_region_matches_the_reference_it_was_cut_from_at_its_own_place(case: dict[str, object]) -> None:
    inspection, evidence = case["inspection"], case["evidence"]
    assert inspection.is_anomalous and inspection.regions  # type: ignore[attr-defined]
    region = inspection.regions[0]  # type: ignore[attr-defined]
    found = evidence[0]  # type: ignore[index]
    assert found.region == region.index == 1 and found.reference == 1 and found.reference_name == "reference 2"
    assert found.box == region.box and found.location == region.location and found.similarity > 0.5
    # the matched place is the spot's own place in reference 2: the difference is the spot's, pixel for pixel
    x0, y0, x1, y1 = region.box
    mask = region_masks(inspection)[1]  # type: ignore[arg-type]
    assert int(mask.sum()) == region.area_px
    query, good = luma(case["query"])[y0:y1, x0:x1], luma(case["references"][1])[y0:y1, x0:x1]  # type: ignore[index]
    assert found.difference == pytest.approx(float((query - good)[mask].mean()))
    assert found.difference < -10 and found.query_mean < found.reference_mean  # the spot is darker than the brick
    assert json.loads(json.dumps(found.to_dict()))["box"] == list(found.box)


def test_crops_and_the_searched_references() -> None:
    image = np.arange(100, dtype=np.uint8).reshape(10, 10)
    assert crop(image, (2, 3, 5, 6)).shape == (3, 3) and crop(image, (0, 0, 2, 2), pad=3).shape == (5, 5)
    assert searched(4) == [0, 1, 2, 3]
    many = searched(1000)
    assert len(many) == 16 and many[0] == 0 and many[-1] == 999


def test_a_large_pool_s_evidence_reads_only_the_searched_references() -> None:
    inspector = build_inspector(
        Preset(name="t", backbone=BackboneConfig(image_size=64), memory=MemoryConfig(augment=False))
    )
    references = texture_crops(20, size=64, seed=11)
    fitted = inspector.fit(references)
    query = with_dark_blob(references[5], center=(44, 20), radius=9)
    read: list[str] = []

    class Counted(dict[str, np.ndarray]):
        def __getitem__(self, name: str) -> np.ndarray:
            read.append(name)
            return super().__getitem__(name)

    source = EvidenceSource(fitted, Counted(zip(fitted.names, references, strict=True)))
    (found,) = source.evidence(query, inspector.inspect(query, fitted))
    assert sorted(read) == sorted(fitted.names[i] for i in searched(20)) and len(read) == 16  # 4 stay unread
    assert found.reference in searched(20)


def test_the_images_must_match_the_references(case: dict[str, object]) -> None:
    inspector = build_inspector(
        Preset(name="t", backbone=BackboneConfig(image_size=64), memory=MemoryConfig(augment=False))
    )
    references = texture_crops(2, size=64, seed=11)
    fitted = inspector.fit(references)
    with pytest.raises(ValueError, match="1 images for 2 references"):
        EvidenceIndex.build(fitted, references[:1])


def test_a_profile_s_evidence_reads_its_own_unchanged_files_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inspector = build_inspector(
        Preset(name="t", backbone=BackboneConfig(image_size=64), memory=MemoryConfig(augment=False))
    )
    product, elsewhere = tmp_path / "product", tmp_path / "elsewhere"
    (product / "good").mkdir(parents=True)
    (elsewhere / "good").mkdir(parents=True)
    images = texture_crops(3, size=64, seed=11)
    names = [f"good/ref{i}.png" for i in range(3)]
    for name, image in zip(names, images, strict=True):
        write_png_atomic(product / name, image)
    monkeypatch.chdir(product)  # fitted as `anomalygpt fit good/ --out solar.profile` from the product's folder
    profile = inspector.save_profile(inspector.fit(names), "solar.profile", names)
    query = with_dark_blob(images[1], center=(44, 20), radius=9)
    monkeypatch.chdir(elsewhere)  # `chat`/`ui --profile ../product/solar.profile` from another folder
    found = profile_evidence(inspector.load_profile(product / profile), product / profile)
    assert found is not None
    inspection = inspector.inspect(query, found.references)
    assert found.evidence(query, inspection)[0].reference_name == "ref1.png"
    # another folder's file of the same name is not the good reference the profile was fitted from
    write_png_atomic(elsewhere / names[1], images[0])
    assert profile_evidence(inspector.load_profile(product / profile), product / profile) is None
