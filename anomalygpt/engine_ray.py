"""`--engine ray`: the same inspection as Ray Data `map_batches` over a Ray cluster, for archive-scale jobs.

A class-based UDF makes the actors: each loads the profile's inspector and references once and inspects batches
of paths with `Inspector.inspect_many`, writing every image's files with the CLI's own `write_outputs`, so the
records are the single-process path's. The record (`<stem>.json`, written last and atomically) carries the
file's sha256: a re-run of the same job (same profile file, preset, class name and sensitivity, as kept in
summary.json from the start) reuses every record whose source and sha256 match, and inspects the rest. Actors
read the images and write --out themselves: on a cluster, both must be on storage every node mounts at the same
path, and every node needs the package and its weights. A file that cannot be inspected (corrupt, another size)
fails alone; the others are written, and the summary lists the failures.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from anomalygpt.cli import (
    PROG,
    SUMMARY_STEM,
    DetectJob,
    DetectOptions,
    RaySettings,
    UsageError,
    check_out_dir,
    check_outputs,
    check_sensitivity,
    earlier_run,
    fail,
    output_stems,
    reference_notes,
    reusable_record,
    summary_image,
    summary_of,
    unfit_count,
    unique_paths,
    write_outputs,
)
from anomalygpt.io import ImageError, list_images, load_image, ordered_map, safe_text, write_json_atomic

if TYPE_CHECKING:
    from anomalygpt.inspection import Inspection, Inspector, References
    from eval.runner import Encoder, PatchCache

ENGINE = "ray"
SHOWN_FAILURES = 10  # failed images named on stderr; summary.json lists them all
PROBE_SECONDS = 5.0  # a cluster's address must accept a connection this fast
INSTALL_HINT = "install it with: pip install 'anomalygpt[ray]'"


@dataclass(frozen=True)
class ActorJob:
    """What every actor needs; plain values, shipped to the actors by Ray."""

    profile: str  # absolute path of the profile file
    preset: dict[str, Any]  # the driver's (the profile's own, or --preset's) as plain JSON, on device "auto"
    class_name: str | None
    sensitivity: float
    out: str  # absolute path of --out
    reuse: bool  # False with --overwrite: every image is inspected again
    cpus: float  # per actor: torch's thread count
    batch_size: int  # images per backbone pass, as --batch-size in the local path
    maps: str  # --maps: whose map and overlay are written


@dataclass(frozen=True)
class Outcome:
    index: int  # the image's position in the job
    status: str  # "inspected", "reused" or "failed"
    detail: str  # JSON of its summary.json entry, or the error (failed)


class InspectActor:
    """A Ray Data callable class: the models and the profile loaded once per actor, batches of rows inspected."""

    def __init__(self, job: ActorJob) -> None:
        import torch

        from anomalygpt.config import Preset, from_dict
        from anomalygpt.profile import open_profile

        torch.set_num_threads(max(1, int(job.cpus)))
        self.job = job
        self.out = Path(job.out)
        preset = from_dict(Preset, job.preset, where="detect --engine ray: preset")
        self.inspector, self.references = open_profile(job.profile, preset)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        rows = [Row(*fields) for fields in json.loads(str(batch["rows"][0]))]  # one chunk: the local path's batch
        outcomes = inspect_rows(self.inspector, self.references, self.job, self.out, rows)
        return {
            "index": [outcome.index for outcome in outcomes],
            "status": [outcome.status for outcome in outcomes],
            "detail": [outcome.detail for outcome in outcomes],
        }


@dataclass(frozen=True)
class Row:
    index: int
    path: str  # absolute: actors may run in another folder or on another machine
    source: str  # the path as typed, what the record's "source" says
    stem: str


@dataclass(frozen=True)
class Ready:
    """A row to inspect: its file decoded and of the references' size."""

    row: Row
    image: np.ndarray  # (H, W, 3) uint8 as decoded
    sha256: str  # of the file's bytes, the ones decoded


