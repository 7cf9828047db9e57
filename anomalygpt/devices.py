"""Where the models run: `--device auto|cpu|cuda|cuda:N` on every command that inspects or trains.

The option's form is checked when the command line is parsed (no torch import, so `--help` stays quick); whether
the device exists is checked when the preset is loaded, with one line naming the option.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from accelerate import Accelerator

    from anomalygpt.config import Preset

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d{1,3})?")
DEVICE_HELP = "auto (a CUDA GPU when one is available, else the CPU), cpu, cuda or cuda:N (default: the preset's)"


class DeviceError(ValueError):
    """A device that this machine does not have; the message names the option."""


def device_name(text: str) -> str:
    """argparse type of --device: its form only."""
    if not DEVICE_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", type=device_name, default=None, help=DEVICE_HELP)


def available_device(device: str, option: str = "--device") -> str:
    """The device resolved ('auto' -> 'cuda' when CUDA is available, else 'cpu'), or DeviceError."""
    count = gpus_lacking(device)
    if count == 0:
        raise DeviceError(f"{option} {device}: no CUDA device is available (torch.cuda.is_available() is False)")
    if count is not None:
        raise DeviceError(f"{option} {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return resolve_device(device)


def gpus_lacking(device: str) -> int | None:
    """None when this machine has the device (the CPU and 'auto' always), else how many CUDA GPUs it has."""
    if not device.startswith("cuda"):
        return None
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return None if int(device.partition(":")[2] or 0) < count else count


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a CUDA GPU is present, else 'cpu'; any other device unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def with_device(preset: Preset, device: str | None) -> Preset:
    """The preset on `device` (checked and resolved); unchanged when None (the option was not given)."""
    return preset if device is None else dataclasses.replace(preset, device=available_device(device))


def training_accelerator(device: str) -> Accelerator:
    """An accelerate Accelerator on a resolved device: the CPU, or cuda:N made the current CUDA device (accelerate
    places a single process on the current one)."""
    import torch
    from accelerate import Accelerator

    if device.startswith("cuda:"):
        torch.cuda.set_device(int(device.partition(":")[2]))
    return Accelerator(cpu=device == "cpu")
