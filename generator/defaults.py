"""Names and places every part agrees on, importable without torch (the service's configuration and its start-up
shim read them before the model stack is imported)."""

from __future__ import annotations

import os
import re
from pathlib import Path

DEFAULT_BASE_MODEL = "smollm2-135m"
PACKAGED_GENERATORS = Path(__file__).resolve().parent / "assets" / "generators"


def default_data_dir() -> Path:
    """Where icm-lora keeps caches (the dequantised base model): ``$ICM_LORA_DATA_DIR`` or ``~/.cache/icm-lora``."""
    configured = os.environ.get("ICM_LORA_DATA_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "icm-lora"


def packaged_generator(base_model: str) -> Path | None:
    """The generator shipped for ``base_model`` (``generator/assets/generators/<name>``), None when there is none."""
    folder = PACKAGED_GENERATORS / base_model.replace("/", "__")
    return folder if (folder / "generator.json").is_file() else None


DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class PlacementError(ValueError):
    """The requested device or dtype cannot be used on this machine."""


def check_device_name(value: str) -> str:
    """The device string, normalised; ``PlacementError`` when it is not one of the accepted forms."""
    text = value.strip().lower()
    if not _DEVICE.match(text):
        raise PlacementError(f"device must be {DEVICE_CHOICES}, got {value!r}")
    return text


def check_dtype_name(value: str) -> str:
    text = value.strip().lower()
    if text not in DTYPE_CHOICES:
        raise PlacementError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {value!r}")
    return text
