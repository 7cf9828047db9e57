"""Benchmark reports: mean and spread over seeds, results.json, results.md and PNG plots.

Plots use matplotlib's object API (`Figure` + the Agg canvas), never pyplot, so no figure is registered
in global state or survives its function.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from anomalygpt.io import write_json_atomic, write_png_atomic, write_text_atomic
from anomalygpt.visualize import enlargement, overlay
from eval.runner import INSPECTOR, EvalRun, ExamplePanel, SettingResult, safe_name

SUMMARISED = (
    "auroc",
    "aupr",
    "f1_max",
    "pixel_auroc",
    "aupro",
    "pixel_f1_max",
    "accuracy",
    "false_alarm_rate",
    "recall",
    "held_out_flagged",
    "threshold",
    "encode_ms_per_image",
    "score_ms_per_image",
    "ms_per_image",
    "index_ms",
    "fit_seconds",
    "peak_rss_mb",
)
# (column title, metric, digits) of results.md; the held-out column appears only when a dataset has one
TABLE = (
    ("I-AUROC", "auroc", 3),
    ("I-AUPR", "aupr", 3),
    ("I-F1-max", "f1_max", 3),
    ("P-AUROC", "pixel_auroc", 3),
    ("AUPRO", "aupro", 3),
    ("false alarms", "false_alarm_rate", 3),
    ("recall", "recall", 3),
    ("ms/image", "ms_per_image", 0),
)
HELD_OUT_COLUMN = ("uncertain flagged", "held_out_flagged", 3)
FIT_COLUMN = ("training s", "fit_seconds", 1)  # runs with baselines: fit time, backbone included
PACKAGES = ("anomalygpt", "torch", "numpy", "scikit-learn", "scipy", "matplotlib")
DPI = 100
MEAN_ROW = "mean"


def spread(values: Sequence[float | int | None]) -> dict[str, float | int] | None:
    """Mean, sample std (0 for one value) and count; None when any value is missing."""
    if not values or any(v is None for v in values):
        return None
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "n": int(array.size)}


def summary(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per metric, mean and std over seeds."""
    return {key: spread([metrics.get(key) for metrics in per_seed.values()]) for key in SUMMARISED}


