"""`anomalygpt eval`: the k-shot benchmark on MVTec AD, VisA, ELPV or a plain folder of images.

Every input is checked before anything is written; bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from anomalygpt.cli import (
    CliParser,
    RaySettings,
    UsageError,
    add_engine_arguments,
    check_local_engine,
    check_out_dir,
    one_line,
    ray_settings,
)
from anomalygpt.devices import add_device_option, with_device

PROG = "anomalygpt eval"
MAX_SHOTS = 16  # as inspection.MAX_REFERENCES, checked here before torch is imported
ZERO_SHOT_MODES = ("text", "batch")


@dataclass(frozen=True)
class EvalOptions:
    dataset: str
    root: Path | None
    categories: str | None  # comma-separated, as typed; None: every category found
    shots: str
    seeds: str
    zero_shot: str | None  # "text": the decoder alone; "batch": each category's test images against each other
    preset: str | None  # None: the default preset
    out: Path
    held_out: bool  # also score the samples a dataset reports apart (ELPV's uncertain p = 1/3 cells)
    method: str = "inspector"  # comma-separated methods, as typed; "all" = every method
    test_fraction: float = 0.3  # with baselines: good images held out for testing where the pool is test data
    half: str = "all"  # ELPV only: "dev" (odd-numbered cells) or "test" (even-numbered)
    device: str | None = None  # --device: overrides the preset's
    engine: str = "local"  # "ray": each category's images encoded by Ray Data actors (anomalygpt.engine_ray)
    ray: RaySettings = RaySettings()


@dataclass
class EvalJob:
    """Everything the run needs, loaded and checked before any output is written."""

    config: Any  # eval.runner.EvalConfig (imported lazily: it imports torch)
    splits: dict[str, Any]  # category -> eval.datasets.CategorySplit
    args: dict[str, Any]  # the options as recorded in results.json
    ray: RaySettings | None = None  # None: the local engine


def build_parser() -> CliParser:
    parser = CliParser(
        prog=PROG,
        description="Benchmark the few-shot inspector (k references drawn per seed from good images, thresholds "
        "from the references only, full images), alone or beside the baselines (--method). Writes results.json, "
        "results.md and PNG plots to --out; finished settings are cached in --out/cache and reused when the same "
        "command runs again.",
    )
    parser.add_argument("--dataset", required=True, help="mvtec, visa, elpv (installed package) or folder")
    parser.add_argument("--root", type=Path, default=None, help="dataset folder (not used for elpv)")
    parser.add_argument("--categories", default=None, help="comma-separated categories (default: all found)")
    parser.add_argument("--shots", default="1,2,4", help="comma-separated k values, 1 to 16 (default 1,2,4)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated reference-draw seeds (default 0,1,2)")
    parser.add_argument(
        "--zero-shot",
        nargs="?",
        const="text",
        choices=ZERO_SHOT_MODES,
        default=None,
        help="no references (--shots/--seeds unused): 'text' (the default) the trained decoder alone; 'batch' each "
        "category's test images scored against each other, the threshold from their own scores (as `detect` does "
        "with no --ref and 16 or more queries)",
    )
    parser.add_argument("--preset", default=None, help="preset name or JSON path (default: 'default')")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--held-out",
        action="store_true",
        help="also score the samples a dataset reports apart (ELPV's uncertain p=1/3 cells; about 11%% more time)",
    )
    parser.add_argument(
        "--method",
        default="inspector",
        help="comma-separated methods: inspector (few-shot, rows per --shots), pool (the Inspector with every "
        "training image as a reference, each query matched against its nearest ones), patchcore, simplenet, "
        "unet-ae, feature-ae, or all. With pool or any baseline every method trains on the same split: all good "
        "images not held out for testing (default: inspector)",
    )
    parser.add_argument(
        "--half",
        choices=("all", "dev", "test"),
        default="all",
        help="ELPV only: dev = odd-numbered cells (make every choice there), test = even-numbered cells (report "
        "figures there), all (default)",
    )
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=0.3,
        help="with baselines: share of the good images held out for testing on ELPV and plain folders (default 0.3)",
    )
    add_device_option(parser)
    add_engine_arguments(parser, "encoding each category's images (the inspector method); same metrics")
    return parser


def chosen_methods(text: str) -> tuple[str, ...]:
    """'inspector,patchcore' -> ('inspector', 'patchcore'); 'all' -> every method; UsageError naming unknown ones."""
    from anomalygpt.detector import METHODS

    wanted = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if wanted == ["all"]:
        return METHODS
    unknown = [name for name in wanted if name not in METHODS]
    if unknown or not wanted:
        raise UsageError(f"--method: unknown method {(unknown or [text])[0]!r}; known: {', '.join(METHODS)}, all")
    return tuple(wanted)


def check_full_shot_split(
    split: Any, methods: tuple[str, ...], shots: tuple[int, ...], seeds: tuple[int, ...], test_fraction: float
) -> None:
    """Every seed's training set holds the Inspector's k references (and enough for a baseline), test both classes."""
    from anomalygpt.detector import MIN_VALIDATION
    from eval.datasets import full_shot_split

    for seed in seeds:
        train, test = full_shot_split(split, seed, test_fraction)
        needed = max(max(shots) if "inspector" in methods else 0, MIN_VALIDATION + 1)
        if len(train) < needed:
            raise UsageError(
                f"{split.category}: {len(train)} good training images after the test hold-out; {needed} needed"
            )
        if {sample.label for sample in test} != {0, 1}:
            raise UsageError(f"{split.category}: needs good and defective test images; raise --test-fraction")


def parse_ints(option: str, text: str, minimum: int, maximum: int | None = None) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4), sorted and unique; UsageError naming the option otherwise."""
    values = []
    for part in text.split(","):
        try:
            values.append(int(part.strip()))
        except ValueError:
            raise UsageError(f"{option}: {part.strip()!r} is not an integer (expected e.g. 1,2,4)") from None
    for value in values:
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and at most {maximum}" if maximum is not None else ""
            raise UsageError(f"{option}: {value} is out of range; values must be at least {minimum}{upper}")
    return tuple(sorted(set(values)))


