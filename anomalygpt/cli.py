"""The one command line, `anomalygpt`: `detect` here; simulate/train/eval/chat/ui/demo load their package lazily.

cli.py is the composition root: the core library never imports simulation/train/chat/eval, and this module
imports them only inside their handlers (torch too, only for the commands that need it), so `--help` is quick.
Exit codes: 0 done, 1 a failure after every input was accepted (a disk error), 2 bad input or an unavailable
command. Errors are one line on stderr: "anomalygpt <verb>: error: <file or option>: <problem>".
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import json
import math
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
from tqdm import tqdm

from anomalygpt.devices import add_device_option, with_device
from anomalygpt.io import (
    ImageError,
    list_images,
    load_image,
    load_source,
    lossy_encoding,
    ordered_map,
    safe_text,
    write_json_atomic,
    write_npy_atomic,
)

if TYPE_CHECKING:
    from anomalygpt.config import Preset
    from anomalygpt.inspection import Inspection, Inspector, References
    from anomalygpt.verdict import Calibration

PROG = "anomalygpt"
SENSITIVITY_RANGE = (-5.0, 5.0)  # in normal spreads: beyond 5 the threshold leaves the range references justify
MAX_REFERENCES = 10_000  # as inspection.MAX_REFERENCES, checked here before torch is imported
MAX_FALSE_ALARM_RATE = 0.5  # as calibration.MAX_FALSE_ALARM_RATE, for the same reason
BATCH_NOTE = (
    "no references: the {n} images are scored against each other (zero-shot-batch); the threshold comes from "
    "their own scores and assumes fewer than half of them are defective"
)
# --maps: every image's map and overlay, only those of flagged images (anomalous, or unlike the references: the
# ones to review), or none (records only). A 300 px cell's map and overlay are ~490 KB, its record ~2 KB.
MAPS_CHOICES = ("all", "flagged", "none")
SUMMARY_STEM = "summary"  # summary.json shares --out with the per-image files; no image may take its name
TABLE_COLUMNS = ("file", "verdict", "score", "threshold", "margin", "regions", "locations", "fit")
# With a conformal threshold (a pool of 49 or more references) the table adds each image's p-value after the margin
P_TABLE_COLUMNS = ("file", "verdict", "score", "threshold", "margin", "p", "regions", "locations", "fit")
NUMBER_OPTIONS = ("--sensitivity",)  # their values may look like options to argparse: -1e9, -inf
SHOWN_PLACES = 3  # regions whose places a table row names; the rest are counted (the record lists them all)
SHOWN_IMAGE_WARNINGS = 5  # images whose own warnings detect prints before its table; the others are counted
# Threads drawing and writing detect's per-image files beside the inspection (a figure and its PNG take about as long
# as inspecting a 300 px image on one core): bench/bench_detect.py
WRITE_THREADS = min(8, os.cpu_count() or 1)
CHECK_THREADS = min(16, os.cpu_count() or 1)  # threads decoding detect's queries to check them before any output
CHECK_BAR_FROM = 64  # queries from which that check shows a progress bar (on a terminal)


@dataclass(frozen=True)
class LazyCommand:
    module: str  # imported only when the verb runs; provides main(argv: list[str]) -> int
    help: str


LAZY_COMMANDS = {
    "simulate": LazyCommand("simulation.cli", "synthesise anomalies and conversations for training"),
    "train": LazyCommand("train.cli", "train the decoder, prompt learner and LoRA adapter"),
    "eval": LazyCommand("eval.cli", "benchmark on MVTec AD, VisA, ELPV or an image folder"),
    "chat": LazyCommand("chat.cli", "chat in the terminal about an inspected image"),
    "ui": LazyCommand("chat.web", "web app (needs the [ui] extra)"),
    "demo": LazyCommand("chat.demo", "inspect and chat about a built-in example"),
    "serve": LazyCommand("anomalygpt.service.cli", "HTTP inspection service (needs the [serve] extra)"),
    "export": LazyCommand("anomalygpt.export", "a profile as ONNX/OpenVINO, inspected without torch ([export] extra)"),
    "audit": LazyCommand("anomalygpt.service.export", "export the service's audit trail as CSV or JSON lines"),
}


class UsageError(ValueError):
    """A command-line input the CLI itself rejects; the message names the file or option."""


@dataclass(frozen=True)
class RaySettings:
    """Where and how wide `--engine ray` runs."""

    address: str | None = None  # None: start a local Ray instance; "auto" or "ray://host:port": a running cluster
    actors: int | None = None  # None: one per GPU of the cluster, else one per CPU slot
    cpus: float = 1.0  # per actor
    gpus: float | None = None  # per actor; None: 1 when the cluster has GPUs, else 0


@dataclass(frozen=True)
class DetectOptions:
    queries: list[str]  # files and folders, as typed
    refs: list[str]
    profile: Path | None  # a fitted product profile, instead of refs
    preset: str | None  # None: the default preset (the profile's own with --profile)
    class_name: str | None
    out: Path | None
    as_json: bool
    sensitivity: float  # > 0 lowers the thresholds by that many normal spreads (more alarms)
    overwrite: bool  # replace output files already in --out (never an input image)
    device: str | None = None  # --device: overrides the preset's; None: the preset's (the profile's own)
    batch_size: int | None = None  # images per backbone pass with references; None: the inspector's default
    engine: str = "local"  # "ray": the same inspection as Ray Data actors (anomalygpt.engine_ray)
    ray: RaySettings = RaySettings()
    maps: str = "all"  # --maps: which images get their map and overlay written (MAPS_CHOICES)
    processes: int = 0  # --processes: worker processes decoding and finishing images (0: threads)


@dataclass(frozen=True)
class FitOptions:
    goods: list[str]  # files and folders, as typed
    out: Path  # the profile file
    preset: str | None
    class_name: str | None
    overwrite: bool
    device: str | None = None  # --device: overrides the preset's
    false_alarm_rate: float | None = None  # --false-alarm-rate: overrides the preset's calibration.false_alarm_rate


@dataclass
class DetectJob:
    """Everything `detect` needs, loaded and checked before any output is written."""

    preset: Preset
    inspector: Inspector
    references: References | None  # None: zero-shot
    reference_paths: list[Path]  # with a profile: its references' names (the files may be elsewhere)
    queries: list[Path]
    stems: list[str]  # unique output name per query
    profile: Path | None = None
    batch: bool = False  # no references and at least MIN_BATCH queries: zero-shot from the batch itself
    skipped: list[Path] = field(default_factory=list)  # overlays an earlier detect wrote among the queries
    # With --out and references: the job's identity, kept in summary.json from the start (earlier_run); None: a
    # job that cannot be resumed (no --out, or no references: a batch's verdicts depend on the whole batch)
    key: dict[str, Any] | None = None
    resumed: bool = False  # --out holds an interrupted run of this job: its complete records are reused


class CliParser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line, '<prog>: error: <message>', with exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {safe_text(message)}\n")


def one_line(text: str) -> str:
    """Text squeezed onto one line, safe for a terminal (what the chat front ends print errors with)."""
    return safe_text(" ".join(text.split()))


def build_parser() -> CliParser:
    parser = CliParser(prog=PROG, description="Few-shot industrial inspection with a grounded assistant.")
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND", required=True)
    add_detect_parser(verbs)
    add_fit_parser(verbs)
    for verb, command in LAZY_COMMANDS.items():
        # No -h here: every argument, --help included, goes to the command's own parser.
        verbs.add_parser(verb, help=command.help, description=command.help, add_help=False)
    return parser


def add_detect_parser(verbs: Any) -> None:
    detect = verbs.add_parser(
        "detect",
        help="inspect images against good references",
        description="Inspect QUERY images against good references of the same product and size. Put QUERY before "
        "--ref (or end the --ref list with --). A folder means its image files (not subfolders); an empty one is "
        "an error. Every input is checked before anything is written.",
    )
    detect.add_argument("queries", nargs="+", metavar="QUERY", help="image files or folders to inspect")
    detect.add_argument(
        "--ref",
        action="extend",
        nargs="+",
        default=[],
        metavar="GOOD",
        help="good images (files or folders) of the same product, 1 to 10,000; none (and no --profile): zero-shot, "
        "from the batch itself with 16 or more queries of one size, else the trained text-aligned decoder",
    )
    detect.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="a product profile written by 'anomalygpt fit' (instead of --ref: nothing is indexed again)",
    )
    detect.add_argument(
        "--preset", default=None, help="preset name or JSON path (default: 'default', or the profile's own)"
    )
    detect.add_argument("--class-name", default=None, help="product name, e.g. 'screw' (recorded in the results)")
    detect.add_argument(
        "--out",
        type=out_folder,
        default=None,
        help="folder for <stem>.json, <stem>_overlay.png, <stem>_map.npy and summary.json",
    )
    detect.add_argument(
        "--overwrite",
        action="store_true",
        help="replace those files when --out already has them (an input image is never replaced)",
    )
    detect.add_argument(
        "--maps",
        choices=MAPS_CHOICES,
        default="all",
        help="with --out, whose <stem>_map.npy and <stem>_overlay.png are written: all (default), flagged "
        "(anomalous, or unlike the references) or none; every image gets its <stem>.json",
    )
    detect.add_argument(
        "--json", dest="as_json", action="store_true", help="print one JSON list of inspections instead of the table"
    )
    detect.add_argument(
        "--sensitivity",
        type=float,
        default=0.0,
        help="-5 to 5 normal spreads; > 0 lowers the thresholds (more alarms), < 0 raises them",
    )
    add_device_option(detect)
    detect.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="images per batch when inspecting against references (default 16): decoded ahead, searched together, "
        "one backbone pass on a GPU",
    )
    detect.add_argument(
        "--processes",
        type=count_int,
        default=0,
        help="decode and finish the images (fit check, verdict, regions) in N worker processes instead of threads "
        "(pixels and maps shared through files in /dev/shm or the temporary folder): for many cores beside a GPU "
        "(default 0: threads)",
    )
    add_engine_arguments(detect, "with --profile and --out; the same records, resumable: a re-run skips images done")


def add_engine_arguments(parser: argparse.ArgumentParser, ray_use: str) -> None:
    """--engine and the Ray options, shared by detect and eval."""
    parser.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help=f"local (default) or ray: Ray Data actors, {ray_use}",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to run on: auto (the one 'ray start' made on this machine) or ray://HOST:10001; "
        "default: start a local instance",
    )
    parser.add_argument(
        "--ray-actors",
        type=int,
        default=None,
        help="actors, each holding the models once (default: one per GPU, else one per CPU slot)",
    )
    parser.add_argument("--ray-cpus", type=float, default=1.0, help="CPUs per actor (default 1)")
    parser.add_argument(
        "--ray-gpus", type=float, default=None, help="GPUs per actor (default: 1 when the cluster has GPUs, else 0)"
    )


def ray_settings(args: argparse.Namespace) -> RaySettings:
    return RaySettings(args.ray_address, args.ray_actors, float(args.ray_cpus), args.ray_gpus)


def check_local_engine(ray: RaySettings) -> None:
    """The local engine has no use for Ray's options: given, they are a mistake, not silently dropped."""
    if ray != RaySettings():
        raise UsageError("--ray-address, --ray-actors, --ray-cpus, --ray-gpus: only with --engine ray")