def shot_block(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    return {"seeds": {str(seed): metrics for seed, metrics in per_seed.items()}, "summary": summary(per_seed)}


Table = dict[str, dict[str, dict[int, dict[str, Any]]]]


def row_order(result: SettingResult) -> tuple[bool, int]:
    """Inspector rows first, by k; then the baselines in the order they were asked for (stable sort)."""
    return (result.method != INSPECTOR, result.k if result.method == INSPECTOR else 0)


def row_name(label: str) -> str:
    """'k=4' -> '4'; a baseline's label is its name."""
    return label.removeprefix("k=")


def by_category(results: Sequence[SettingResult]) -> Table:
    """results as {category: {row label ('k=4', 'patchcore'): {seed: metrics}}}, rows in row_order."""
    table: Table = {}
    for result in sorted(results, key=row_order):
        table.setdefault(result.category, {}).setdefault(result.label, {})[result.seed] = result.metrics
    return table


def category_mean(table: Table, label: str, seed: int) -> dict[str, Any]:
    """Each metric averaged over categories for one (row, seed); None where any category lacks it."""
    rows = [per_row[label][seed] for per_row in table.values()]
    means = {key: spread([row.get(key) for row in rows]) for key in SUMMARISED}
    return {key: None if value is None else value["mean"] for key, value in means.items()}


def summaries(results: Sequence[SettingResult]) -> dict[str, Any]:
    """Per category and over categories: per-seed figures and their mean/std over seeds, keyed 'k=<k>'.

    The mean row averages the categories within each seed first, so its std is the spread between seeds.
    """
    table = by_category(results)
    labels = list(dict.fromkeys(result.label for result in sorted(results, key=row_order)))
    seeds = sorted({result.seed for result in results})
    categories = {
        category: {label: shot_block(per_row[label]) for label in per_row} for category, per_row in table.items()
    }
    mean = {label: shot_block({seed: category_mean(table, label, seed) for seed in seeds}) for label in labels}
    return {"categories": categories, MEAN_ROW: mean}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def results_document(config: dict[str, Any], run: EvalRun, examples: dict[str, list[ExamplePanel]]) -> dict[str, Any]:
    """Everything results.json holds: configuration, environment, every figure and the example picks."""
    return {
        "config": config,
        "versions": package_versions(),
        "machine": machine(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": run.seconds,
        "settings_computed": len(run.computed),
        "settings_reused": len(run.reused),
        **summaries(run.results),
        "examples": {
            category: [
                {key: getattr(p, key) for key in ("caption", "path", "label", "defect", "score", "threshold")}
                for p in panels
            ]
            for category, panels in examples.items()
        },
    }


def cell(stats: dict[str, Any] | None, digits: int) -> str:
    """'mean ± std', or an em dash where the figure does not exist (no masks, no held-out set)."""
    if stats is None:
        return "—"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def table_columns(document: dict[str, Any]) -> list[tuple[str, str, int]]:
    columns = list(TABLE)
    if any(block["summary"]["held_out_flagged"] for block in document[MEAN_ROW].values()):
        columns.append(HELD_OUT_COLUMN)
    if any(block["summary"]["fit_seconds"] for block in document[MEAN_ROW].values()):
        columns.append(FIT_COLUMN)
    return columns


def protocol_text(args: dict[str, Any]) -> str:
    """How the numbers were made, in the words of the run's protocol."""
    common = "Mean ± std over seeds. Full images, no normalisation over the test set."
    if list(args.get("methods", [INSPECTOR])) == [INSPECTOR]:  # results.json of older runs has no "methods"
        return (
            f"{common} References drawn per seed from good images only, thresholds from the references only. "
            "Verdicts at the automatic threshold. ms/image = decode + backbone (batched) + map + score."
        )
    return (
        f"{common} Per seed, {args['test_fraction']:.0%} of the good images are held out for testing where the "
        "dataset has no separate good test images; every baseline trains on all the other good images and sets "
        "its own threshold from them; the Inspector (rows by k) draws its k references from the same training "
        "images. Same test images for every method. Training s and ms/image include the backbone's cost for every "
        "image a method encodes, although the run encodes each image once."
    )


def table_rows(document: dict[str, Any], columns: Sequence[tuple[str, str, int]]) -> list[str]:
    rows = []
    named = [*document["categories"].items(), (f"**{MEAN_ROW}**", document[MEAN_ROW])]
    for name, shots in named:
        for shot, block in shots.items():
            cells = [cell(block["summary"][metric], digits) for _, metric, digits in columns]
            rows.append(f"| {name} | {row_name(shot)} | " + " | ".join(cells) + " |")
    return rows


def speed_rows(document: dict[str, Any]) -> list[str]:
    rows = []
    for shot, block in document[MEAN_ROW].items():
        s = block["summary"]
        cells = [cell(s[key], 0) for key in ("encode_ms_per_image", "score_ms_per_image", "index_ms")]
        peak = "—" if s["peak_rss_mb"] is None else f"{s['peak_rss_mb']['mean']:.0f}"
        rows.append(f"| {row_name(shot)} | " + " | ".join(cells) + f" | {peak} |")
    return rows


# ELPV's halves, named in the title: a dev-half table must never pass for a test-half figure
HALF_TITLES = {"dev": ", development half (odd-numbered cells)", "test": ", test half (even-numbered cells)"}


def markdown_report(document: dict[str, Any]) -> str:
    """results.md: the per-category table, the mean rows, speed, and how the numbers were made."""
    args, env = document["config"]["args"], document["machine"]
    columns = table_columns(document)
    baselines = list(args.get("methods", [INSPECTOR])) != [INSPECTOR]
    first, fit_title = ("k or method", "fit") if baselines else ("k", "reference indexing")
    lines = [
        f"# anomalygpt eval: {args['dataset']}{HALF_TITLES.get(args.get('half', 'all'), '')}",
        "",
        f"Preset `{document['config']['preset']['name']}`; shots {args['shots']}; seeds {args['seeds']}; "
        f"{document['date']}; {document['seconds']:.0f} s ({document['settings_computed']} settings computed, "
        f"{document['settings_reused']} reused from the cache).",
        "",
        protocol_text(args),
        "",
        f"| category | {first} | " + " | ".join(title for title, _, _ in columns) + " |",
        "|---|---|" + "---|" * len(columns),
        *table_rows(document, columns),
        "",
        "Speed (mean over categories, ± std over seeds):",
        "",
        f"| {first} | encode ms/image | score ms/image | {fit_title} ms | peak RSS MB |",
        "|---|---|---|---|---|",
        *speed_rows(document),
        "",
        f"Machine: {env['platform']}, {env['cpu_count']} CPUs, {env['torch_threads']} torch threads; "
        + ", ".join(f"{name} {version}" for name, version in document["versions"].items()),
    ]
    return "\n".join(lines) + "\n"


def figure_pixels(figure: Figure) -> np.ndarray:
    """Render a figure with the Agg canvas to an (H, W, 3) uint8 array."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def showcase(results: Sequence[SettingResult]) -> dict[str, SettingResult]:
    """Per category the setting the plots show: the Inspector's largest k, its first seed (else a baseline's)."""

    def rank(result: SettingResult) -> tuple[bool, int, int]:
        return (result.method == INSPECTOR, result.k if result.method == INSPECTOR else 0, -result.seed)

    chosen: dict[str, SettingResult] = {}
    for result in results:
        best = chosen.get(result.category)
        if best is None or rank(result) > rank(best):
            chosen[result.category] = result
    return chosen


def roc_picture(shown: dict[str, SettingResult]) -> np.ndarray:
    """ROC curves, one line per category."""
    figure = Figure(figsize=(7, 5.5), dpi=DPI)
    axes = figure.add_subplot()
    for category, result in shown.items():
        fpr, tpr, _ = roc_curve(result.labels, result.scores)
        axes.plot(fpr, tpr, linewidth=1.2, label=f"{category} ({result.metrics['auroc']:.3f})")
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
    some = next(iter(shown.values()))
    axes.set(xlabel="false-positive rate (good flagged)", ylabel="true-positive rate (defects found)")
    axes.set_title(f"Image ROC, {some.label}, seed {some.seed} (AUROC in brackets)")
    axes.legend(fontsize=7, loc="lower right", ncol=2 if len(shown) > 8 else 1)
    return figure_pixels(figure)


def methods_roc_picture(results: Sequence[SettingResult]) -> np.ndarray:
    """Runs with baselines: per category, one ROC curve per method (first seed), the Inspector's k included."""
    seed = min(result.seed for result in results)
    per_category: dict[str, list[SettingResult]] = {}
    for result in sorted(results, key=row_order):
        if result.seed == seed:
            per_category.setdefault(result.category, []).append(result)
    rows, columns = grid_shape(len(per_category), max_columns=3)
    figure = Figure(figsize=(4.6 * columns, 4.2 * rows), dpi=DPI, layout="constrained")
    for position, (category, members) in enumerate(per_category.items(), start=1):
        axes = figure.add_subplot(rows, columns, position)
        for result in members:
            fpr, tpr, _ = roc_curve(result.labels, result.scores)
            name = f"inspector k={result.k}" if result.method == INSPECTOR else result.method
            axes.plot(fpr, tpr, linewidth=1.2, label=f"{name} ({result.metrics['auroc']:.3f})")
        axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
        axes.set(xlabel="good flagged", ylabel="defects found", title=f"{category}, seed {seed}")
        axes.legend(fontsize=7, loc="lower right")
    return figure_pixels(figure)


def grid_shape(count: int, max_columns: int = 5) -> tuple[int, int]:
    columns = min(count, max_columns)
    return math.ceil(count / columns), columns


def histogram_picture(shown: dict[str, SettingResult]) -> np.ndarray:
    """Score histograms of good vs defective images per category, the automatic threshold as a line."""
    rows, columns = grid_shape(len(shown))
    figure = Figure(figsize=(3.2 * columns, 2.6 * rows + 0.4), dpi=DPI, layout="constrained")
    for position, (category, result) in enumerate(shown.items(), start=1):
        axes = figure.add_subplot(rows, columns, position)
        scores, labels = np.asarray(result.scores), np.asarray(result.labels)
        threshold = float(result.metrics["threshold"] or 0.0)
        bins = np.linspace(min(scores.min(), threshold), max(scores.max(), threshold), 30).tolist()
        axes.hist(scores[labels == 0], bins=bins, alpha=0.6, color="tab:green", label="good")
        axes.hist(scores[labels == 1], bins=bins, alpha=0.6, color="tab:red", label="defective")
        axes.axvline(threshold, color="black", linestyle="--", linewidth=1, label="threshold")
        axes.set_title(category, fontsize=9)
        axes.tick_params(labelsize=7)
        if position == 1:
            axes.legend(fontsize=7)
    some = next(iter(shown.values()))
    figure.suptitle(f"Image scores, {some.label}, seed {some.seed}; dashed: automatic threshold", fontsize=10)
    return figure_pixels(figure)


def panel_title(panel: ExamplePanel) -> str:
    relation = ">" if panel.score > panel.threshold else "<="
    return f"{panel.caption}\n{panel.defect}: {panel.score:.3f} {relation} {panel.threshold:.3f}"


def examples_picture(category: str, panels: Sequence[ExamplePanel]) -> np.ndarray:
    """A row of overlays (heat map, region boxes, ground truth outlined in cyan) with why each was picked."""
    figure = Figure(figsize=(3.2 * len(panels), 3.8), dpi=DPI, layout="constrained")
    for position, panel in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), position)
        vmin, vmax = panel.scale
        factor = enlargement(panel.image)  # legible labels
        axes.imshow(overlay(panel.image, panel.anomaly_map, panel.regions, vmin=vmin, vmax=vmax, factor=factor))
        if panel.mask is not None and panel.mask.any():
            mask = np.repeat(np.repeat(panel.mask, factor, axis=0), factor, axis=1)  # (fH, fW), as the image
            axes.contour(mask, levels=[0.5], colors="cyan", linewidths=0.8)
        axes.set_title(panel_title(panel), fontsize=8)
        axes.set_axis_off()
    figure.suptitle(examples_title(category, panels), fontsize=10)
    return figure_pixels(figure)