def checked_root(dataset: str, root: Path | None) -> Path | None:
    """The dataset folder; None for ELPV, which reads its installed package."""
    if dataset == "elpv":
        return None
    if root is None:
        raise UsageError(f"--root: required for --dataset {dataset}")
    if not root.is_dir():
        raise UsageError(f"--root: folder {root} does not exist")
    return root


def chosen_categories(dataset: str, root: Path | None, requested: str | None) -> tuple[str, ...]:
    """The requested categories (all found when None), each checked against the dataset."""
    from eval.datasets import categories

    known = categories(dataset, root)
    if requested is None:
        return tuple(known)
    wanted = list(dict.fromkeys(name.strip() for name in requested.split(",") if name.strip()))
    if not wanted:
        raise UsageError("--categories: no category named")
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise UsageError(f"--categories: unknown {dataset} category {unknown[0]!r}; known: {', '.join(known)}")
    return tuple(wanted)


def check_split(split: Any, shots: tuple[int, ...]) -> None:
    """Every k fits the reference pool and every draw leaves good and defective images to score."""
    largest = max(shots)
    pool = len(split.reference_pool)
    if largest > pool:
        raise UsageError(
            f"--shots: k={largest} is larger than the reference pool of {split.category} ({pool} good images)"
        )
    n_good = sum(sample.label == 0 for sample in split.test) + (pool - largest if split.pool_is_test else 0)
    n_bad = sum(sample.label == 1 for sample in split.test)
    if n_good == 0 or n_bad == 0:
        raise UsageError(
            f"{split.category}: needs good and defective test images for AUROC; "
            f"with k={largest} it has {n_good} good and {n_bad} defective"
        )


def options_from(args: argparse.Namespace) -> EvalOptions:
    return EvalOptions(
        dataset=args.dataset,
        root=args.root,
        categories=args.categories,
        shots=args.shots,
        seeds=args.seeds,
        zero_shot=args.zero_shot,
        preset=args.preset,
        out=args.out,
        held_out=bool(args.held_out),
        method=args.method,
        test_fraction=args.test_fraction,
        half=args.half,
        device=args.device,
        engine=args.engine,
        ray=ray_settings(args),
    )


