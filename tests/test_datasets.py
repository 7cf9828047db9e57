"""Loaders on generated trees that mimic each dataset's layout, and on the real ELPV package."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval.datasets import (
    DATASETS,
    CategorySplit,
    DatasetError,
    Sample,
    categories,
    draw_shots,
    load_mask,
    load_split,
)


def write_image(path: Path, value: int = 128, mode: str = "RGB") -> Path:
    """A tiny solid image at path (format from the suffix), parents created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (8, 6), value if mode != "RGB" else (value,) * 3).save(path)
    return path


def write_mask(path: Path, on_value: int) -> Path:
    """An 8x6 mask whose top-left 2x3 block holds on_value, the rest 0."""
    values = np.zeros((6, 8), dtype=np.uint8)
    values[:2, :3] = on_value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values).save(path)
    return path


def mvtec_tree(root: Path) -> Path:
    """MVTec AD layout: bottle (3 train, 1 test good, 2 broken_large with masks) and cable."""
    for name in ("000.png", "001.png", "002.png"):
        write_image(root / "bottle" / "train" / "good" / name)
    write_image(root / "bottle" / "test" / "good" / "000.png")
    for stem in ("000", "001"):
        write_image(root / "bottle" / "test" / "broken_large" / f"{stem}.png")
        write_mask(root / "bottle" / "ground_truth" / "broken_large" / f"{stem}_mask.png", 255)
    write_image(root / "cable" / "train" / "good" / "000.png")
    write_image(root / "cable" / "test" / "good" / "000.png")
    (root / "license.txt").write_text("not a category")
    (root / "docs").mkdir()
    return root


def visa_tree(root: Path) -> Path:
    """VisA layout: candle (2 train normal, 1 test normal, 2 test anomaly: 0/255 and 0/1 masks), pcb1."""
    rows = ["object,split,label,image,mask"]
    for name in ("0000.JPG", "0001.JPG", "0002.JPG"):
        write_image(root / "candle" / "Data" / "Images" / "Normal" / name)
    rows += [f"candle,train,normal,candle/Data/Images/Normal/{n}.JPG," for n in ("0000", "0001")]
    rows.append("candle,test,normal,candle/Data/Images/Normal/0002.JPG,")
    for stem, on_value in (("000", 255), ("001", 1)):
        write_image(root / "candle" / "Data" / "Images" / "Anomaly" / f"{stem}.JPG")
        write_mask(root / "candle" / "Data" / "Masks" / "Anomaly" / f"{stem}.png", on_value)
        rows.append(f"candle,test,anomaly,candle/Data/Images/Anomaly/{stem}.JPG,candle/Data/Masks/Anomaly/{stem}.png")
    write_image(root / "pcb1" / "Data" / "Images" / "Normal" / "0000.JPG")
    rows.append("pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root


def folder_tree(root: Path, with_masks: bool) -> Path:
    """Plain folder: good/ (4 images), scratch/ (2), dent/ (1), optional masks/ in both naming styles."""
    for name in ("a.png", "b.png", "c.jpg", "d.png"):
        write_image(root / "good" / name)
    for name in ("s1.png", "s2.png"):
        write_image(root / "scratch" / name)
    write_image(root / "dent" / "d1.png")
    if with_masks:
        write_mask(root / "masks" / "scratch" / "s1.png", 255)
        write_mask(root / "masks" / "scratch" / "s2_mask.png", 1)
        write_mask(root / "masks" / "dent" / "d1.png", 255)
    return root


def test_mvtec_categories_and_split(tmp_path: Path) -> None:
    root = mvtec_tree(tmp_path / "mvtec")
    assert categories("mvtec", root) == ["bottle", "cable"]
    split = load_split("mvtec", root, "bottle")
    bottle = root / "bottle"
    assert split.reference_pool == tuple(bottle / "train" / "good" / f"00{i}.png" for i in range(3))
    assert split.test == (
        Sample(
            bottle / "test" / "broken_large" / "000.png",
            1,
            "bottle",
            "broken_large",
            bottle / "ground_truth" / "broken_large" / "000_mask.png",
        ),
        Sample(
            bottle / "test" / "broken_large" / "001.png",
            1,
            "bottle",
            "broken_large",
            bottle / "ground_truth" / "broken_large" / "001_mask.png",
        ),
        Sample(bottle / "test" / "good" / "000.png", 0, "bottle", "good"),
    )
    assert not split.pool_is_test and split.held_out == ()


def test_mvtec_missing_mask_and_wrong_root(tmp_path: Path) -> None:
    root = mvtec_tree(tmp_path / "mvtec")
    missing = root / "bottle" / "ground_truth" / "broken_large" / "001_mask.png"
    missing.unlink()
    with pytest.raises(DatasetError, match=re.escape(str(missing))):
        load_split("mvtec", root, "bottle")
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "nowhere"))):
        categories("mvtec", tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=re.escape(str(root / "screw" / "train" / "good"))):
        load_split("mvtec", root, "screw")