def inspect_rows(
    inspector: Inspector, references: References, job: ActorJob, out: Path, rows: Sequence[Row]
) -> list[Outcome]:
    """Reuse the rows whose complete record matches the file, inspect the others in one batch, write their files."""
    from anomalygpt.verdict import working_image

    triaged = [triage(row, references, out, job) for row in rows]
    outcomes = [item for item in triaged if isinstance(item, Outcome)]
    ready = [item for item in triaged if isinstance(item, Ready)]
    sources = [item.row.source for item in ready]
    images = [item.image for item in ready]
    size = job.batch_size
    inspections = inspector.inspect_many(images, references, job.class_name, sources, job.sensitivity, size)

    def written(pair: tuple[Ready, Inspection]) -> Outcome:
        item, inspection = pair
        inspection.source_sha256 = item.sha256  # inspected as decoded pixels: the bytes triage read and hashed
        picture = functools.partial(working_image, item.image)
        record = write_outputs(out, item.row.stem, picture, inspection, job.maps)
        return Outcome(item.row.index, "inspected", json.dumps(summary_image(record, item.row.stem, job.maps)))

    # The files are drawn and written in the actor's threads while its models go on (as in the local detect).
    outcomes += ordered_map(written, zip(ready, inspections, strict=True), max(1, int(job.cpus)))
    return outcomes


def triage(row: Row, references: References, out: Path, job: ActorJob) -> Outcome | Ready:
    """A reused or failed row's outcome, or the row ready to inspect."""
    from anomalygpt.inspection import check_query_size
    from anomalygpt.verdict import working_image

    try:
        data = Path(row.path).read_bytes()
    except OSError as error:
        return Outcome(row.index, "failed", f"{row.source}: cannot read ({error.strerror})")
    sha256 = hashlib.sha256(data).hexdigest()
    record = reusable_record(out, row.source, row.stem, sha256, job.maps) if job.reuse else None
    if record is not None:
        return Outcome(row.index, "reused", json.dumps(summary_image(record, row.stem, job.maps)))
    try:
        image = load_image(data, name=row.source)  # (H, W, 3) uint8
        check_query_size(working_image(image), references, row.source)
    except ValueError as error:  # ImageError, InspectionError
        return Outcome(row.index, "failed", str(error))
    return Ready(row, image, sha256)


@dataclass
class RayDetect:
    """The checked job: what the driver needs to run it and to write summary.json."""

    job: DetectJob
    actor_job: ActorJob
    key: dict[str, Any]  # the job's identity: engine, profile_sha256, preset, class name, sensitivity, maps
    resumed: bool  # --out holds an earlier run of this job: its complete records are reused


def run_detect(options: DetectOptions) -> int:
    """`anomalygpt detect --engine ray`: check everything, connect, inspect on the actors, write summary.json."""
    try:
        plan = prepare(options)
        started = connect(options.ray.address)
    except (ValueError, OSError) as error:
        return fail("detect", error)
    if plan.job.references:  # always, from the profile
        reference_notes("detect", plan.job.references)  # as the single-process run prints them
    path = Path(plan.actor_job.out) / f"{SUMMARY_STEM}.json"
    if plan.resumed:
        print(f"{PROG} detect: note: {safe_text(path)} is this job's: complete records are reused", file=sys.stderr)
    try:
        write_json_atomic(path, job_summary(plan, options, [], []))  # the job's key, before any record
        outcomes = run_actors(plan, options.ray)
        images, failed = split_outcomes(plan.job.queries, outcomes)
        write_json_atomic(path, job_summary(plan, options, images, failed))
    except (ImageError, OSError) as error:
        return fail("detect", error, code=1)
    except ray_module().exceptions.RayError as error:  # an actor that cannot start or crashed past its retries
        return fail("detect", f"ray: {actor_error(error)}; the records written are kept: run it again to resume", 1)
    except KeyboardInterrupt:
        return fail("detect", "interrupted; the records written are kept: run the same command to resume", 130)
    finally:
        if started:
            shutdown()
    return report(outcomes, images, failed, path)


