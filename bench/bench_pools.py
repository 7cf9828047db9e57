"""Issue 17's figures on ELPV: k-shot draws, pools against full-shot PatchCore, the pool memory, the reference-fit
warning, and speed. Figures on the test half (even-numbered cells) unless --half says otherwise; every choice
behind the defaults was made on the dev half (odd-numbered cells).

Parts (each resumable: the eval runs cache finished settings under --out):
- kshot:  `anomalygpt eval --shots 4`, seeds 0-4 (--shots, --seeds): random draws of k good cells of the type.
- pool:   `anomalygpt eval --method pool,patchcore`, seeds 0-4: references = a seeded 70 % of the good cells of the
          type, test = the other 30 % and the defective cells; PatchCore trains on the same 70 % in the same run.
- memory: the pool's memory on seed 0: retrieval of the nearest 8 (default) against every reference at the
          same cap, thinned by greedy coreset or at random.
- fit:    the reference-fit warning: a type's references (4 drawn, or the pool) against good cells of the same
          type, defective cells of that type, and every cell of the other type.
- trust:  the verdicts of the kshot and pool runs (run those parts first) split by the reference-fit check: false
          alarms and recall on the queries that fit their references and on those warned of, how many are warned,
          and per draw (one operator's references) how often false alarms pass 5 %, on all queries and on those that
          fit.
- rule:   the pool runs' thresholds (run the pool part first) under other rules, recomputed from each run's
          held-out reference scores: mean + 3 spreads of 32 of them (the default before), mean + z spreads of all,
          the conformal quantile at 1, 2, 3, 5 and 10 % (2 %: the default; the others are what an audit applying
          that rate to the records' p-values gets); false alarms (mean, worst draw, draws over 5 %) and recall
          per cell type. The row of the default must give the run's own threshold (checked).
- speed:  ms per inspection (decode included) with 4 references and with a 1,000-image pool, fit and profile
          load times, on this machine.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_pools.py --parts kshot,pool,memory,fit,speed --out runs/bench_pools
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_pools.py --parts kshot,pool,trust --shots 4,8,16 \
        --seeds 0,1,2,3,4,5,6,7,8,9 --out runs/bench_pools_trust
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_elpv import inspection_times

from anomalygpt.calibration import CalibrationConfig, held_out_choice, threshold_rule
from anomalygpt.config import load_preset, to_dict
from anomalygpt.inspection import build_inspector
from anomalygpt.io import load_image, write_json_atomic
from anomalygpt.memory import appearance, embed_patches, memory_inputs
from anomalygpt.references import fit_statistics, grey_thumbnail, reference_fit
from eval.datasets import ELPV_TYPES, elpv_half, full_shot_split, load_split

SEEDS = (0, 1, 2, 3, 4)
PROG = [str(Path(sys.executable).parent / "anomalygpt")]  # the installed command


def evaluate(args: list[str], out: Path) -> None:
    """`anomalygpt eval` in a subprocess (its own cache makes a re-run resume)."""
    subprocess.run([*PROG, "eval", "--dataset", "elpv", *args, "--out", str(out)], check=True)


def cached(out: Path, name: str) -> dict[str, dict[int, dict]]:
    """{cell type: {seed: metrics}} of one method's cached settings."""
    found: dict[str, dict[int, dict]] = {}
    for cell in ELPV_TYPES:
        for path in sorted((out / "cache" / cell).glob(f"{name}_seed*.json")):
            result = json.loads(path.read_text())["result"]
            found.setdefault(cell, {})[int(result["seed"])] = result["metrics"]
    return found


def summary(per_type: dict[str, dict[int, dict]], keys: tuple[str, ...]) -> dict:
    """Mean and std over seeds per type, and of the per-seed means of both types."""
    rows = {}
    for cell, seeds in per_type.items():
        rows[cell] = {
            k: (float(np.mean([m[k] for m in seeds.values()])), float(np.std([m[k] for m in seeds.values()])))
            for k in keys
        }
    common = sorted(set.intersection(*(set(s) for s in per_type.values())))
    both = {k: [np.mean([per_type[c][s][k] for c in per_type]) for s in common] for k in keys}
    rows["both"] = {k: (float(np.mean(v)), float(np.std(v))) for k, v in both.items()}
    return rows


