"""Names and places every part agrees on, importable without torch (the service's configuration and its start-up
shim read them before the model stack is imported)."""

from __future__ import annotations

import os
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