def add_fit_parser(verbs: Any) -> None:
    fit = verbs.add_parser(
        "fit",
        help="index good images once into a product profile",
        description="Index GOOD images of one product (1 to 10,000, one size) into a profile that detect, chat, ui "
        "and the Python API load without indexing again: the memory, the automatic threshold, the augmentation "
        "decision and the statistics of the reference-fit check.",
    )
    fit.add_argument("goods", nargs="+", metavar="GOOD", help="good image files or folders")
    fit.add_argument("--out", type=Path, required=True, help="the profile file to write, e.g. solar-cell.profile")
    fit.add_argument("--preset", default=None, help="preset name or JSON path (default: 'default')")
    fit.add_argument("--class-name", default=None, help="product name, e.g. 'solar cell' (kept in the profile)")
    fit.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    fit.add_argument(
        "--false-alarm-rate",
        type=false_alarm_rate,
        default=None,
        metavar="RATE",
        help="share of good parts like the references that may be flagged, above 0 and at most 0.5 (default: the "
        "preset's, 0.02); the threshold keeps it once there are enough references: (1 - RATE) / RATE, 49 at 0.02",
    )
    add_device_option(fit)


def out_folder(text: str) -> Path:
    """--out's value; an empty one would silently mean the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must be a folder path, got an empty string")
    return Path(text)


def count_int(text: str) -> int:
    """A whole number of 0 or more (argparse type)."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number of 0 or more, got {text!r}")
    return int(text)


