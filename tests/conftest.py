import numpy as np
import pytest
from skimage import data

from anomalygpt.backbones import BackboneConfig, build_backbone
from anomalygpt.detector import FeatureCache

BLOB_RADIUS = 10  # px, the dark disks of `blob_data`


@pytest.fixture(scope="session")
def small_backbone():
    """The real offline EfficientNet-Lite0 at a small input size, shared across tests."""
    return build_backbone(BackboneConfig(image_size=128))


def texture_crops(n: int, size: int = 128, seed: int = 0) -> list[np.ndarray]:
    """Good 'product' images: random crops of one real texture (skimage's bundled brick wall), as RGB."""
    wall = data.brick()  # (512, 512) grey
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(n):
        y, x = rng.integers(0, wall.shape[0] - size, size=2)
        crops.append(np.repeat(wall[y : y + size, x : x + size, None], 3, axis=2))
    return crops


def with_dark_blob(image: np.ndarray, center: tuple[int, int], radius: int) -> np.ndarray:
    """A copy with a dark disk drawn at center (x, y): a stand-in for a hole or stain."""
    out = image.copy()
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    out[(xx - center[0]) ** 2 + (yy - center[1]) ** 2 <= radius**2] = 15
    return out


@pytest.fixture(scope="session")
def feature_cache(small_backbone):
    """One stored-feature cache for the feature baselines' tests."""
    return FeatureCache(small_backbone, keep=True)


@pytest.fixture(scope="session")
def blob_data():
    """12 good training crops, 12 held-out good crops, and those 12 with a dark disk at "centres" (x, y)."""
    crops = texture_crops(24, seed=1)
    rng = np.random.default_rng(2)
    centres = [(int(x), int(y)) for x, y in rng.integers(30, 98, size=(12, 2))]
    anomalous = [with_dark_blob(image, c, BLOB_RADIUS) for image, c in zip(crops[12:], centres, strict=True)]
    return {"normals": crops[:12], "good": crops[12:], "anomalous": anomalous, "centres": centres}
