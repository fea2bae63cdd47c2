"""The client must stay light: importing it never imports torch (or the service)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.clients.conftest import CLIENT_SRC


def test_import_does_not_pull_in_torch() -> None:
    code = (
        "import sys, icm_lora_client\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'service', 'generator') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "print(icm_lora_client.__version__)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(CLIENT_SRC), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0.1.0"