def test_visa_split_from_the_official_csv(tmp_path: Path) -> None:
    root = visa_tree(tmp_path / "visa")
    assert categories("visa", root) == ["candle", "pcb1"]
    split = load_split("visa", root, "candle")
    images = root / "candle" / "Data" / "Images"
    assert split.reference_pool == (images / "Normal" / "0000.JPG", images / "Normal" / "0001.JPG")
    assert [(s.path, s.label, s.defect) for s in split.test] == [
        (images / "Normal" / "0002.JPG", 0, "good"),
        (images / "Anomaly" / "000.JPG", 1, "anomaly"),
        (images / "Anomaly" / "001.JPG", 1, "anomaly"),
    ]
    masks = [load_mask(s.mask) for s in split.test if s.mask is not None]
    expected = np.zeros((6, 8), dtype=bool)
    expected[:2, :3] = True
    assert len(masks) == 2
    for mask in masks:  # 0/255 and 0/1 masks read the same
        np.testing.assert_array_equal(mask, expected)


def test_visa_missing_csv_mask_and_category(tmp_path: Path) -> None:
    root = visa_tree(tmp_path / "visa")
    missing_mask = root / "candle" / "Data" / "Masks" / "Anomaly" / "001.png"
    missing_mask.unlink()
    with pytest.raises(DatasetError, match=re.escape(f"line 6 names {missing_mask}")):
        load_split("visa", root, "candle")
    with pytest.raises(DatasetError, match="known: candle, pcb1"):
        load_split("visa", root, "fryum")
    (root / "split_csv" / "1cls.csv").unlink()
    with pytest.raises(DatasetError, match=re.escape(f"official split file at {root / 'split_csv' / '1cls.csv'}")):
        categories("visa", root)


def test_load_mask_reads_palette_rgb_and_rejects_junk(tmp_path: Path) -> None:
    palette = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 0, 0, 0] + [0] * 762)  # index 1 drawn black: the index, not the colour, counts
    palette.save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "p.png"), [[False, True], [True, False]])
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 1, 2] = 255
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "rgb.png"), [[False, True], [False, False]])
    (tmp_path / "junk.png").write_text("not a png")
    with pytest.raises(DatasetError, match="junk.png"):
        load_mask(tmp_path / "junk.png")


def test_folder_split_with_and_without_masks(tmp_path: Path) -> None:
    root = folder_tree(tmp_path / "widget", with_masks=True)
    assert categories("folder", root) == ["widget"]
    split = load_split("folder", root, "widget")
    assert split.reference_pool == tuple(root / "good" / n for n in ("a.png", "b.png", "c.jpg", "d.png"))
    assert [(s.path.name, s.defect, s.mask) for s in split.test] == [
        ("d1.png", "dent", root / "masks" / "dent" / "d1.png"),
        ("s1.png", "scratch", root / "masks" / "scratch" / "s1.png"),
        ("s2.png", "scratch", root / "masks" / "scratch" / "s2_mask.png"),
    ]
    assert split.pool_is_test and all(s.label == 1 for s in split.test)
    bare = load_split("folder", folder_tree(tmp_path / "bare", with_masks=False), "bare")
    assert [s.mask for s in bare.test] == [None, None, None]