def prepare(options: DetectOptions) -> RayDetect:
    """Every check the driver can make before Ray starts: options, inputs, the profile, --out and its resumability."""
    ray_module()
    if options.profile is None or options.refs:
        raise UsageError("--engine ray: needs --profile (fit one with 'anomalygpt fit') and no --ref")
    if options.out is None:
        raise UsageError("--engine ray: needs --out, the folder the actors write the records to")
    if options.as_json:
        raise UsageError("--json: not with --engine ray; the records are written to --out")
    if options.device is not None:
        raise UsageError(
            "--device: not with --engine ray; each actor runs on the GPU Ray gives it (--ray-gpus), else its CPUs"
        )
    if options.processes:
        raise UsageError("--processes: not with --engine ray; the actors are the processes (--ray-actors)")
    check_ray_settings(options.ray)
    check_sensitivity(options.sensitivity)
    check_out_dir(options.out)
    if not options.profile.is_file():
        raise UsageError(f"{options.profile}: --profile file not found")
    queries = unique_paths(list_images(options.queries))
    stems = output_stems(queries)
    from anomalygpt.config import load_preset  # imports torch: after the instant checks
    from anomalygpt.inspection import BATCH_SIZE
    from anomalygpt.io import file_sha256
    from anomalygpt.profile import open_profile, plain_preset

    inspector, references = open_profile(options.profile, load_preset(options.preset) if options.preset else None)
    key = {
        "engine": ENGINE,
        "profile_sha256": file_sha256(options.profile),
        "preset": inspector.preset.name,
        "class_name": options.class_name or references.class_name,  # as the single-process summary says
        "sensitivity": options.sensitivity,
        "maps": options.maps,
    }
    resumed = not options.overwrite and earlier_run(options.out, key)
    check_outputs(options.out, stems, queries, options.overwrite or resumed)
    job = DetectJob(inspector.preset, inspector, references, [], queries, stems, options.profile)
    actor_job = ActorJob(
        str(options.profile.resolve()),
        plain_preset(inspector.preset) | {"device": "auto"},
        options.class_name,
        options.sensitivity,
        str(options.out.resolve()),
        not options.overwrite,
        options.ray.cpus,
        options.batch_size or BATCH_SIZE,
        options.maps,
    )
    return RayDetect(job, actor_job, key, resumed)


def check_ray_settings(settings: RaySettings) -> None:
    if settings.actors is not None and settings.actors < 1:
        raise UsageError(f"--ray-actors: must be at least 1, got {settings.actors}")
    if not (math.isfinite(settings.cpus) and settings.cpus > 0):
        raise UsageError(f"--ray-cpus: must be a number above 0, got {settings.cpus:g}")
    if settings.gpus is not None and not (math.isfinite(settings.gpus) and settings.gpus >= 0):
        raise UsageError(f"--ray-gpus: must be a number from 0 up, got {settings.gpus:g}")


def ray_module() -> Any:
    """The ray package, imported now; UsageError when it is not installed."""
    try:
        import ray
        import ray.data
    except ImportError as error:
        raise UsageError(
            f"--engine ray: needs the Python package ray, which is not installed; {INSTALL_HINT}"
        ) from error
    return ray


def connect(address: str | None) -> bool:
    """Join the cluster at address (None: start a local instance); True when this call started Ray. A process
    already connected (a test, a notebook) keeps its connection when no address is given."""
    ray = ray_module()
    started = not (address is None and ray.is_initialized())
    if started:
        probe(address)
        try:
            ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, logging_level="warning")
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as error:
            where = address or "a new local instance"
            raise UsageError(
                f"--ray-address: cannot reach a Ray cluster at {where} ({one_line_error(error)})"
            ) from error
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours counts images; Ray's count blocks per operator
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # a failed block: our one line says why
    return started


def probe(address: str | None) -> None:
    """UsageError at once when a HOST:PORT address refuses connections or does not resolve; Ray itself retries
    such an address for 30 s or more before it gives up."""
    if address is None or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--ray-address: {address!r} is not auto, local, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_SECONDS).close()
    except OSError as error:
        problem = error.strerror or type(error).__name__
        raise UsageError(f"--ray-address: cannot reach a Ray cluster at {address} ({problem})") from error


def shutdown() -> None:
    ray_module().shutdown()


