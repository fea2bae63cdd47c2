"""Client tests: make ``icm_lora_client`` importable, and re-export the live-service fixtures of tests/service."""

from __future__ import annotations

import sys
from pathlib import Path

CLIENT_SRC = Path(__file__).resolve().parents[2] / "clients" / "python" / "src"
try:
    import icm_lora_client  # noqa: F401  (the dev venv has it: pip install -e ./clients/python)
except ImportError:  # not installed: test the source tree
    sys.path.insert(0, str(CLIENT_SRC))

from tests.service.conftest import settings_for  # noqa: E402, F401  (fixture; small_run comes from tests/conftest.py)
