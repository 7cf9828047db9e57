"""Benchmark datasets as k-shot splits: MVTec AD, VisA, ELPV (via its package) and plain folders.

Every loader returns a `CategorySplit`: a pool of good images that references are drawn from and
a test set that never overlaps it (checked on construction), so no reference is ever scored.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from anomalygpt.io import package_dir

DATASETS = ("mvtec", "visa", "elpv", "folder")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
VISA_SPLIT_FILE = Path("split_csv") / "1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
ELPV_TYPES = ("mono", "poly")


class DatasetError(ValueError):
    """A dataset on disk does not have the expected layout; the message names the path."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 good, 1 defective
    category: str
    defect: str  # "good" or the defect type (folder name; "anomaly" for VisA, "p=1", "p=2/3" for ELPV)
    mask: Path | None = None  # None for good images and for datasets without masks


@dataclass(frozen=True)
class CategorySplit:
    category: str
    reference_pool: tuple[Path, ...]  # good images references are drawn from
    test: tuple[Sample, ...]
    pool_is_test: bool  # True where unused pool images are good test samples (ELPV, plain folders)
    held_out: tuple[Sample, ...] = ()  # samples reported apart (ELPV's uncertain 1/3 labels)

    def __post_init__(self) -> None:
        scored = {sample.path for sample in self.test + self.held_out}
        shared = sorted(scored.intersection(self.reference_pool))
        if shared:
            raise DatasetError(
                f"{self.category}: {len(shared)} reference-pool images are also test images, e.g. {shared[0]}"
            )


def draw_shots(split: CategorySplit, k: int, seed: int) -> tuple[list[Path], list[Sample]]:
    """k references drawn without replacement from the sorted pool, and the test samples.

    Draws for one seed are nested across k (the k=1 reference is among the k=2 ones), so k-shot
    curves differ only by the added shots. Unused pool images join the test set as good samples
    when `split.pool_is_test`.
    """
    pool = sorted(split.reference_pool)
    if not 0 <= k <= len(pool):
        raise ValueError(f"draw_shots: k={k} must be in [0, {len(pool)}] (reference pool of {split.category})")
    order = np.random.default_rng(seed).permutation(len(pool))
    references = [pool[i] for i in order[:k]]
    test = list(split.test)
    if split.pool_is_test:
        test += [Sample(pool[i], 0, split.category, "good") for i in sorted(order[k:])]
    return references, test


def full_shot_split(split: CategorySplit, seed: int, test_fraction: float) -> tuple[list[Path], list[Sample]]:
    """(training normals, test samples) for detectors trained on every good image not held out for testing.

    Where the pool doubles as test data (ELPV, plain folders) a seeded `test_fraction` of the good images is held
    out as good test samples and the rest is training data; elsewhere the pool (train/good) is the training data.
    """
    pool = sorted(split.reference_pool)
    if not split.pool_is_test:
        return pool, list(split.test)
    order = np.random.default_rng(seed).permutation(len(pool))
    n_test = int(round(len(pool) * test_fraction))
    good = [Sample(pool[i], 0, split.category, "good") for i in sorted(order[:n_test])]
    return [pool[i] for i in sorted(order[n_test:])], list(split.test) + good


def load_mask(path: Path) -> np.ndarray:
    """Ground-truth mask as (H, W) bool, defect where any channel > 0 (masks hold 0/255 or 0/1)."""
    try:
        with Image.open(path) as image:
            values = np.asarray(image)  # palette images keep their indices, which is what 0/1 masks use
    except OSError as error:
        raise DatasetError(f"cannot read mask {path}: {error}") from error
    if values.ndim == 3:
        values = values[..., :3].max(axis=2)  # alpha is not a defect
    return values > 0


def _image_files(folder: Path) -> list[Path]:
    """Sorted image files directly inside folder."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _subfolders(folder: Path) -> list[Path]:
    """Sorted sub-folders of folder, ignoring hidden ones."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _existing_root(root: Path | None, dataset: str) -> Path:
    """The dataset root as a Path, or DatasetError when it is missing."""
    if root is None:
        raise DatasetError(f"{dataset}: a dataset root folder is required")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{dataset}: root folder {root} does not exist")
    return root


def _mvtec_categories(root: Path | None) -> list[str]:
    """Folders of root that have train/good."""
    root = _existing_root(root, "mvtec")
    found = [p.name for p in _subfolders(root) if (p / "train" / "good").is_dir()]
    if not found:
        raise DatasetError(f"mvtec: no <category>/train/good folder under {root}")
    return found