def positive_int(text: str) -> int:
    """An integer of 1 or more (argparse type)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return int(text)


def false_alarm_rate(text: str) -> float:
    """A rate above 0 and at most MAX_FALSE_ALARM_RATE (argparse type), as the preset's calibration.false_alarm_rate."""
    rate = float(text) if is_number(text) else math.nan
    if not 0 < rate <= MAX_FALSE_ALARM_RATE:
        raise argparse.ArgumentTypeError(f"must be a number above 0 and at most {MAX_FALSE_ALARM_RATE:g}, got {text!r}")
    return rate


def attach_number_values(argv: list[str]) -> list[str]:
    """'--sensitivity -1e9' -> '--sensitivity=-1e9': argparse reads '-5' as a value but '-1e9' as an option."""
    joined: list[str] = []
    for arg in argv:
        previous = joined[-1] if joined else ""
        if previous in NUMBER_OPTIONS and "--" not in joined and is_number(arg):
            joined[-1] = f"{previous}={arg}"
        else:
            joined.append(arg)
    return joined


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `anomalygpt` command line; returns the exit code."""
    parser = build_parser()
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["detect"]:
        arguments = attach_number_values(arguments)
    try:
        args, extra = parser.parse_known_args(arguments)
    except SystemExit as stop:  # --help, or a usage error already printed
        return stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 2
    if args.verb not in ("detect", "fit"):
        return run_lazy(args.verb, extra)
    if extra:
        return fail(args.verb, f"unrecognized arguments: {' '.join(extra)}")
    if args.verb == "fit":
        options = FitOptions(
            list(args.goods),
            args.out,
            args.preset,
            args.class_name,
            bool(args.overwrite),
            args.device,
            args.false_alarm_rate,
        )
        return run_fit(options)
    return run_detect(detect_options(args))


def fail(verb: str, problem: str | BaseException, code: int = 2) -> int:
    """Print the error and return its exit code; safe_text keeps it one line (a newline in a name shows as \\n)."""
    print(f"{PROG} {verb}: error: {safe_text(problem)}", file=sys.stderr)
    return code


def run_lazy(verb: str, argv: list[str]) -> int:
    """Import the verb's module now and hand it the remaining arguments."""
    command = LAZY_COMMANDS[verb]
    try:
        module = importlib.import_module(command.module)
    except ModuleNotFoundError as error:
        if error.name is None or not (command.module + ".").startswith(error.name + "."):
            return fail(verb, f"needs the Python package {error.name or error}, which is not installed")
        module = None  # the command's own module does not exist yet
    if module is None or not callable(getattr(module, "main", None)):
        print(f"{PROG} {verb}: not available yet (see the README)", file=sys.stderr)
        return 2
    return int(module.main(argv))


def detect_options(args: argparse.Namespace) -> DetectOptions:
    return DetectOptions(
        queries=list(args.queries),
        refs=list(args.ref),
        profile=args.profile,
        preset=args.preset,
        class_name=args.class_name,
        out=args.out,
        as_json=bool(args.as_json),
        sensitivity=float(args.sensitivity),
        overwrite=bool(args.overwrite),
        device=args.device,
        batch_size=args.batch_size,
        engine=args.engine,
        ray=ray_settings(args),
        maps=args.maps,
        processes=args.processes,
    )


def run_detect(options: DetectOptions) -> int:
    """`anomalygpt detect`: check and load everything, then inspect, print and write the results."""
    if options.engine == "ray":
        from anomalygpt.engine_ray import run_detect as run_ray_detect

        return run_ray_detect(options)
    try:
        job = prepare_detect(options)
    except (ValueError, OSError) as error:  # Image-, Inspection-, Config-, UsageError; WeightsError is an OSError
        return fail("detect", error)
    if job.references:  # about the references: once, up front
        reference_notes("detect", job.references)
        rate = rate_note(job.references.calibration, options.sensitivity)
        if rate:
            print(f"{PROG} detect: note: {rate}", file=sys.stderr)
    if job.skipped:
        first = safe_text(job.skipped[0])
        print(
            f"{PROG} detect: note: not inspecting {len(job.skipped)} overlay picture(s) written by an earlier "
            f"detect (first: {first})",
            file=sys.stderr,
        )
    lossy = lossy_note(job.queries, job.reference_paths)
    if lossy:
        print(f"{PROG} detect: note: {safe_text(lossy)}", file=sys.stderr)
    try:
        records = inspect_all(job, options)
    except (ImageError, OSError) as error:  # a file changed or a disk filled after the checks
        return fail("detect", error, code=1)
    except KeyboardInterrupt:
        if job.key is not None:
            return fail("detect", "interrupted; the records written are kept: run the same command to resume", 130)
        again = "" if options.out is None else ": without references a run starts over (run it again with --overwrite)"
        return fail("detect", f"interrupted{again}", 130)
    from anomalygpt.verdict import ZERO_SHOT_TEXT_CAVEAT

    if any(ZERO_SHOT_TEXT_CAVEAT in record["warnings"] for record in records):  # every such record's: once
        print(f"{PROG} detect: warning: {ZERO_SHOT_TEXT_CAVEAT}", file=sys.stderr)
    set_warnings = [*(job.references.warnings if job.references else []), ZERO_SHOT_TEXT_CAVEAT]
    for line in image_warnings(records, set_warnings):  # before the table
        print(f"{PROG} detect: warning: {safe_text(line)}", file=sys.stderr)
    hint = unfit_hint(records, options.profile)
    if hint:
        print(f"{PROG} detect: hint: {hint}", file=sys.stderr)
    print(json.dumps(records, indent=2, allow_nan=False) if options.as_json else verdict_table(records))
    return 0


