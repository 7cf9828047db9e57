"""Normal images available offline, split into training, validation and test pictures.

Pictures are scikit-image's bundled ones (BSD), the stereo motorcycle's left view among them.
Some scikit-image names are aliases (`cat` is `chelsea`): every split holds distinct images, which a test checks.
The shipped decoder and assistant are trained on crops of the training pictures only; their validation figures
come from crops of pictures training never saw, and the decoder's test figure from the test pictures, which
took part in no choice. ELPV is never used here. As a command, it writes a folder of
such crops for `anomalygpt simulate --normals`:

    python -m simulation.normals --pictures train --n 160 --size 256 --seed 0 --out runs/assistant_cpu/normals
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import skimage.data
from PIL import Image

TRAIN_PICTURES = (
    "brick",
    "grass",
    "camera",
    "coins",
    "moon",
    "cell",
    "horse",
    "page",
    "text",
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "retina",
    "colorwheel",
)
VALIDATION_PICTURES = ("gravel", "clock", "immunohistochemistry")
TEST_PICTURES = (*VALIDATION_PICTURES, "motorcycle")  # the validation pictures with new crops, plus an unseen one
PICTURE_SETS = {"train": TRAIN_PICTURES, "validation": VALIDATION_PICTURES, "test": TEST_PICTURES}
# Pictures that are not a plain skimage.data function of their name.
SOURCES: dict[str, Callable[[], np.ndarray]] = {"motorcycle": lambda: skimage.data.stereo_motorcycle()[0]}


def picture(name: str) -> np.ndarray:
    """A bundled picture as (H, W, 3) uint8 (grey repeated; alpha dropped)."""
    image = SOURCES[name]() if name in SOURCES else getattr(skimage.data, name)()
    image = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def random_crop(base: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop (50-100% of the short side), randomly flipped, resized to size x size."""
    side = int(rng.integers(min(base.shape[:2]) // 2, min(base.shape[:2]) + 1))
    y, x = int(rng.integers(base.shape[0] - side + 1)), int(rng.integers(base.shape[1] - side + 1))
    crop = base[y : y + side, x : x + side]
    crop = crop[:, ::-1] if rng.random() < 0.5 else crop
    crop = crop[::-1] if rng.random() < 0.5 else crop
    return np.ascontiguousarray(cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA))


def normal_crops(names: Sequence[str], count: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`count` normal images cycling over the named pictures."""
    bases = [picture(name) for name in names]
    return [random_crop(bases[i % len(bases)], size, rng) for i in range(count)]


def write_normals(names: Sequence[str], count: int, size: int, seed: int, folder: Path) -> list[Path]:
    """normal_crops(names, count, size, seed) saved as folder/000.png, 001.png...; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(normal_crops(names, count, size, np.random.default_rng(seed))):
        paths.append(folder / f"{index:03d}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def object_images(textures: Sequence[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """Object-like images: each texture inside a random ellipse on a flat dark or light background."""
    pool = []
    for texture in textures:
        size = texture.shape[0]
        image = np.full_like(texture, 15 if rng.random() < 0.5 else 235)
        mask = np.zeros((size, size), np.uint8)
        axes = (int(rng.integers(size // 5, size // 2 - 8)), int(rng.integers(size // 5, size // 2 - 8)))
        cv2.ellipse(mask, (size // 2, size // 2), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        image[mask > 0] = (texture[mask > 0].astype(np.uint16) // 2 + 64).astype(np.uint8)
        pool.append(image)
    return pool


def band_crops(
    image: np.ndarray, n: int, size: int, rows: tuple[int, int], rng: np.random.Generator
) -> list[np.ndarray]:
    """n random size x size crops whose top edge lies in [rows[0], rows[1] - size] (e.g. one half of a picture)."""
    out = []
    for _ in range(n):
        y = int(rng.integers(rows[0], rows[1] - size + 1))
        x = int(rng.integers(0, image.shape[1] - size + 1))
        out.append(np.ascontiguousarray(image[y : y + size, x : x + size]))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write crops of bundled pictures as a folder of normal images.")
    parser.add_argument("--pictures", choices=sorted(PICTURE_SETS), default="train")
    parser.add_argument("--n", type=int, default=160, help="number of crops")
    parser.add_argument("--size", type=int, default=256, help="square side of each crop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="folder to write (created; existing files replaced)")
    args = parser.parse_args(argv)
    if args.n < 1 or args.size < 16:
        parser.error("--n must be at least 1 and --size at least 16")
    paths = write_normals(PICTURE_SETS[args.pictures], args.n, args.size, args.seed, args.out)
    print(f"wrote {len(paths)} crops of the {args.pictures} pictures to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