def _mvtec_sample(image: Path, category_dir: Path, defect: str) -> Sample:
    """One MVTec test sample; defective images must have ground_truth/<defect>/<stem>_mask.png."""
    if defect == "good":
        return Sample(image, 0, category_dir.name, "good")
    mask = category_dir / "ground_truth" / defect / f"{image.stem}_mask.png"
    if not mask.is_file():
        raise DatasetError(f"mvtec: mask for {image} expected at {mask}")
    return Sample(image, 1, category_dir.name, defect, mask)


def _mvtec_split(root: Path | None, category: str) -> CategorySplit:
    """MVTec AD: pool = train/good, test = test/<defect>/* including test/good."""
    category_dir = _existing_root(root, "mvtec") / category
    train_good, test_dir = category_dir / "train" / "good", category_dir / "test"
    for folder in (train_good, test_dir):
        if not folder.is_dir():
            raise DatasetError(f"mvtec: expected folder {folder}")
    test = [
        _mvtec_sample(image, category_dir, defect_dir.name)
        for defect_dir in _subfolders(test_dir)
        for image in _image_files(defect_dir)
    ]
    return CategorySplit(category, tuple(_image_files(train_good)), tuple(test), pool_is_test=False)


def _visa_rows(root: Path | None) -> list[dict[str, str]]:
    """Rows of the official VisA split file <root>/split_csv/1cls.csv."""
    split_file = _existing_root(root, "visa") / VISA_SPLIT_FILE
    if not split_file.is_file():
        raise DatasetError(f"visa: expected the official split file at {split_file} (split_csv/1cls.csv)")
    with split_file.open(newline="", encoding="utf-8-sig") as handle:  # tolerate a BOM
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != VISA_COLUMNS:
            raise DatasetError(f"visa: {split_file} header must be {','.join(VISA_COLUMNS)}, got {reader.fieldnames}")
        return list(reader)


def _visa_categories(root: Path | None) -> list[str]:
    """Distinct objects named in the VisA split file."""
    return sorted({row["object"] for row in _visa_rows(root)})


def _visa_existing(root: Path, relative: str, line: int) -> Path:
    """root / relative, or DatasetError naming the csv line when the file is missing."""
    path = root / relative
    if not relative or not path.is_file():
        raise DatasetError(f"visa: {VISA_SPLIT_FILE} line {line} names {path}, which does not exist")
    return path


def _visa_split(root: Path | None, category: str) -> CategorySplit:
    """VisA: pool = train/normal rows, test = test rows (anomaly rows need a mask)."""
    rows = _visa_rows(root)
    known = sorted({row["object"] for row in rows})
    if category not in known:
        raise DatasetError(f"visa: category {category!r} not in {VISA_SPLIT_FILE}; known: {', '.join(known)}")
    base = _existing_root(root, "visa")
    pool, test = [], []
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        if row["object"] != category:
            continue
        if row["label"] not in ("normal", "anomaly"):
            raise DatasetError(f"visa: {VISA_SPLIT_FILE} line {line}: label {row['label']!r} is not normal/anomaly")
        image = _visa_existing(base, row["image"], line)
        if row["split"] == "train" and row["label"] == "normal":
            pool.append(image)
        elif row["split"] == "test" and row["label"] == "normal":
            test.append(Sample(image, 0, category, "good"))
        elif row["split"] == "test":
            test.append(Sample(image, 1, category, "anomaly", _visa_existing(base, row["mask"], line)))
    return CategorySplit(category, tuple(pool), tuple(test), pool_is_test=False)


def _elpv_labels_file() -> Path:
    """labels.csv of the installed elpv-dataset package."""
    folder = package_dir("elpv_dataset")
    if folder is None:
        raise DatasetError("elpv: package elpv-dataset is not installed (pip install elpv-dataset)")
    labels = folder / "data" / "labels.csv"
    if not labels.is_file():
        raise DatasetError(f"elpv: expected {labels} inside the elpv-dataset package")
    return labels


def _elpv_sample(fields: list[str], folder: Path, where: str) -> Sample:
    """One ELPV cell from 'path probability type': p=0 is good; 1/3, 2/3 and 1 are defective."""
    thirds = float(fields[1]) * 3
    if abs(thirds - round(thirds)) > 1e-6 or round(thirds) not in range(4):
        raise DatasetError(f"elpv: {where}: probability {fields[1]} is not 0, 1/3, 2/3 or 1")
    if round(thirds) == 0:
        return Sample(folder / fields[0], 0, fields[2], "good")
    return Sample(folder / fields[0], 1, fields[2], ("p=1/3", "p=2/3", "p=1")[round(thirds) - 1])