def examples_title(category: str, panels: Sequence[ExamplePanel]) -> str:
    """The examples' title; cyan is named only when a panel has a ground-truth mask (ELPV has none)."""
    masks = any(panel.mask is not None for panel in panels)
    return f"{category}: examples (white boxes: detected regions{'; cyan: ground truth' if masks else ''})"


def speed_picture(results: Sequence[SettingResult]) -> np.ndarray:
    """ms per image (encode and score parts) per row, and training time (with baselines) or peak RSS."""
    labels = list(dict.fromkeys(result.label for result in sorted(results, key=row_order)))
    per_row = {label: [r.metrics for r in results if r.label == label] for label in labels}
    encode = [np.mean([m["encode_ms_per_image"] for m in per_row[label]]) for label in labels]
    score = [np.mean([m["score_ms_per_image"] for m in per_row[label]]) for label in labels]
    figure = Figure(figsize=(max(9, 1.6 * len(labels)), 3.6), dpi=DPI, layout="constrained")
    left, right = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    names = [row_name(label) for label in labels]
    axis = "k (references)" if all(label.startswith("k=") for label in labels) else "k (references) or method"
    left.bar(names, encode, color="tab:blue", label="decode + backbone")
    totals = left.bar(names, score, bottom=encode, color="tab:orange", label="map + score")
    left.bar_label(totals, labels=[f"{e + s:.0f}" for e, s in zip(encode, score, strict=True)], fontsize=8)
    left.set(xlabel=axis, ylabel="ms per image", title="Time per image")
    left.legend(fontsize=8)
    if all(m.get("fit_seconds") is not None for rows in per_row.values() for m in rows):
        fit = [np.mean([m["fit_seconds"] for m in per_row[label]]) for label in labels]
        right.bar_label(right.bar(names, fit, color="tab:green"), fmt="%.1f", fontsize=8)
        right.set(xlabel=axis, ylabel="seconds", title="Training / indexing time (backbone included)")
    else:
        peak = [max((m["peak_rss_mb"] or 0.0) for m in per_row[label]) for label in labels]
        right.bar_label(right.bar(names, peak, color="tab:purple"), fmt="%.0f", fontsize=8)
        right.set(xlabel=axis, ylabel="MB", title="Peak RSS of the process so far")
    return figure_pixels(figure)


def write_report(out: Path, document: dict[str, Any], run: EvalRun, examples: dict[str, list[ExamplePanel]]) -> None:
    """results.json, results.md, roc.png, histograms.png, speed.png and examples/<category>.png, each atomic."""
    shown = showcase(run.results)
    baselines = any(result.method != INSPECTOR for result in run.results)
    write_png_atomic(out / "roc.png", methods_roc_picture(run.results) if baselines else roc_picture(shown))
    write_png_atomic(out / "histograms.png", histogram_picture(shown))
    write_png_atomic(out / "speed.png", speed_picture(run.results))
    for category, panels in examples.items():
        if panels:
            write_png_atomic(out / "examples" / f"{safe_name(category)}.png", examples_picture(category, panels))
    write_text_atomic(out / "results.md", markdown_report(document))
    write_json_atomic(out / "results.json", document)