def reference_notes(command: str, references: References) -> None:
    """The reference set's warnings (duplicates, one reference), then the notes on few references and on a profile
    fitted before thresholds kept a false-alarm rate, on stderr."""
    from anomalygpt.verdict import few_references_note

    for warning in references.warnings:
        print(f"{PROG} {command}: warning: {safe_text(warning)}", file=sys.stderr)
    for note in (few_references_note(references.memory.n_references), older_profile_note(references)):
        if note:
            print(f"{PROG} {command}: note: {note}", file=sys.stderr)


def rate_note(calibration: Calibration, sensitivity: float) -> str | None:
    """What a conformal threshold keeps, or that --sensitivity moved it off that rate; None without a stated rate."""
    rate = calibration.false_alarm_rate
    if rate is None:
        return None
    kept = (
        f"the threshold is set so that good parts like the {len(calibration.reference_scores)} held-out references "
        f"score above it at most {rate:.1%} of the time (column p: how often they score as high)"
    )
    if sensitivity == 0:
        return kept
    return f"{kept}; --sensitivity {sensitivity:+g} moved it, so that rate no longer holds"


def older_profile_note(references: References) -> str | None:
    """What a pool's profile from before the conformal threshold lacks (its calibration kept no reference scores)."""
    from anomalygpt.calibration import CalibrationConfig, min_conformal_references

    needed = min_conformal_references(CalibrationConfig().false_alarm_rate)
    if references.calibration.reference_scores or references.memory.n_references < needed:
        return None
    return (
        "this profile was fitted before thresholds kept a false-alarm rate (it holds no held-out reference scores), "
        "so its inspections have no p-value: fit it again for a threshold at a stated rate and p-values"
    )


def unfit_hint(records: Sequence[dict[str, Any]], profile: Path | None) -> str | None:
    """What to do when queries do not fit the references: None when every one fits (or none was compared)."""
    unfit = sum(fit_cell(record.get("reference_fit")) == "NO" for record in records)
    if not unfit:
        return None
    where = f"anomalygpt fit with them added, --out {profile} --overwrite" if profile else "pass them with --ref"
    which = "the image does not" if len(records) == 1 else f"{unfit} of {len(records)} images do not"
    their, they, them = (
        ("its verdict is", "it is a good part", "it")
        if unfit == 1
        else ("their verdicts are", "they are good parts", "them")
    )
    return (
        f"{which} look like the good references (fit: NO), and {their} not dependable: if {they} of another "
        f"design, product or lighting, add good examples like {them} to the references ({where}) and inspect again"
    )


def image_warnings(records: Sequence[dict[str, Any]], set_warnings: Sequence[str]) -> list[str]:
    """Each image's own warnings (a query unlike the references...) as '<file>: <warning>' lines, for the first
    SHOWN_IMAGE_WARNINGS such images, then one line counting the others; the reference set's warnings, printed
    once already, are left out."""
    warned = [(record["source"], [w for w in record["warnings"] if w not in set_warnings]) for record in records]
    warned = [(source, own) for source, own in warned if own]
    lines = [f"{source}: {warning}" for source, own in warned[:SHOWN_IMAGE_WARNINGS] for warning in own]
    if len(warned) > SHOWN_IMAGE_WARNINGS:
        more = len(warned) - SHOWN_IMAGE_WARNINGS
        lines.append(
            f"{more} more {'image carries' if more == 1 else 'images carry'} a warning; each record's "
            "'warnings' says which ('fit: NO' in the table: unlike the good references)"
        )
    return lines


