"""Product profiles: good references indexed once, saved as one file, loaded by every front end without re-indexing.

A profile is one safetensors file (anomalygpt.state): the memory's tensors (patch banks as float16, descriptors)
in its body, and as JSON in its header the preset it was fitted with, the calibration, the augmentation
decision, the reference-fit statistics, the references' names and file hashes (sha256), versions and a CRC-32 of
every tensor. Never pickled; written atomically.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from anomalygpt.calibration import Calibration
from anomalygpt.config import DEFAULT_PRESET, ConfigError, Preset, from_dict, load_preset, to_dict
from anomalygpt.io import file_sha256
from anomalygpt.memory import PatchMemory, StageBank
from anomalygpt.references import AugmentationDecision, FitStatistics
from anomalygpt.state import StateError, load_state, save_state

if TYPE_CHECKING:
    from anomalygpt.inspection import Inspector, References

PROFILE_FORMAT = "anomalygpt-profile"
PROFILE_VERSION = 1  # bump when the layout changes; a newer file is refused by older code
PROFILE_SUFFIX = ".profile"
# The preset sections a profile's numbers depend on: a profile only loads into an Inspector that agrees on them.
DETECTION_SECTIONS = ("backbone", "memory", "calibration", "decoder")


class ProfileError(ValueError):
    """A profile is missing, corrupt, newer than this code, or from another preset; the message is one line."""


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """CRC-32 over every tensor's name, dtype, shape and bytes, in name order: catches a corrupted file (a CRC
    reads a 250 MB pool profile in a fraction of the 1 s a profile may take to load; sha256 took 0.6 s)."""
    crc = 0
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        crc = zlib.crc32(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode(), crc)
        if tensor.numel():
            crc = zlib.crc32(tensor.view(-1).view(torch.uint8).numpy().data, crc)
    return f"crc32:{crc:08x}"


def memory_tensors(memory: PatchMemory) -> dict[str, torch.Tensor]:
    """The memory as flat named CPU tensors: bank features as float16 (the memory holds float16-exact values)."""
    tensors = {
        "descriptors": memory.descriptors.float().cpu().contiguous(),
        "appearances": memory.appearances.float().cpu().contiguous(),
    }
    for stage, bank in enumerate(memory.banks):
        tensors[f"stage{stage}.features"] = bank.features.half().cpu().contiguous()
        tensors[f"stage{stage}.reference"] = bank.reference.int().contiguous()
        tensors[f"stage{stage}.position"] = bank.position.int().contiguous()
    return tensors


def plain_preset(preset: Preset) -> dict[str, Any]:
    """The preset as plain JSON values (lists, not tuples), as the profile's header holds it."""
    return json.loads(json.dumps(to_dict(preset)))