def _elpv_split(root: Path | None, category: str) -> CategorySplit:
    """ELPV cells of one type: pool = good cells, test = p >= 2/3, held out = p = 1/3; root ignored."""
    if category not in ELPV_TYPES:
        raise DatasetError(f"elpv: category {category!r} unknown; known: {', '.join(ELPV_TYPES)}")
    labels = _elpv_labels_file()
    samples = []
    for line, text in enumerate(labels.read_text().splitlines(), start=1):
        fields = text.split()
        if len(fields) != 3:
            raise DatasetError(f"elpv: {labels} line {line} should be 'path probability type', got {text!r}")
        if fields[2] == category:
            samples.append(_elpv_sample(fields, labels.parent, f"{labels} line {line}"))
    pool = tuple(s.path for s in samples if s.label == 0)
    test = tuple(s for s in samples if s.defect in ("p=2/3", "p=1"))
    held_out = tuple(s for s in samples if s.defect == "p=1/3")
    return CategorySplit(category, pool, test, pool_is_test=True, held_out=held_out)


ELPV_HALVES = ("all", "dev", "test")  # dev: odd-numbered cells (every choice is made there); test: even-numbered


def elpv_cell_number(path: Path) -> int:
    """1 for images/cell0001.png."""
    digits = path.stem.removeprefix("cell")
    if not digits.isdigit():
        raise DatasetError(f"elpv: {path} is not named cellNNNN")
    return int(digits)


def elpv_half(split: CategorySplit, half: str) -> CategorySplit:
    """The split restricted to ELPV's development half (odd cell numbers), its test half (even) or all of it."""
    if half not in ELPV_HALVES:
        raise DatasetError(f"elpv: unknown half {half!r}; known: {', '.join(ELPV_HALVES)}")
    if half == "all":
        return split
    parity = 1 if half == "dev" else 0

    def keep(path: Path) -> bool:
        return elpv_cell_number(path) % 2 == parity

    return CategorySplit(
        split.category,
        tuple(p for p in split.reference_pool if keep(p)),
        tuple(s for s in split.test if keep(s.path)),
        split.pool_is_test,
        tuple(s for s in split.held_out if keep(s.path)),
    )


def _folder_categories(root: Path | None) -> list[str]:
    """The one category of a plain folder: its name."""
    return [_existing_root(root, "folder").resolve().name]


def _folder_mask(root: Path, image: Path, defect: str) -> Path:
    """masks/<defect>/<stem>.png or <stem>_mask.png, or DatasetError naming both."""
    candidates = [root / "masks" / defect / f"{image.stem}{tail}.png" for tail in ("", "_mask")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DatasetError(f"folder: {root / 'masks'} exists but has no mask for {image}; expected {candidates[0]}")


def _folder_split(root: Path | None, category: str) -> CategorySplit:
    """Plain folder: pool = good/*, test = other sub-folders; masks/ optional but then complete."""
    base = _existing_root(root, "folder")
    if category != base.resolve().name:
        raise DatasetError(f"folder: category must be the folder name {base.resolve().name!r}, got {category!r}")
    if not (base / "good").is_dir():
        raise DatasetError(f"folder: expected good images in {base / 'good'}")
    has_masks = (base / "masks").is_dir()
    test = [
        Sample(image, 1, category, defect.name, _folder_mask(base, image, defect.name) if has_masks else None)
        for defect in _subfolders(base)
        if defect.name not in ("good", "masks")
        for image in _image_files(defect)
    ]
    return CategorySplit(category, tuple(_image_files(base / "good")), tuple(test), pool_is_test=True)


_CATEGORIES: dict[str, Callable[[Path | None], list[str]]] = {
    "mvtec": _mvtec_categories,
    "visa": _visa_categories,
    "elpv": lambda root: list(ELPV_TYPES),
    "folder": _folder_categories,
}
_SPLITS: dict[str, Callable[[Path | None, str], CategorySplit]] = {
    "mvtec": _mvtec_split,
    "visa": _visa_split,
    "elpv": _elpv_split,
    "folder": _folder_split,
}


def _known(dataset: str) -> str:
    """dataset, or ValueError listing the known names."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    return dataset


def categories(dataset: str, root: Path | None) -> list[str]:
    """Category names of a dataset found under root (root is ignored for ELPV)."""
    return _CATEGORIES[_known(dataset)](root)


def load_split(dataset: str, root: Path | None, category: str) -> CategorySplit:
    """Reference pool and test samples of one category."""
    return _SPLITS[_known(dataset)](root, category)