def prepare_detect(options: DetectOptions) -> DetectJob:
    """Validate options, paths, preset and every image (cheapest first), then build the inspector and fit."""
    check_local_engine(options.ray)
    check_sensitivity(options.sensitivity)
    cores = os.cpu_count() or 1
    if options.processes > cores:
        raise UsageError(f"--processes: at most this machine's {cores} cores, got {options.processes}")
    check_out_dir(options.out)
    if options.out is None and (options.overwrite or options.maps != "all"):
        raise UsageError("--overwrite and --maps: only with --out (they say which files it gets)")
    if options.profile is not None and options.refs:
        raise UsageError("--profile and --ref: give the references one way, a profile or image files")
    if options.profile is not None and not options.profile.is_file():
        raise UsageError(f"{options.profile}: --profile file not found")
    reference_paths = reference_files(options.refs)
    queries, skipped = query_files(options.queries)
    stems = output_stems(queries)
    # An earlier run's summary.json in --out: the files may be an interrupted run of this job, told once its
    # references and preset are known (job_key); any other file there is refused now.
    out = options.out
    earlier = out is not None and resumable(options, reference_paths) and (out / f"{SUMMARY_STEM}.json").is_file()
    check_outputs(options.out, stems, [*reference_paths, *queries], options.overwrite or earlier)
    if options.profile is not None:
        job = prepare_profile_detect(options, options.profile, queries, stems, skipped)
        class_name = options.class_name or (job.references.class_name if job.references else None)
        key, resumed = job_key(options, job.preset, class_name, options.profile, [], earlier)
        return dataclasses.replace(job, key=key, resumed=resumed)
    from anomalygpt.config import DEFAULT_PRESET, load_preset  # imports torch: after the instant checks
    from anomalygpt.inspection import build_inspector
    from anomalygpt.mutual import MIN_BATCH

    preset = with_device(load_preset(options.preset or DEFAULT_PRESET), options.device)
    batch = not reference_paths and len(queries) >= MIN_BATCH  # zero-shot from the batch itself
    if not reference_paths and not batch and not preset.decoder.weights:
        raise UsageError(
            f"--ref: no good reference images given, and preset {preset.name!r} has no trained decoder for "
            f"zero-shot inspection; give good images of the same product (--ref FILE_OR_FOLDER) or --profile"
        )
    loaded = [load_source(path) for path in reference_paths]  # each file's sha256 from the bytes decoded
    reference_images = [image for image, _ in loaded]
    query_sizes = image_sizes(queries)
    if reference_images:
        size = check_same_size(reference_paths, [image.shape[:2] for image in reference_images])
        check_query_sizes(queries, query_sizes, size)
    elif batch:
        check_same_size(queries, query_sizes, "images inspected as one batch without references must have one size")
    key, resumed = None, False  # zero-shot: a batch's verdicts depend on the whole batch; not resumable
    if reference_images:
        hashes = [str(sha256) for _, sha256 in loaded]
        key, resumed = job_key(options, preset, options.class_name, None, hashes, earlier)
    inspector = build_inspector(preset)
    if not reference_images and not batch:
        inspector.zero_shot_prior()  # loaded now: a missing weight file fails before any output
    names = [str(path) for path in reference_paths]
    references = inspector.fit(reference_images, options.class_name, names=names) if reference_images else None
    return DetectJob(
        preset,
        inspector,
        references,
        reference_paths,
        queries,
        stems,
        batch=batch,
        skipped=skipped,
        key=key,
        resumed=resumed,
    )


def resumable(options: DetectOptions, reference_paths: Sequence[Path]) -> bool:
    """A job (with --out) whose records an interrupted run may leave for a re-run: against references, and not
    told to start over."""
    return not options.overwrite and bool(options.profile or reference_paths)


def job_key(
    options: DetectOptions,
    preset: Preset,
    class_name: str | None,
    profile: Path | None,
    reference_hashes: Sequence[str],
    earlier: bool,
) -> tuple[dict[str, Any] | None, bool]:
    """A resumable job's key (None without --out), and whether --out's summary.json is an interrupted run of it
    (earlier_run: UsageError when it is another job's); before the models are built, where it can be. The
    references are the profile file's sha256, or one over the reference files' (whatever their names)."""
    if options.out is None:
        return None, False
    from anomalygpt.io import file_sha256

    if profile is not None:
        references = file_sha256(profile)
    else:
        references = hashlib.sha256(" ".join(sorted(reference_hashes)).encode()).hexdigest()
    key = {
        "engine": "local",
        "references_sha256": references,
        "preset": preset.name,
        "class_name": class_name,
        "sensitivity": options.sensitivity,
        "maps": options.maps,
    }
    return key, earlier and earlier_run(options.out, key)


def image_sizes(paths: Sequence[Path]) -> list[tuple[int, int]]:
    """(H, W) of each file, decoded completely and dropped: a corrupt file is refused before any output is
    written. In CHECK_THREADS threads (decoders release the GIL), with a progress bar on a terminal; the first
    bad file in order raises, and the checks not yet started are cancelled."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(CHECK_THREADS)
    try:
        sizes = pool.map(lambda path: load_image(path).shape[:2], paths)
        show = len(paths) >= CHECK_BAR_FROM and sys.stderr.isatty()
        return list(tqdm(sizes, total=len(paths), desc="checking", unit="image", file=sys.stderr, disable=not show))
    finally:
        pool.shutdown(cancel_futures=True)


def query_files(queries: Sequence[str]) -> tuple[list[Path], list[Path]]:
    """The query images, and apart from them the overlays an earlier detect wrote among them (--out may be the
    query folder: a second run would take them for queries); only such overlays is an error."""
    listed = unique_paths(list_images(queries))
    skipped = [path for path in listed if written_overlay(path)]
    if skipped and len(skipped) == len(listed):
        raise UsageError(f"{skipped[0]}: only overlays written by an earlier detect were given; nothing to inspect")
    return [path for path in listed if path not in skipped], skipped


def written_overlay(path: Path) -> bool:
    """<stem>_overlay.png beside the <stem>.json and <stem>_map.npy that detect writes with it."""
    stem = path.name.removesuffix("_overlay.png")
    files = output_files(stem)
    return path.name == files["overlay"] and all(
        (path.parent / files[kind]).is_file() for kind in ("inspection", "anomaly_map")
    )


def prepare_profile_detect(
    options: DetectOptions, profile: Path, queries: list[Path], stems: list[str], skipped: list[Path]
) -> DetectJob:
    """detect --profile: the profile's inspector and references, queries checked against its image size."""
    from anomalygpt.config import load_preset
    from anomalygpt.profile import open_profile

    preset = load_preset(options.preset) if options.preset else None
    inspector, references = open_profile(profile, preset, options.device)
    check_query_sizes(queries, image_sizes(queries), references.memory.image_size)
    names = [Path(name) for name in references.names]
    return DetectJob(inspector.preset, inspector, references, names, queries, stems, profile, skipped=skipped)


def check_sensitivity(value: float) -> None:
    low, high = SENSITIVITY_RANGE
    if not (math.isfinite(value) and low <= value <= high):
        raise UsageError(f"--sensitivity: must be a number from {low:g} to {high:g}, got {value:g}")