def one_line_error(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


def actor_shape(settings: RaySettings) -> tuple[int, float, float]:
    """(actors, CPUs and GPUs per actor): by default one actor per GPU of the cluster, else one per CPU slot."""
    resources = ray_module().cluster_resources()
    n_gpus, n_cpus = float(resources.get("GPU", 0.0)), float(resources.get("CPU", 1.0))
    gpus = settings.gpus if settings.gpus is not None else (1.0 if n_gpus >= 1 else 0.0)
    slots = n_gpus / gpus if gpus > 0 else n_cpus / settings.cpus
    actors = settings.actors if settings.actors is not None else max(1, int(slots))
    return actors, settings.cpus, gpus


def run_actors(plan: RayDetect, settings: RaySettings) -> list[Outcome]:
    """Every query through the actor pool, in the local path's batches (one Ray row each: same batches, same
    numbers); a progress bar on an interactive stderr counts images."""
    ray = ray_module()
    rows = [
        (i, str(path.resolve()), str(path), stem)
        for i, (path, stem) in enumerate(zip(plan.job.queries, plan.job.stems, strict=True))
    ]
    size = plan.actor_job.batch_size
    chunks = [{"rows": json.dumps(rows[first : first + size])} for first in range(0, len(rows), size)]
    actors, cpus, gpus = actor_shape(settings)
    actors = min(actors, len(chunks))
    dataset = ray.data.from_items(chunks, override_num_blocks=len(chunks))
    results = dataset.map_batches(
        InspectActor,
        fn_constructor_kwargs={"job": plan.actor_job},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus,
        num_gpus=gpus,
    )
    outcomes = []
    desc, show = f"inspecting on {actors} ray actors", sys.stderr.isatty()  # as the local path: a terminal only
    with tqdm(total=len(rows), desc=desc, unit="image", file=sys.stderr, disable=not show) as bar:
        for batch in results.iter_batches(batch_size=None, batch_format="numpy"):
            outcomes += [
                Outcome(int(i), str(s), str(d))
                for i, s, d in zip(batch["index"], batch["status"], batch["detail"], strict=True)
            ]
            bar.update(len(batch["index"]))
    return sorted(outcomes, key=lambda outcome: outcome.index)


def split_outcomes(
    queries: Sequence[Path], outcomes: Sequence[Outcome]
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """summary.json's entries of the images with a record, in query order, and the failures."""
    images = [json.loads(o.detail) for o in outcomes if o.status != "failed"]
    failed = [{"source": str(queries[o.index]), "error": o.detail} for o in outcomes if o.status == "failed"]
    return images, failed


def job_summary(
    plan: RayDetect, options: DetectOptions, images: Sequence[dict[str, Any]], failed: Sequence[dict[str, str]]
) -> dict[str, Any]:
    """The CLI's summary plus the job's key, the failures and whether every image has its record."""
    complete = len(images) == len(plan.job.queries)
    return summary_of(plan.job, options, images) | plan.key | {"complete": complete, "failed": list(failed)}


def report(
    outcomes: Sequence[Outcome], images: Sequence[dict[str, Any]], failed: Sequence[dict[str, str]], path: Path
) -> int:
    """One line on stdout; each failure (the first SHOWN_FAILURES) on stderr; exit code 1 when any image failed."""
    for failure in failed[:SHOWN_FAILURES]:
        print(f"{PROG} detect: error: {safe_text(failure['error'])}", file=sys.stderr)
    if len(failed) > SHOWN_FAILURES:
        print(f"{PROG} detect: error: {len(failed) - SHOWN_FAILURES} more images failed", file=sys.stderr)
    counts = {status: sum(o.status == status for o in outcomes) for status in ("inspected", "reused", "failed")}
    n_anomalous = sum(image["verdict"] == "anomalous" for image in images)
    n_unfit = unfit_count(images)
    unfit = f"; {n_unfit} unlike the good references (fit: NO, their verdicts not dependable)" if n_unfit else ""
    print(
        f"{len(outcomes)} images: {counts['inspected']} inspected, {counts['reused']} reused from an earlier run, "
        f"{counts['failed']} failed; {n_anomalous} anomalous{unfit}; summary: {safe_text(path)}"
    )
    return 1 if failed else 0


@dataclass(frozen=True)
class EncodeJob:
    """What every actor of `eval --engine ray` needs: the run's preset as plain JSON and what the memory sees."""

    preset: dict[str, Any]  # device "auto": the actor's Ray resources decide (CUDA_VISIBLE_DEVICES)
    few_shot: bool  # False: raw images for the zero-shot decoder
    cpus: float  # per actor: torch's thread count


class EncodeActor:
    """A Ray Data callable class for eval: the backbone loaded once per actor, one chunk of paths per call, encoded
    exactly as eval.runner.encode_category encodes it (same chunks, same function)."""

    def __init__(self, job: EncodeJob) -> None:
        import torch

        from anomalygpt.config import Preset, from_dict
        from anomalygpt.inspection import build_inspector

        torch.set_num_threads(max(1, int(job.cpus)))
        self.inspector = build_inspector(from_dict(Preset, job.preset, where="eval --engine ray: preset"))
        self.few_shot = job.few_shot

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from eval.runner import checked_size, encode_images

        first, paths = int(batch["first"][0]), [Path(p) for p in json.loads(str(batch["paths"][0]))]
        images = [load_image(path) for path in paths]
        size = None
        for image, path in zip(images, paths, strict=True):
            size = checked_size(image.shape, path, size)
        patches = encode_images(self.inspector, images, self.few_shot)  # per stage (B, C, h, w) float16
        heights, widths = zip(*(image.shape[:2] for image in images), strict=True)
        columns = {
            "index": np.arange(first, first + len(paths)),
            "height": np.array(heights),
            "width": np.array(widths),
        }
        return columns | {f"stage{s}": part.numpy() for s, part in enumerate(patches)}


def ray_encoder(settings: RaySettings) -> Encoder:
    """eval.runner's category encoder, run on the cluster's actors (connect() first)."""
    return functools.partial(encode_on_ray, settings)


def encode_on_ray(
    settings: RaySettings, inspector: Inspector, paths: Sequence[Path], desc: str, few_shot: bool
) -> PatchCache:
    """encode_category's PatchCache, its chunks of ENCODE_BATCH images encoded by the actors."""
    import torch

    from anomalygpt.profile import plain_preset
    from eval.runner import ENCODE_BATCH, EvalError, PatchCache, checked_size

    ray = ray_module()
    start = time.perf_counter()
    chunks = [
        {"first": first, "paths": json.dumps([str(p.resolve()) for p in paths[first : first + ENCODE_BATCH]])}
        for first in range(0, len(paths), ENCODE_BATCH)
    ]
    actors, cpus, gpus = actor_shape(settings)
    job = EncodeJob(plain_preset(inspector.preset) | {"device": "auto"}, few_shot, cpus)
    encoded = ray.data.from_items(chunks, override_num_blocks=len(chunks)).map_batches(
        EncodeActor,
        fn_constructor_kwargs={"job": job},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=min(actors, len(chunks))),
        num_cpus=cpus,
        num_gpus=gpus,
    )
    stages: list[torch.Tensor] = []
    sizes = np.zeros((len(paths), 2), dtype=np.int64)
    try:
        with tqdm(total=len(paths), desc=desc, unit="image", leave=False, disable=None) as bar:
            for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
                n_stages = sum(name.startswith("stage") for name in batch)
                parts = [torch.tensor(batch[f"stage{s}"]) for s in range(n_stages)]  # copied: Ray's are read-only
                if not stages:
                    stages = [torch.empty((len(paths), *p.shape[1:]), dtype=torch.float16) for p in parts]
                rows = torch.tensor(batch["index"])
                for stage, part in zip(stages, parts, strict=True):
                    stage[rows] = part
                sizes[batch["index"]] = np.stack([batch["height"], batch["width"]], axis=1)
                bar.update(len(rows))
    except ray.exceptions.RayError as error:  # an image that does not decode, of another size; an actor crash
        raise EvalError(refused_image(paths) or f"ray: {actor_error(error)}") from error
    size = None
    for path, shape in zip(paths, sizes, strict=True):
        size = checked_size(tuple(shape), path, size)
    assert size is not None, "encode_on_ray needs at least one image"
    elapsed_ms = (time.perf_counter() - start) * 1000
    return PatchCache({path: i for i, path in enumerate(paths)}, stages, size, elapsed_ms / len(paths))


def refused_image(paths: Sequence[Path]) -> str | None:
    """The one-line error of the first image a local run would refuse, when that is why the actors failed (Ray Data
    hands the driver a generic UserCodeException, the image's message only in a traceback's text)."""
    from eval.runner import checked_size

    size = None
    try:
        for path in paths:
            size = checked_size(load_image(path).shape, path, size)
    except ValueError as error:
        return str(error)
    return None


def actor_error(error: BaseException) -> str:
    """The message of the exception an actor raised, without Ray's traceback around it."""
    cause = error.cause if isinstance(error, ray_module().exceptions.RayTaskError) else error
    return one_line_error(cause if cause is not None else error)
