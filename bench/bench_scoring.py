"""Where `anomalygpt eval` spends its time per image: encoding, and a cached-patch scoring pass.

`anomalygpt eval` encodes every image once and then, per setting, turns cached patches into maps
(PatchMemory.maps_from_patches) and scores them. This bench times each part of that pass for one batch of
images shaped like the default preset's (EfficientNet-Lite0 at 320 px: stages of 40 x 40 x 40 and
20 x 20 x 112, a full 16,000-patch memory per stage), with random unit features: timing does not depend on the
values. It sweeps MemoryConfig.chunk_elements, the bound on the similarity block held at once, and checks that
every chunk size gives the same distances. With --backbone it also times the default backbone's patch encoder
(16 ELPV-sized 300 x 300 images per batch) with BatchNorms folded into the convs, as shipped, against the
plain network with the same weights.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_scoring.py --out runs/bench_scoring.json
"""

from __future__ import annotations

import argparse
import functools
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from anomalygpt.io import write_json_atomic
from anomalygpt.memory import embed_patches, fuse_maps, nearest_distance, top_mean

STAGES = ((40, 40), (112, 20))  # (channels, side) of the default preset's two stages at 320 px
BANK = 16_000  # the default preset's per-stage cap, reached from k = 2 on
IMAGE = (300, 300)  # ELPV cells
CHUNKS = (1 << 23, 1 << 22, 1 << 21, 1 << 20, 1 << 19, 1 << 18, 1 << 17, 1 << 16)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median seconds of `repeats` calls after one warm-up, and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), result


def backbone_ms(batch: int, repeats: int) -> dict[str, float]:
    """ms/image of the default backbone's patch encoder, as shipped (folded) and as the plain network."""
    from efficientnet_lite_pytorch import EfficientNet

    from anomalygpt.backbones import BackboneConfig, build_backbone, efficientnet_weights_path

    folded = build_backbone(BackboneConfig(image_size=320, stages=(4, 10)))
    plain = EfficientNet.from_name("efficientnet-lite0")
    plain.load_state_dict(torch.load(efficientnet_weights_path(), map_location="cpu", weights_only=True))
    plain.eval()
    last = max(folded.stages)

    def plain_patches(pixels: torch.Tensor) -> torch.Tensor:
        x = plain._swish(plain._bn0(plain._conv_stem(pixels)))
        for block in plain._blocks[: last + 1]:
            x = block(x)
        return x

    images = [np.random.default_rng(i).integers(0, 256, (300, 300, 3), dtype=np.uint8) for i in range(batch)]
    pixels = folded.preprocess(images)
    with torch.inference_mode():
        shipped, _ = timed(lambda: folded(pixels, embedding=False), repeats)
        reference, _ = timed(lambda: plain_patches(pixels), repeats)
        decode, _ = timed(lambda: folded.preprocess(images), repeats)
    per_image = 1000.0 / batch
    return {"folded": shipped * per_image, "plain": reference * per_image, "resize + normalise": decode * per_image}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="images per scoring batch (eval's SCORE_BATCH)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backbone", action="store_true", help="also time the patch encoder, folded vs plain")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_scoring.json"))
    args = parser.parse_args()
    encoder = backbone_ms(args.batch, args.repeats) if args.backbone else None
    if encoder is not None:
        print("encoder ms/image: " + ", ".join(f"{k} {v:.1f}" for k, v in encoder.items()), flush=True)
    generator = torch.Generator().manual_seed(0)
    patches = [torch.randn(args.batch, c, s, s, generator=generator) for c, s in STAGES]
    banks = [F.normalize(torch.randn(BANK, c, generator=generator), dim=1) for c, _ in STAGES]
    per_image = 1000.0 / args.batch
    parts: dict[str, float] = {}

    seconds, feats = timed(lambda: embed_patches(patches, 3), args.repeats)
    parts["neighbourhood + normalise"] = seconds * per_image
    queries = [f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).contiguous() for f in feats]

    chunks: dict[str, dict[str, float]] = {}
    for chunk in CHUNKS:
        row = {}
        for stage, (q, bank) in enumerate(zip(queries, banks, strict=True)):
            seconds, distances = timed(functools.partial(nearest_distance, q, bank, chunk), args.repeats)
            reference = nearest_distance(q, bank, CHUNKS[0])
            if not torch.allclose(distances, reference, atol=1e-6):
                raise AssertionError(f"chunk {chunk} changes stage {stage}'s distances")
            row[f"stage {stage} ms/image"] = seconds * per_image
        chunks[str(chunk)] = row
        print(f"chunk {chunk:>8}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)
    default = chunks[str(CHUNKS[0])]
    parts["nearest patch, stage 0 (default chunk)"] = default["stage 0 ms/image"]
    parts["nearest patch, stage 1 (default chunk)"] = default["stage 1 ms/image"]

    sides = [side for _, side in STAGES]
    maps = [
        nearest_distance(q, b, CHUNKS[0]).view(args.batch, side, side)
        for q, b, side in zip(queries, banks, sides, strict=True)
    ]
    seconds, fused = timed(lambda: fuse_maps(maps, IMAGE, 4.0), args.repeats)
    parts["upsample + average + smooth"] = seconds * per_image
    seconds, _ = timed(lambda: [top_mean(m, 0.01) for m in fused], args.repeats)
    parts["top-1 % score"] = seconds * per_image
    for name, ms in parts.items():
        print(f"{name:>40}: {ms:6.1f} ms/image")
    summary = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "batch": args.batch,
        "bank": BANK,
        "encoder_ms_per_image": encoder,
        "parts_ms_per_image": parts,
        "chunk_sweep_ms_per_image": chunks,
    }
    write_json_atomic(args.out, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