def check_out_dir(out: Path | None) -> None:
    """--out must be a folder, or creatable: a folder is made and removed in its nearest existing ancestor.

    A real write, not os.access: that says yes to root everywhere, and to /proc, read-only mounts and full disks.
    """
    if out is None:
        return
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: --out exists and is not a folder")
    existing = next(path for path in (out, *out.parents) if os.path.lexists(path))  # a dangling link counts
    if not existing.is_dir():
        raise UsageError(f"{out}: cannot create the --out folder ({existing} is not a folder)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".anomalygpt-probe-", dir=existing))
    except OSError as error:
        raise UsageError(f"{out}: cannot write the --out folder here ({existing}: {error.strerror})") from error


def check_outputs(out: Path | None, stems: Sequence[str], inputs: Sequence[Path], overwrite: bool) -> None:
    """No output file may replace an input image, nor an existing file unless --overwrite; checked before inference."""
    if out is None or not out.is_dir():
        return
    input_files = {identity for identity in map(file_identity, inputs) if identity is not None}
    names = [name for stem in stems for name in output_files(stem).values()] + [f"{SUMMARY_STEM}.json"]
    for target in (out / name for name in names):
        identity = file_identity(target)
        if identity is None and not target.is_symlink():
            continue
        if target.is_dir():
            raise UsageError(f"{target}: a folder is where this output file goes; choose another --out")
        if identity in input_files:
            raise UsageError(f"{target}: is one of the input images and would be overwritten; choose another --out")
        if not overwrite:
            raise UsageError(f"{target}: already exists; pass --overwrite to replace it, or choose another --out")


def earlier_run(out: Path, key: dict[str, Any]) -> bool:
    """True when --out/summary.json is an earlier run of this job (every value of `key` the same: engine,
    references, preset, class name, sensitivity, maps); UsageError when it is another job's."""
    path = out / f"{SUMMARY_STEM}.json"
    if not path.is_file():
        return False
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        previous = None
    if isinstance(previous, dict):
        previous = {"maps": "all"} | previous  # a job run before --maps wrote every map
    differ = [name for name in key if not isinstance(previous, dict) or previous.get(name) != key[name]]
    if not differ:
        return True
    raise UsageError(
        f"{path}: --out holds the results of another job ({', '.join(differ)} differ); pass --overwrite to replace "
        "them, or choose another --out"
    )


def reusable_record(out: Path, source: str, stem: str, sha256: str, maps: str) -> dict[str, Any] | None:
    """The record of this very file (its source and sha256) that an earlier run of the job completed, with every
    file `maps` asks for; None otherwise."""
    try:
        record = json.loads((out / output_files(stem)["inspection"]).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("source") != source or record.get("source_sha256") != sha256:
        return None
    files = summary_image(record, stem, maps)["files"].values()
    return record if all((out / name).is_file() for name in files) else None


def file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file a path reaches (links followed; one file under two names is one); None if none."""
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_dev, status.st_ino


def lossy_note(queries: Sequence[Path], references: Sequence[Path]) -> str | None:
    """A note when queries are stored lossily (JPEG, lossy WebP) but the references losslessly."""
    if not references or not all(map(stored_losslessly, references)):
        return None
    lossy = [(path, kind) for path in queries if (kind := lossy_encoding(path))]
    if not lossy:
        return None
    path, kind = lossy[0]
    return (
        f"{len(lossy)} of {len(queries)} queries are stored lossily (first: {path}, {kind}) but the references "
        "losslessly; compression artefacts can score as defects: inspect lossless files (PNG, TIFF, lossless WebP) "
        "or references saved the same way"
    )


def stored_losslessly(path: Path) -> bool:
    """A lossless file; for a name whose file is not here (a profile's reference), a lossless-only suffix."""
    if path.is_file():
        return lossy_encoding(path) is None
    return path.suffix.lower() in (".png", ".bmp")


def reference_files(refs: Sequence[str]) -> list[Path]:
    """The good reference files; none means zero-shot, which only a preset with a trained decoder allows."""
    if not refs:
        return []
    paths = unique_paths(list_images(refs))
    if len(paths) > MAX_REFERENCES:
        raise UsageError(f"--ref: {len(paths)} reference images given; at most {MAX_REFERENCES} are supported")
    return paths


def unique_paths(paths: Sequence[Path]) -> list[Path]:
    """Paths in order, each file once (a folder and a file inside it may both have been given)."""
    seen: dict[Path, Path] = {}
    for path in paths:
        seen.setdefault(path.resolve(), path)
    return list(seen.values())


def check_same_size(
    paths: Sequence[Path], sizes: Sequence[tuple[int, ...]], rule: str = "all references must have one size"
) -> tuple[int, ...]:
    """The images' common (H, W); the first image of another size is the error, which states `rule`."""
    for path, size in zip(paths, sizes, strict=True):
        if size != sizes[0]:
            raise UsageError(f"{path}: {size_text(size)} but {paths[0]} is {size_text(sizes[0])}; {rule}")
    return sizes[0]


def check_query_sizes(paths: Sequence[Path], sizes: Sequence[tuple[int, ...]], expected: tuple[int, ...]) -> None:
    for path, size in zip(paths, sizes, strict=True):
        if size != expected:
            raise UsageError(
                f"{path}: {size_text(size)} but the references are {size_text(expected)}; "
                "queries and references must have the same size"
            )


def size_text(size: tuple[int, ...]) -> str:
    """'W x H px' from an (H, W) shape."""
    return f"{size[1]}x{size[0]} px"


def output_stems(paths: Sequence[Path]) -> list[str]:
    """A unique output name per query: its stem, prefixed by its folder's name when stems collide, then numbered.

    Compared case-insensitively, since x.png and X.png are one file on macOS and Windows.
    """
    counts = Counter(path.stem.casefold() for path in paths)
    wanted = [
        path.stem if counts[path.stem.casefold()] == 1 else f"{path.resolve().parent.name}_{path.stem}"
        for path in paths
    ]
    taken = {SUMMARY_STEM}
    stems = []
    for name in wanted:
        stem, number = name, 1
        while stem.casefold() in taken:
            number += 1
            stem = f"{name}-{number}"
        taken.add(stem.casefold())
        stems.append(stem)
    return stems


def inspect_all(job: DetectJob, options: DetectOptions) -> list[dict[str, Any]]:
    """Inspect every query (progress bar on an interactive stderr), writing its outputs as it goes: the models run
    in this thread, each image's files are drawn and written in threads beside them (in order, a few images behind)."""
    reused = reused_records(job, options)
    queries = [path for index, path in enumerate(job.queries) if index not in reused]
    stems = [stem for index, stem in enumerate(job.stems) if index not in reused]
    if options.out is not None and job.key is not None:  # the job's identity first: an interrupted run resumes
        write_json_atomic(options.out / f"{SUMMARY_STEM}.json", summary_of(job, options, []) | job_state(job, False))
    show = len(queries) > 1 and sys.stderr.isatty()
    inspections: Iterator[Inspection]
    if job.batch:
        print(f"{PROG} detect: note: {BATCH_NOTE.format(n=len(queries))}", file=sys.stderr)
        inspections = job.inspector.inspect_batch(
            queries, options.class_name, [str(p) for p in queries], options.sensitivity, progress=show
        )
    elif job.references is not None:  # decoded a batch ahead, one backbone pass per batch (same results)
        from anomalygpt.inspection import BATCH_SIZE

        sources = [str(p) for p in queries]
        size = options.batch_size or BATCH_SIZE
        inspections = job.inspector.inspect_many(
            queries,
            job.references,
            options.class_name,
            sources,
            options.sensitivity,
            size,
            processes=options.processes,
        )
    else:
        inspections = (
            job.inspector.inspect(path, None, options.class_name, str(path), options.sensitivity) for path in queries
        )

    def record(item: tuple[Path, str, Inspection]) -> dict[str, Any]:
        path, stem, inspection = item
        if options.out is None:
            return inspection.to_dict()
        from anomalygpt.verdict import working_image  # imported already by the inspector

        def picture() -> np.ndarray:  # the file decoded again, only when its overlay is drawn: the bytes inspected?
            pixels, sha256 = load_source(path)
            if sha256 != inspection.source_sha256:
                raise ImageError(f"{path}: changed while detect ran (not the bytes inspected); run detect again")
            return working_image(pixels)

        return write_outputs(options.out, stem, picture, inspection, maps=options.maps)

    items = zip(queries, stems, inspections, strict=True)
    done = ordered_map(record, items, WRITE_THREADS)
    bar = tqdm(done, total=len(queries), desc="inspecting", unit="image", file=sys.stderr, disable=not show)
    fresh = iter(bar)
    records = [reused[index] if index in reused else next(fresh) for index in range(len(job.queries))]
    if options.out is not None:
        write_json_atomic(options.out / f"{SUMMARY_STEM}.json", summary(job, options, records))
    return records


def output_files(stem: str) -> dict[str, str]:
    return {"inspection": f"{stem}.json", "overlay": f"{stem}_overlay.png", "anomaly_map": f"{stem}_map.npy"}


def write_outputs(
    out: Path,
    stem: str,
    image: Callable[[], np.ndarray],
    inspection: Inspection,
    maps: str = "all",
) -> dict[str, Any]:
    """<stem>_map.npy, <stem>_overlay.png (when `maps` keeps them: written_files), then <stem>.json (the record, the
    inspection's to_dict), each written atomically: a record on disk means the image's files are complete. An image
    whose map is not kept loses any map and overlay an earlier run left under its name (--overwrite). `image` gives
    the picture the overlay is drawn on, called only when one is. Returns the record."""
    from anomalygpt.visualize import save_overlay

    files = output_files(stem)
    record = inspection.to_dict()
    if inspection.anomaly_map is not None and "anomaly_map" in written_files(record, stem, maps):
        picture = image()  # before any file: a picture that cannot be had leaves none of this image's files
        write_npy_atomic(out / files["anomaly_map"], inspection.anomaly_map)
        save_overlay(out / files["overlay"], picture, inspection)
    else:
        for kind in ("anomaly_map", "overlay"):
            (out / files[kind]).unlink(missing_ok=True)
    write_json_atomic(out / files["inspection"], record)
    return record


def written_files(record: dict[str, Any], stem: str, maps: str) -> dict[str, str]:
    """The files detect writes for a record under --maps: its record, and its map and overlay unless `maps` leaves
    them out (none; flagged, for an image neither anomalous nor unlike its references)."""
    flagged = record["verdict"] == "anomalous" or (record.get("reference_fit") or {}).get("fits") is False
    files = output_files(stem)
    return files if maps == "all" or (maps == "flagged" and flagged) else {"inspection": files["inspection"]}


def reused_records(job: DetectJob, options: DetectOptions) -> dict[int, dict[str, Any]]:
    """Query index -> the record an interrupted run of this job completed for that very file (resumed jobs)."""
    if not job.resumed or options.out is None:
        return {}
    from anomalygpt.io import file_sha256

    out, found = options.out, {}
    for index, (path, stem) in enumerate(zip(job.queries, job.stems, strict=True)):
        record = reusable_record(out, str(path), stem, file_sha256(path), options.maps)
        if record is not None:
            found[index] = record
    print(
        f"{PROG} detect: note: {safe_text(out / f'{SUMMARY_STEM}.json')} is this job's, interrupted: {len(found)} of "
        f"{len(job.queries)} images are reused from it, the others inspected",
        file=sys.stderr,
    )
    return found


def summary(job: DetectJob, options: DetectOptions, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    images = [summary_image(record, stem, options.maps) for record, stem in zip(records, job.stems, strict=True)]
    return summary_of(job, options, images) | job_state(job, True)


def job_state(job: DetectJob, complete: bool) -> dict[str, Any]:
    """What summary.json keeps of a resumable job: its key, and whether every image has its record."""
    return {} if job.key is None else job.key | {"complete": complete}


def summary_image(record: dict[str, Any], stem: str, maps: str = "all") -> dict[str, Any]:
    """One image's entry in summary.json."""
    return {key: record[key] for key in ("source", "verdict", "score", "threshold", "margin")} | {
        "n_regions": len(record["regions"]),
        "fits": (record.get("reference_fit") or {}).get("fits"),  # False: unlike the references (None: not compared)
        "files": written_files(record, stem, maps),
    }


def summary_of(job: DetectJob, options: DetectOptions, images: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {
        "preset": job.preset.name,
        "class_name": options.class_name or (job.references.class_name if job.references else None),
        "sensitivity": options.sensitivity,
        "maps": options.maps,
        "profile": None if job.profile is None else str(job.profile),
        "references": list(job.references.names) if job.references else [],
        "reference_warnings": list(job.references.warnings) if job.references else [],
        "n_images": len(images),
        "n_anomalous": sum(image["verdict"] == "anomalous" for image in images),
        "n_unfit": unfit_count(images),
        "images": list(images),
    }


def unfit_count(images: Sequence[dict[str, Any]]) -> int:
    """summary.json entries whose verdict was given against references they do not look like (an earlier run's
    entries, without "fits", count as fitting)."""
    return sum(image.get("fits") is False for image in images)


def verdict_table(records: Sequence[dict[str, Any]]) -> str:
    """Aligned text table, one row per inspection; numbers right-aligned."""
    columns = P_TABLE_COLUMNS if any(record.get("p_value") is not None for record in records) else TABLE_COLUMNS
    rows = [columns] + [table_row(record, columns) for record in records]
    widths = [max(len(row[column]) for row in rows) for column in range(len(columns))]
    numeric = {"score", "threshold", "margin", "p", "regions"}
    lines = [
        "  ".join(
            cell.rjust(width) if name in numeric else cell.ljust(width)
            for cell, width, name in zip(row, widths, columns, strict=True)
        ).rstrip()
        for row in rows
    ]
    return "\n".join(lines)


def table_row(record: dict[str, Any], columns: Sequence[str] = TABLE_COLUMNS) -> tuple[str, ...]:
    from anomalygpt.regions import where_words  # the overlay's label words: 'top to center', not just 'center'

    places = [where_words(region["location"], region.get("span", ())) for region in record["regions"]]
    p_value = record.get("p_value")
    cells = {
        "file": safe_text(record["source"]),
        "verdict": record["verdict"],
        "score": f"{record['score']:.4f}",
        "threshold": f"{record['threshold']:.4f}",
        "margin": f"{record['margin']:+.1f}",
        "p": "-" if p_value is None else f"{p_value:.3f}",
        "regions": str(len(record["regions"])),
        "locations": places_cell(places),
        "fit": fit_cell(record.get("reference_fit")),
    }
    return tuple(cells[name] for name in columns)


def places_cell(places: Sequence[str]) -> str:
    """The first SHOWN_PLACES regions' places and how many more: a row stays within a terminal's width."""
    more = len(places) - SHOWN_PLACES
    return ", ".join(places[:SHOWN_PLACES]) + (f" +{more} more" if more > 0 else "") or "-"


def fit_cell(fit: dict[str, Any] | None) -> str:
    """The table's reference-fit cell: 'yes', 'NO' (the query looks unlike every reference), or '-' (not compared)."""
    if fit is None or fit.get("fits") is None:
        return "-"
    return "yes" if fit["fits"] else "NO"


def run_fit(options: FitOptions) -> int:
    """`anomalygpt fit`: index good images into a product profile, written atomically."""
    try:
        goods = unique_paths(list_images(options.goods))
        if len(goods) > MAX_REFERENCES:
            raise UsageError(f"GOOD: {len(goods)} images given; at most {MAX_REFERENCES:,} are supported")
        if options.out.exists() and not options.overwrite:
            raise UsageError(f"{options.out}: already exists; pass --overwrite to replace it")
        if options.out.is_dir():
            raise UsageError(f"{options.out}: is a folder; --out is the profile file to write")
        check_out_dir(options.out.parent)
        from anomalygpt.config import DEFAULT_PRESET, load_preset, with_false_alarm_rate  # imports torch: late
        from anomalygpt.inspection import build_inspector

        preset = with_false_alarm_rate(load_preset(options.preset or DEFAULT_PRESET), options.false_alarm_rate)
        inspector = build_inspector(with_device(preset, options.device))
        references = inspector.fit(goods, options.class_name, progress=True)
    except (ValueError, OSError) as error:
        return fail("fit", error)
    try:
        inspector.save_profile(references, options.out, goods)
    except OSError as error:
        return fail("fit", error, code=1)
    reference_notes("fit", references)
    from anomalygpt.calibration import min_conformal_references

    rate = options.false_alarm_rate
    held_out = len(references.calibration.reference_scores)
    if rate is not None and references.calibration.false_alarm_rate is None and held_out:
        print(
            f"{PROG} fit: note: --false-alarm-rate {rate:g} needs {min_conformal_references(rate)} held-out "
            f"references and this fit has {held_out}: its threshold is mean + {inspector.preset.calibration.z:g} "
            "spreads of their scores instead",
            file=sys.stderr,
        )
    print(fit_summary(options.out, references, len(goods)))
    return 0


def fit_summary(path: Path, references: References, n_given: int) -> str:
    calibration = references.calibration
    mode = "pool: each query against its nearest references" if references.memory.retrieval else "few-shot"
    lines = [
        f"profile: {safe_text(path)}",
        f"references: {references.memory.n_references} of {n_given} given ({mode})",
        f"image size: {references.memory.image_size[1]}x{references.memory.image_size[0]} px",
        f"augmentation: {'on' if references.augmentation.augment else 'off'} ({references.augmentation.reason})",
        f"threshold: {calibration.image_threshold:.4f} ({calibration.method})",
        f"indexed in {references.index_ms / 1000:.1f} s",
    ]
    return "\n".join(lines)