def table(title: str, rows: dict, keys: tuple[str, ...]) -> str:
    lines = [f"\n{title}\n", "| cells | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for cell, values in rows.items():
        lines.append(f"| {cell} | " + " | ".join(f"{values[k][0]:.3f} ± {values[k][1]:.3f}" for k in keys) + " |")
    return "\n".join(lines)


KEYS = ("auroc", "false_alarm_rate", "recall", "ms_per_image")


def part_kshot(out: Path, half: str, shots: str, seeds: str) -> dict:
    """`anomalygpt eval --shots` (default 4) over seeds (default 0-4), nested draws per seed."""
    evaluate(["--half", half, "--shots", shots, "--seeds", seeds], out / "kshot")
    rows = {}
    for k in shots.split(","):
        rows[k] = summary(cached(out / "kshot", f"k{k}"), KEYS)
        print(table(f"{k}-shot random draws, ELPV {half} half, seeds {seeds}", rows[k], KEYS), flush=True)
    return rows if len(rows) > 1 else rows[shots]


def part_pool(out: Path, half: str) -> dict:
    seeds = ",".join(map(str, SEEDS))
    evaluate(["--half", half, "--method", "pool,patchcore", "--seeds", seeds], out / "pool")
    rows = {name: summary(cached(out / "pool", name), KEYS) for name in ("pool", "patchcore")}
    for name, values in rows.items():
        print(table(f"{name}, ELPV {half} half, seeds 0-4 (same splits)", values, KEYS), flush=True)
    return rows


def part_memory(out: Path, half: str) -> dict:
    """Seed 0: the default pool memory against every reference at the same cap, coreset or random."""
    base = load_preset("default")
    variants = {
        "retrieve 8 nearest (default)": {},
        "retrieve 8 nearest, random": {"retrieve": 8, "thinning": "random"},
        "every reference, coreset": {"retrieve": 0, "thinning": "coreset"},
        "every reference, random": {"retrieve": 0, "thinning": "random"},
    }
    rows = {}
    for label, change in variants.items():
        name = "default" if not change else f"{change['retrieve']}-{change['thinning']}"
        preset = dataclasses.replace(base, name=name, memory=dataclasses.replace(base.memory, **change))
        path = out / "memory" / f"{name}.json"
        write_json_atomic(path, json.loads(json.dumps(to_dict(preset))))
        folder = out / "memory" / name
        evaluate(["--half", half, "--method", "pool", "--seeds", "0", "--preset", str(path)], folder)
        rows[label] = summary(cached(folder, "pool"), KEYS)
        print(table(f"pool memory: {label}, seed 0", rows[label], KEYS), flush=True)
    return rows


@torch.inference_mode()
def looks(inspector, paths: list[Path]) -> tuple[torch.Tensor, list[float]]:
    """Appearance descriptors (N, C) and mean grey levels of images, as Inspector.inspect computes them."""
    cfg = inspector.preset.memory
    found, brightness = [], []
    for first in range(0, len(paths), 16):
        images = [load_image(p) for p in paths[first : first + 16]]
        patches = inspector.backbone.encode(memory_inputs(images, cfg)).patches
        found.append(appearance(embed_patches(patches, cfg.neighbourhood)[-1]))
        brightness += [float(grey_thumbnail(image).mean()) for image in images]
    return torch.cat(found), brightness


def warn_rate(stats, refs, queries, names) -> float:
    looks_q, light_q = queries
    fits = [reference_fit(a, b, refs, stats, names)["fits"] for a, b in zip(looks_q, light_q, strict=True)]
    return float(np.mean([f is False for f in fits]))


def part_fit(out: Path, half: str) -> dict:
    inspector = build_inspector("default")
    splits = {cell: elpv_half(load_split("elpv", None, cell), half) for cell in ELPV_TYPES}
    data = {}
    for cell, split in splits.items():
        good, bad = sorted(split.reference_pool), [s.path for s in split.test]
        data[cell] = {"good": good, "looks": looks(inspector, good), "bad": looks(inspector, bad)}
    rows = {}
    for cell, other in (("mono", "poly"), ("poly", "mono")):
        everyone_else = (
            torch.cat([data[other]["looks"][0], data[other]["bad"][0]]),
            data[other]["looks"][1] + data[other]["bad"][1],
        )
        for setting in ("4 references", "pool"):
            rates = {"same type, good": [], "same type, defective": [], "other type": []}
            for seed in SEEDS:
                good = data[cell]["good"]
                if setting == "pool":
                    train, test = full_shot_split(splits[cell], seed, 0.3)
                    index = {p: i for i, p in enumerate(good)}
                    refs = [index[p] for p in train]
                    held = [index[s.path] for s in test if s.label == 0]
                else:
                    order = np.random.default_rng(seed).permutation(len(good))
                    refs, held = order[:4].tolist(), order[4:].tolist()
                a, b = data[cell]["looks"]
                stats = fit_statistics(a[refs], [b[i] for i in refs])
                names = [str(good[i]) for i in refs]
                rates["same type, good"].append(warn_rate(stats, a[refs], (a[held], [b[i] for i in held]), names))
                rates["same type, defective"].append(warn_rate(stats, a[refs], data[cell]["bad"], names))
                rates["other type"].append(warn_rate(stats, a[refs], everyone_else, names))
            rows[f"{cell} references, {setting}"] = {k: float(np.mean(v)) for k, v in rates.items()}
    print(f"\nreference-fit warning rate, ELPV {half} half, seeds 0-4\n")
    print("| references | same type, good | same type, defective | other type |\n|---|---|---|---|")
    for label, r in rows.items():
        print(f"| {label} | {r['same type, good']:.3f} | {r['same type, defective']:.3f} | {r['other type']:.3f} |")
    return rows


def settings(folder: Path, name: str) -> list[dict]:
    """Every cached setting of one method under an eval run's folder (both cell types, every seed)."""
    return [json.loads(path.read_text())["result"] for path in sorted(folder.glob(f"cache/*/{name}_seed*.json"))]


def part_trust(out: Path, half: str) -> dict:
    """Can an operator lean on a verdict that carries no fit warning? The kshot and pool runs' verdicts (at their
    automatic thresholds) split by the reference-fit check of each query against that setting's references, pooled
    over the draws, and each draw's false alarms (what one operator with those references would see)."""
    inspector = build_inspector("default")
    kshot = settings(out / "kshot", "k*")
    runs = {f"{k} references": [r for r in kshot if r["k"] == k] for k in sorted({r["k"] for r in kshot})}
    runs["pool"] = settings(out / "pool", "pool")
    if not kshot or not runs["pool"]:
        raise SystemExit(f"bench_pools: trust reads the kshot and pool parts' runs under {out}: run those parts first")
    splits = {cell: elpv_half(load_split("elpv", None, cell), half) for cell in ELPV_TYPES}
    for result in runs["pool"]:  # a pool run stores its split's seed, not its references: the training part
        train, _ = full_shot_split(splits[result["category"]], result["seed"], 0.3)
        result["references"] = [str(path) for path in train]
        if len(train) != result["k"] or set(result["references"]) & set(result["paths"]):
            raise SystemExit(f"bench_pools: the pool run's split of {result['category']} is not the one rebuilt")
    paths = sorted({p for found in runs.values() for r in found for p in [*r["references"], *r["paths"]]})
    looked = looks(inspector, [Path(p) for p in paths])
    row_of = {p: i for i, p in enumerate(paths)}
    rows: dict = {}
    for label, found in runs.items():
        for cell in ELPV_TYPES:
            counts = np.zeros((2, 2, 2), dtype=np.int64)  # [fits][label][flagged], all draws together
            draws = []  # per draw: false alarms on every good query, and on those that fit
            for result in (r for r in found if r["category"] == cell):
                refs = [row_of[p] for p in result["references"]]
                a, b = looked[0][refs], [looked[1][i] for i in refs]
                stats = fit_statistics(a, b)
                threshold = result["calibration"]["image_threshold"]
                draw = np.zeros_like(counts)
                for path, truth, score in zip(result["paths"], result["labels"], result["scores"], strict=True):
                    i = row_of[path]
                    fits = reference_fit(looked[0][i], looked[1][i], a, stats, result["references"])["fits"]
                    draw[int(fits is not False), truth, int(score > threshold)] += 1
                counts += draw
                draws.append((draw[:, 0, 1].sum() / draw[:, 0].sum(), draw[1, 0, 1] / max(1, draw[1, 0].sum())))
            rows[f"{cell}, {label}"] = trust_row(counts) | per_draw(np.array(draws))
    print(f"\nverdicts split by the reference-fit check, ELPV {half} half (good: false alarms; defective: recall)\n")
    print(
        "| references | good warned | defective warned | false alarms: fit / warned | recall: fit / warned "
        "| draws over 5 % false alarms: all / fit | worst draw: all / fit |\n|---|---|---|---|---|---|---|"
    )
    for label, r in rows.items():
        print(
            f"| {label} | {r['good_warned']:.3f} | {r['defective_warned']:.3f} | {r['false_alarms_fit']:.3f} / "
            f"{r['false_alarms_warned']:.3f} | {r['recall_fit']:.3f} / {r['recall_warned']:.3f} | "
            f"{r['draws_over_5pct']} / {r['draws_over_5pct_fit']} of {r['draws']} | "
            f"{r['worst_false_alarms']:.3f} / {r['worst_false_alarms_fit']:.3f} |"
        )
    return rows


def part_rule(out: Path, half: str) -> dict:
    """The pool runs' verdicts under each threshold rule, from their stored held-out reference scores."""
    cfg = load_preset("default").calibration
    # At 0.1 % the conformal rule needs 999 held-out references: below that, mean + z spreads (pools here: <= 319)
    before = dataclasses.replace(cfg, max_held_out=32, false_alarm_rate=1e-3)
    rules = {"mean + 3 spreads of 32 (before)": before}
    rules |= {f"mean + {z:g} spreads of all": dataclasses.replace(cfg, z=z, false_alarm_rate=1e-3) for z in (2, 2.5)}
    conformal = (0.01, 0.02, 0.03, 0.05, 0.1)
    rules |= {f"conformal {rate:.0%}": dataclasses.replace(cfg, false_alarm_rate=rate) for rate in conformal}
    runs = settings(out / "pool", "pool")
    if not runs or any(len(r["calibration"].get("reference_scores", ())) != r["k"] for r in runs):
        raise SystemExit(f"bench_pools: rule reads pool runs under {out} with every reference's held-out score")
    rows: dict = {}
    for name, rule in rules.items():
        for cell in ELPV_TYPES:
            found = [r for r in runs if r["category"] == cell]
            rates = np.array([rule_rates(r, rule) for r in found])  # (draws, 2): false alarms, recall
            rows[f"{cell}, {name}"] = {
                "false_alarms": float(rates[:, 0].mean()),
                "worst_false_alarms": float(rates[:, 0].max()),
                "draws_over_5pct": int((rates[:, 0] > 0.05).sum()),
                "recall": float(rates[:, 1].mean()),
                "draws": len(found),
            }
    for r in runs:  # the default rule must reproduce what the run itself decided
        scores = np.array(r["calibration"]["reference_scores"])
        if abs(threshold_rule(scores, scores, r["k"], cfg)[0] - r["calibration"]["image_threshold"]) > 1e-9:
            raise SystemExit(f"bench_pools: the default rule misses {r['category']} seed {r['seed']}'s threshold")
    print(f"\npool thresholds by rule, ELPV {half} half (false alarms on good test cells, recall on defective)\n")
    print("| pool, rule | false alarms | worst draw | draws over 5 % | recall |\n|---|---|---|---|---|")
    for label, row in rows.items():
        print(
            f"| {label} | {row['false_alarms']:.3f} | {row['worst_false_alarms']:.3f} | "
            f"{row['draws_over_5pct']} of {row['draws']} | {row['recall']:.3f} |"
        )
    return rows


def rule_rates(result: dict, cfg: CalibrationConfig) -> tuple[float, float]:
    """False alarms and recall of one pool run at the threshold `cfg` gives from its held-out reference scores
    (one per reference, in reference order, so the seeded sample of `max_held_out` is the one fit would take)."""
    scores = np.array(result["calibration"]["reference_scores"])[held_out_choice(result["k"], cfg)]
    threshold, _, _ = threshold_rule(scores, scores, result["k"], cfg)
    labels, flagged = np.array(result["labels"]), np.array(result["scores"]) > threshold
    return float(flagged[labels == 0].mean()), float(flagged[labels == 1].mean())


def trust_row(counts: np.ndarray) -> dict:
    """Shares from counts[fits][label][flagged] (fits: 1 fit or unknown, 0 warned; label 1 defective)."""

    def share(part: np.ndarray) -> float:
        return float(part[1] / part.sum()) if part.sum() else float("nan")

    return {
        "good_warned": float(counts[0, 0].sum() / counts[:, 0].sum()),
        "defective_warned": float(counts[0, 1].sum() / counts[:, 1].sum()),
        "false_alarms_fit": share(counts[1, 0]),
        "false_alarms_warned": share(counts[0, 0]),
        "recall_fit": share(counts[1, 1]),
        "recall_warned": share(counts[0, 1]),
        "counts": counts.tolist(),
    }


def per_draw(false_alarms: np.ndarray) -> dict:
    """From (draws, 2) false-alarm rates (every good query, the good queries that fit): how many draws exceed 5 %
    and the worst draw, each way."""
    return {
        "draws": len(false_alarms),
        "draws_over_5pct": int((false_alarms[:, 0] > 0.05).sum()),
        "draws_over_5pct_fit": int((false_alarms[:, 1] > 0.05).sum()),
        "worst_false_alarms": float(false_alarms[:, 0].max()),
        "worst_false_alarms_fit": float(false_alarms[:, 1].max()),
    }


def part_speed(out: Path, n_pool: int) -> dict:
    """4 references and an n_pool-image pool (good cells of both types and halves: speed only, no figure of
    quality), 60 queries each (defective cells), decode included."""
    inspector = build_inspector("default")
    splits = {cell: load_split("elpv", None, cell) for cell in ELPV_TYPES}
    goods = sorted(p for s in splits.values() for p in s.reference_pool)
    queries = [s.path for s in splits["mono"].test[:61]]
    rng = np.random.default_rng(0)
    result = {}
    for label, n in (("4 references", 4), (f"{n_pool}-image pool", n_pool)):
        refs = [goods[i] for i in sorted(rng.choice(len(goods), n, replace=False))]
        start = time.perf_counter()
        references = inspector.fit(refs, progress=True)
        fit_s = time.perf_counter() - start
        profile = inspector.save_profile(references, out / f"speed_{n}.profile")
        with open(profile, "rb") as handle:  # out of the page cache: the load reads the disk
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        loaded = inspector.load_profile(profile)
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        inspector.load_profile(profile)
        warm_s = time.perf_counter() - start
        row = {
            "fit_s": fit_s,
            "profile_load_s": load_s,
            "profile_load_cached_s": warm_s,
            "profile_mb": profile.stat().st_size / 2**20,
            **inspection_times(inspector, loaded, queries),  # inspections against the loaded profile
            "mode": references.mode,
        }
        result[label] = row
        print(
            f"{label}: fit {fit_s:.1f} s, profile {row['profile_mb']:.1f} MB loads in {load_s:.2f} s "
            f"({warm_s:.2f} s from the page cache), "
            f"{row['ms_per_image_mean']:.0f} ms/image (median {row['ms_per_image_median']:.0f}, "
            f"p95 {row['ms_per_image_p95']:.0f}), "
            f"mode {row['mode']}",
            flush=True,
        )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="kshot,pool,memory,fit,trust,speed")
    parser.add_argument("--half", default="test", choices=("dev", "test", "all"))
    parser.add_argument("--shots", default="4", help="kshot part: comma-separated k values")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="kshot part: comma-separated draw seeds")
    parser.add_argument("--pool-size", type=int, default=1000, help="references of the speed part's pool")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_pools"))
    args = parser.parse_args()
    parts = {
        "kshot": lambda: part_kshot(args.out, args.half, args.shots, args.seeds),
        "pool": lambda: part_pool(args.out, args.half),
        "memory": lambda: part_memory(args.out, args.half),
        "fit": lambda: part_fit(args.out, args.half),
        "trust": lambda: part_trust(args.out, args.half),
        "rule": lambda: part_rule(args.out, args.half),
        "speed": lambda: part_speed(args.out, args.pool_size),
    }
    report_path = args.out / f"bench_pools_{args.half}.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    for name in args.parts.split(","):
        start = time.perf_counter()
        report[name] = {
            "result": parts[name](),
            "seconds": time.perf_counter() - start,
            "threads": torch.get_num_threads(),
        }
        write_json_atomic(report_path, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
