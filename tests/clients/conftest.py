"""Client tests: make ``icm_lora_client`` importable, and re-export the live-service fixtures of tests/service."""

from __future__ import annotations

import sys
from pathlib import Path

CLIENT_SRC = Path(__file__).resolve().parents[2] / "clients" / "python" / "src"
VLLM_PLUGIN_SRC = Path(__file__).resolve().parents[2] / "clients" / "vllm" / "src"
try:
    import icm_lora_client  # noqa: F401  (the dev venv has it: pip install -e ./clients/python)
except ImportError:  # not installed: test the source tree
    sys.path.insert(0, str(CLIENT_SRC))
try:
    import icm_lora_vllm  # noqa: F401  (pip install -e ./clients/vllm; its vLLM glue is tested in tests/vllm)
except ImportError:
    sys.path.insert(0, str(VLLM_PLUGIN_SRC))

from tests.service.conftest import settings_for  # noqa: E402, F401  (fixture; small_run comes from tests/conftest.py)