def package_versions() -> dict[str, str]:
    found = {}
    for name in ("anomalygpt", "torch"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "unknown"
    return found


def save_profile(
    path: str | Path, references: References, preset: Preset, reference_files: Sequence[str | Path] | None = None
) -> Path:
    """Write the references as a profile, atomically; file hashes are recorded when they came from files."""
    tensors = memory_tensors(references.memory)
    header = {
        "format": PROFILE_FORMAT,
        "version": PROFILE_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": package_versions(),
        "preset": plain_preset(preset),
        "class_name": references.class_name,
        "image_size": list(references.memory.image_size),
        "augment": references.memory.augment,
        "augmentation": references.augmentation.to_dict(),
        "calibration": references.calibration.to_dict(scores=True),
        "fit_stats": references.fit_stats.to_dict(),
        "warnings": list(references.warnings),
        "references": list(references.names),
        "reference_sha256": [file_sha256(p) for p in reference_files] if reference_files is not None else None,
        "index_ms": references.index_ms,
        "checksum": tensors_checksum(tensors),
    }
    return save_state(path, {"header": header, "tensors": tensors})


def read_profile(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header, tensors) of a profile file, checked: format, version and checksum."""
    header, tree = checked_tree(path, with_tensors=True)
    tensors = tree.get("tensors")
    if not isinstance(tensors, dict) or tensors_checksum(tensors) != header.get("checksum"):
        raise ProfileError(f"{path}: corrupted profile (its tensors do not match their checksum); fit it again")
    return header, tensors


def read_header(path: str | Path) -> dict[str, Any]:
    """A profile's header, checked (format and version), read without its tensors."""
    return checked_tree(path, with_tensors=False)[0]


def checked_tree(path: str | Path, with_tensors: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, whole tree) of a profile file whose format and version this code reads."""
    path = Path(path)
    try:
        tree = load_state(path, with_tensors=with_tensors)
    except StateError as error:
        raise ProfileError(str(error).replace("state file", "profile")) from error
    header = tree.get("header") if isinstance(tree, dict) else None
    if not isinstance(header, dict) or header.get("format") != PROFILE_FORMAT:
        raise ProfileError(f"{path}: not an anomalygpt profile")
    found = header.get("version")
    if not isinstance(found, int) or found > PROFILE_VERSION:
        raise ProfileError(
            f"{path}: profile format version {found} is newer than this anomalygpt reads ({PROFILE_VERSION}); "
            "upgrade anomalygpt or fit the profile again"
        )
    return header, tree


def profile_preset(header: dict[str, Any], path: str | Path) -> Preset:
    """The preset a profile was fitted with, on device 'auto': where it runs is this machine's choice (a profile
    fitted on a GPU loads on a CPU-only machine)."""
    try:
        return from_dict(Preset, {**header["preset"], "device": "auto"}, where=f"{path}: preset")
    except (ConfigError, KeyError, TypeError) as error:
        raise ProfileError(f"{path}: unreadable preset in the profile ({error})") from error


def chosen_preset(preset: str | None, profile: str | Path | None) -> Preset:
    """--preset when given, else the preset the profile was fitted with (read from its header), else the default."""
    if preset is not None or profile is None:
        return load_preset(preset or DEFAULT_PRESET)
    return profile_preset(read_header(profile), profile)


def check_preset(header: dict[str, Any], preset: Preset, path: str | Path) -> None:
    """ProfileError unless the preset agrees with the profile's on every section its numbers depend on."""
    ours, theirs = plain_preset(preset), plain_preset(profile_preset(header, path))
    for plain in (ours, theirs):  # the rate is each profile's own (fit --false-alarm-rate): its threshold holds it
        plain["calibration"].pop("false_alarm_rate", None)
    differing = [name for name in DETECTION_SECTIONS if ours[name] != theirs[name]]
    if differing:
        raise ProfileError(
            f"{path}: fitted with preset {theirs['name']!r}, whose {', '.join(differing)} differ from preset "
            f"{preset.name!r}; use the profile's own preset or fit the profile again"
        )


def load_references(path: str | Path, inspector: Inspector) -> References:
    """The References a profile holds, for this inspector (whose preset must agree with the profile's)."""
    header, tensors = read_profile(path)
    return references_from(header, tensors, inspector, path)


def open_profile(
    path: str | Path, preset: Preset | None = None, device: str | None = None
) -> tuple[Inspector, References]:
    """An Inspector built with the profile's own preset (or `preset`, which must agree) and the profile's references;
    `device` (--device) overrides the preset's."""
    from anomalygpt.devices import with_device
    from anomalygpt.inspection import build_inspector

    header, tensors = read_profile(path)
    inspector = build_inspector(with_device(preset or profile_preset(header, path), device))
    return inspector, references_from(header, tensors, inspector, path)


def references_from(
    header: dict[str, Any], tensors: dict[str, torch.Tensor], inspector: Inspector, path: str | Path
) -> References:
    from anomalygpt.inspection import References

    check_preset(header, inspector.preset, path)
    try:
        memory = profile_memory(header, tensors, inspector)
        return References(
            memory=memory,
            calibration=Calibration(**header["calibration"]),
            index_ms=float(header["index_ms"]),
            names=list(header["references"]),
            augmentation=AugmentationDecision(**header["augmentation"]),
            fit_stats=FitStatistics(**header["fit_stats"]),
            warnings=list(header["warnings"]),
            class_name=header["class_name"],
        )
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ProfileError(f"{path}: inconsistent profile ({error}); fit it again") from error


def profile_memory(header: dict[str, Any], tensors: dict[str, torch.Tensor], inspector: Inspector) -> PatchMemory:
    n_stages = len(inspector.backbone.stage_dims)
    banks = [
        StageBank(
            tensors[f"stage{s}.features"].half(),
            tensors[f"stage{s}.reference"].long(),
            tensors[f"stage{s}.position"].long(),
        )
        for s in range(n_stages)
    ]
    for bank, dim in zip(banks, inspector.backbone.stage_dims, strict=True):
        if bank.features.shape[1] != dim:
            raise ValueError(f"bank of {bank.features.shape[1]} channels for a stage of {dim}")
    height, width = header["image_size"]
    device = inspector.backbone.mean.device
    banks = [StageBank(b.features.to(device), b.reference, b.position) for b in banks]
    memory = PatchMemory(
        inspector.backbone,
        banks,
        tensors["descriptors"].to(device),
        tensors["appearances"].to(device),
        (int(height), int(width)),
        inspector.preset.memory,
        bool(header["augment"]),
    )
    inspector.attach_prior(memory, header["class_name"])
    return memory