def prepare(options: EvalOptions) -> EvalJob:
    """Validate every option (cheapest first), load the preset and every split, check the cache."""
    from eval.datasets import DATASETS, elpv_half, load_split

    if options.dataset not in DATASETS:
        raise UsageError(f"--dataset: unknown dataset {options.dataset!r}; known: {', '.join(DATASETS)}")
    shots = parse_ints("--shots", options.shots, minimum=1, maximum=MAX_SHOTS)
    seeds = parse_ints("--seeds", options.seeds, minimum=0)
    root = checked_root(options.dataset, options.root)
    if options.half != "all" and options.dataset != "elpv":
        raise UsageError(f"--half {options.half}: only ELPV has development and test halves")
    if not 0.0 < options.test_fraction < 1.0:
        raise UsageError(f"--test-fraction: {options.test_fraction} must be between 0 and 1")
    check_out_dir(options.out)
    from anomalygpt.config import DEFAULT_PRESET, load_preset  # imports torch: after the instant checks
    from anomalygpt.mutual import MIN_BATCH
    from eval.runner import EvalConfig, check_cache_config, fingerprint

    preset = with_device(load_preset(options.preset or DEFAULT_PRESET), options.device)
    methods = chosen_methods(options.method)
    full_shot = methods != ("inspector",)
    if options.zero_shot and full_shot:
        raise UsageError("--zero-shot: the decoder alone has no training set; use it without baselines in --method")
    if options.engine == "ray":
        check_ray_options(options, full_shot)
    else:
        check_local_engine(options.ray)
    if options.zero_shot == "text" and not preset.decoder.weights:
        raise UsageError(f"--zero-shot: preset {preset.name!r} has no trained decoder (decoder.weights)")
    if options.zero_shot == "batch" and options.held_out:
        raise UsageError("--held-out: not with --zero-shot batch (the batch is the test set; score them in it)")
    if options.zero_shot:
        shots, seeds = (0,), (0,)  # no references to draw: one setting per category
    names = chosen_categories(options.dataset, root, options.categories)
    splits = {name: load_split(options.dataset, root, name) for name in names}
    if options.dataset == "elpv":
        splits = {name: elpv_half(split, options.half) for name, split in splits.items()}
    for split in splits.values():
        if full_shot:
            check_full_shot_split(split, methods, shots, seeds, options.test_fraction)
        else:
            check_split(split, shots)
        if (
            options.zero_shot == "batch"
            and len(split.test) + len(split.reference_pool) * split.pool_is_test < MIN_BATCH
        ):
            raise UsageError(f"--zero-shot batch: {split.category} has fewer than {MIN_BATCH} test images")
    config = EvalConfig(
        options.dataset,
        root,
        names,
        shots,
        seeds,
        preset,
        options.out,
        options.held_out,
        methods,
        options.test_fraction,
        options.half,
        options.zero_shot or "",
    )
    check_cache_config(options.out, fingerprint(config))
    args = {
        "dataset": options.dataset,
        "root": None if root is None else str(root),
        "categories": list(names),
        "shots": list(shots),
        "seeds": list(seeds),
        "zero_shot": options.zero_shot,
        "preset": options.preset or DEFAULT_PRESET,
        "out": str(options.out),
        "held_out": options.held_out,
        "methods": list(methods),
        "test_fraction": options.test_fraction,
        "half": options.half,
    }
    return EvalJob(config, splits, args, options.ray if options.engine == "ray" else None)


def check_ray_options(options: EvalOptions, full_shot: bool) -> None:
    from anomalygpt.engine_ray import check_ray_settings, ray_module

    ray_module()
    check_ray_settings(options.ray)
    if full_shot:
        raise UsageError(
            "--engine ray: runs the inspector method only (the k-shot rows); drop the others from --method"
        )
    if options.device is not None:
        raise UsageError("--device: not with --engine ray; each actor runs on the GPU Ray gives it (--ray-gpus)")


def run(job: EvalJob) -> str:
    """Build the inspector, score every setting, pick examples, write the report; returns results.md."""
    from anomalygpt.config import to_dict
    from anomalygpt.inspection import build_inspector
    from eval.report import markdown_report, results_document, showcase, write_report
    from eval.runner import INSPECTOR, example_panels, run_eval

    inspector = build_inspector(job.config.preset)
    outcome = run_eval(inspector, job.config, job.splits, encoder(job.ray))
    shown = {category: r for category, r in showcase(outcome.results).items() if r.method == INSPECTOR}
    examples = {
        category: example_panels(inspector, job.splits[category], result, job.config.zero_shot)
        for category, result in tqdm(shown.items(), desc="examples", unit="category", disable=None)
    }
    document = results_document({"args": job.args, "preset": to_dict(job.config.preset)}, outcome, examples)
    write_report(job.config.out, document, outcome, examples)
    print(
        f"{PROG}: {len(outcome.computed)} settings computed, {len(outcome.reused)} reused from the cache; "
        f"results in {job.config.out / 'results.md'}",
        file=sys.stderr,
    )
    return markdown_report(document)


def encoder(ray: RaySettings | None) -> Any:
    """How each category's images are encoded: here (eval.runner.encode_category) or by Ray's actors."""
    if ray is None:
        from eval.runner import encode_category

        return encode_category
    from anomalygpt.engine_ray import ray_encoder

    return ray_encoder(ray)


def fail(problem: str | BaseException, code: int) -> int:
    print(f"{PROG}: error: {one_line(str(problem))}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run `anomalygpt eval` with the arguments after `eval`; returns the exit code."""
    try:
        args = build_parser().parse_args(None if argv is None else list(argv))
    except SystemExit as stop:  # --help, or a usage error already printed
        return stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 2
    try:
        job = prepare(options_from(args))
        started = connect(job.ray)
    except (ValueError, OSError) as error:  # UsageError, DatasetError, ConfigError, EvalError; WeightsError later
        return fail(error, 2)
    try:
        print(run(job), end="")
    except (ValueError, OSError) as error:  # an unreadable image, a mask of the wrong size, a full disk
        return fail(error, 1)
    except KeyboardInterrupt:
        return fail("interrupted; finished settings are cached in --out/cache, run the same command to resume", 130)
    finally:
        if started:
            from anomalygpt.engine_ray import shutdown

            shutdown()
    return 0


def connect(ray: RaySettings | None) -> bool:
    """--engine ray: join (or start) the cluster before anything is written; True when Ray was started here."""
    if ray is None:
        return False
    from anomalygpt.engine_ray import connect as connect_ray

    return connect_ray(ray.address)
