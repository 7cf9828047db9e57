"""Zero-shot from a batch of unlabelled images: each image's patches are scored against the other images' patches.

Most images of a production batch are good, so a good patch finds close matches in many other images and a
defective one in few. Each patch's score is its distance to the nearest patch of every other image, averaged over
the closest NEIGHBOUR_FRACTION of those images (the best-matching ones): a defect that a few other images share
still scores high, since the average runs over many more images than carry it. Only the deepest stage is used
(ELPV dev half, batches of 200: the stride-16 stage alone, 400 patches per image, scored mono 0.889 / poly 0.843;
subsampling its patches to 100 per image lost 0.04 on mono).

The threshold comes from the batch's own image scores under a stated assumption: fewer than half of the images
are anomalous, and anomalous images score higher. Then the lower half of the scores is all normal: the median
stands for the normal centre and the root mean square deviation of the lower half below it (mirrored) for the
normal spread, and the threshold is median + BATCH_Z x spread. Chosen on ELPV's dev half (batches of 200 with
its 38 % defect share, seeds 0-2): this rule at z 2 gave 1.4 % false alarms and 38 % recall; at z 3 0.1 % / 19 %;
median + z x the median absolute deviation, which the defective share inflates, 0.7 % / 26 % (z 2) and 0 % / 11 %
(z 3).

Cost: each image meets at most MAX_OTHERS other images (a seeded sample beyond that), so a batch of n costs
n x MAX_OTHERS patch-set comparisons and its memory stays at the stage features (n x 400 x C half floats).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from anomalygpt.calibration import Calibration

MIN_BATCH = 16  # fewer queries without references: the text-aligned decoder (mode "zero-shot-text")
NEIGHBOUR_FRACTION = 0.3  # a patch's score averages its distances to the closest 30 % of the other images
MAX_OTHERS = 200  # other images each image is compared with, at most (time and memory linear in the batch)
OTHERS_PER_CHUNK = 32  # other images compared at once (bounds the distance block: 32 x P x P floats)
BATCH_Z = 2.0  # threshold = median + BATCH_Z x the lower half's spread (dev half: 1.4 % false alarms)
ASSUMED_MAX_SHARE = 0.5  # the threshold's assumption, stated in every result: fewer anomalous images than this


def others_of(index: int, n: int, max_others: int, generator: torch.Generator) -> torch.Tensor:
    """The images `index` is compared with: every other one, or a seeded sample of max_others."""
    others = torch.cat([torch.arange(index), torch.arange(index + 1, n)])
    if len(others) > max_others:
        others = others[torch.randperm(len(others), generator=generator)[:max_others]].sort().values
    return others


@torch.inference_mode()
def mutual_maps(
    feats: torch.Tensor,
    fraction: float = NEIGHBOUR_FRACTION,
    max_others: int = MAX_OTHERS,
    seed: int = 0,
    on_image: Callable[[], None] | None = None,
    rows: Sequence[int] | None = None,
) -> torch.Tensor:
    """(N, C, h, w) L2-normalised patch features of a batch -> (N, h, w) patch scores against the other images;
    with rows, only those images' (len(rows), h, w), each as the whole batch's scoring makes it."""
    n, _, h, w = feats.shape
    if n < 2:
        raise ValueError(f"mutual scoring needs at least 2 images, got {n}")
    points = feats.flatten(2).transpose(1, 2).contiguous()  # (N, P, C)
    generator = torch.Generator().manual_seed(seed)
    place = {index: row for row, index in enumerate(range(n) if rows is None else rows)}
    scores = torch.empty(len(place), h * w)
    for index in range(n):
        others = others_of(index, n, max_others, generator)  # drawn for every image: a row's draw is the batch's
        if index not in place:
            continue
        query = points[index].float()
        nearest = []
        for first in range(0, len(others), OTHERS_PER_CHUNK):
            bank = points[others[first : first + OTHERS_PER_CHUNK]].float()  # (K, P, C)
            nearest.append(torch.cdist(query.expand(len(bank), -1, -1), bank).amin(dim=2))  # (K, P)
        distances = torch.cat(nearest)  # (others, P)
        keep = max(1, int(fraction * len(others)))
        scores[place[index]] = distances.topk(keep, dim=0, largest=False).values.mean(dim=0)
        if on_image is not None:
            on_image()
    return scores.view(len(place), h, w)


def batch_calibration(scores: np.ndarray) -> Calibration:
    """Thresholds from a batch's own image scores: median + BATCH_Z x the lower half's spread (see above); the
    preset's z is for references' held-out scores, a spread measured differently."""
    median = float(np.median(scores))
    lower = scores[scores <= median]
    spread = max(float(np.sqrt(np.mean((lower - median) ** 2))), 1e-6)
    threshold = median + BATCH_Z * spread
    method = (
        f"zero-shot batch: threshold from the batch's own {len(scores)} image scores (median + {BATCH_Z:g} x the "
        f"spread of the lower half), assuming fewer than {ASSUMED_MAX_SHARE:.0%} of them are anomalous"
    )
    return Calibration(threshold, threshold, median, spread, len(scores), method, spread)