def test_folder_errors_name_the_expected_path(tmp_path: Path) -> None:
    root = folder_tree(tmp_path / "widget", with_masks=True)
    (root / "masks" / "dent" / "d1.png").unlink()
    with pytest.raises(DatasetError, match=re.escape(str(root / "masks" / "dent" / "d1.png"))):
        load_split("folder", root, "widget")
    with pytest.raises(DatasetError, match="folder name 'widget'"):
        load_split("folder", root, "gadget")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "empty" / "good"))):
        load_split("folder", tmp_path / "empty", "empty")


def pool_split(pool_size: int, pool_is_test: bool) -> CategorySplit:
    """A split with pool p00..p{n} (given unsorted) and one defective test image."""
    pool = tuple(Path(f"/data/p{i:02d}.png") for i in reversed(range(pool_size)))
    return CategorySplit("c", pool, (Sample(Path("/data/bad.png"), 1, "c", "crack"),), pool_is_test)


def test_draw_shots_is_deterministic_nested_and_disjoint() -> None:
    split = pool_split(10, pool_is_test=True)
    references, test = draw_shots(split, 3, seed=0)
    assert draw_shots(split, 3, seed=0) == (references, test)
    assert draw_shots(split, 3, seed=1)[0] != references
    assert draw_shots(split, 1, seed=0)[0] == references[:1]  # nested across k for one seed
    assert len(references) == len(set(references)) == 3
    test_paths = [s.path for s in test]
    assert not set(references) & set(test_paths)
    assert len(test) == 1 + 7 and set(test_paths[1:]) | set(references) == set(split.reference_pool)
    assert all(s.label == 0 and s.defect == "good" for s in test[1:])
    reordered = CategorySplit("c", tuple(reversed(split.reference_pool)), split.test, pool_is_test=True)
    assert draw_shots(reordered, 3, seed=0) == (references, test)  # listing order does not matter


def test_draw_shots_zero_and_out_of_range() -> None:
    split = pool_split(4, pool_is_test=False)
    assert draw_shots(split, 0, seed=5) == ([], list(split.test))
    assert len(draw_shots(pool_split(4, pool_is_test=True), 0, seed=5)[1]) == 5
    with pytest.raises(ValueError, match=r"k=5 must be in \[0, 4\]"):
        draw_shots(split, 5, seed=0)
    with pytest.raises(ValueError, match="k=-1"):
        draw_shots(split, -1, seed=0)


def test_split_refuses_a_reference_that_is_also_tested() -> None:
    shared = Path("/data/x.png")
    with pytest.raises(DatasetError, match="also test images"):
        CategorySplit("c", (shared,), (Sample(shared, 0, "c", "good"),), pool_is_test=False)


def test_unknown_dataset_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="known: mvtec, visa, elpv, folder"):
        categories("mvtec-3d", None)
    assert DATASETS == ("mvtec", "visa", "elpv", "folder")


@pytest.mark.slow
def test_elpv_counts_from_the_real_package() -> None:
    assert categories("elpv", None) == ["mono", "poly"]
    for cell_type, good, defective, uncertain in (("mono", 588, 369, 117), ("poly", 920, 452, 178)):
        split = load_split("elpv", None, cell_type)
        assert (len(split.reference_pool), len(split.test), len(split.held_out)) == (
            good,
            defective,
            uncertain,
        )
        assert split.pool_is_test and all(s.mask is None for s in split.test)
        assert {s.defect for s in split.test} == {"p=2/3", "p=1"}
        assert {(s.label, s.defect) for s in split.held_out} == {(1, "p=1/3")}
        assert split.reference_pool[0].is_file() and split.test[0].path.is_file()


def test_elpv_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetError, match="pip install elpv-dataset"):
        load_split("elpv", None, "mono")
