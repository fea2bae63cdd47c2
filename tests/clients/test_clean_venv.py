"""The client as a user gets it: ``pip install ./clients/python`` into a fresh virtual environment (no torch there),
then the quickstart example against a live service."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.clients.conftest import CLIENT_SRC
from tests.service.conftest import serve

CLIENT_DIR = CLIENT_SRC.parent
QUICKSTART = CLIENT_DIR / "examples" / "quickstart.py"


def _run(*args: str | Path, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env)


def test_pip_install_into_a_clean_venv_and_run_the_quickstart(settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    venv = tmp_path / "venv"
    made = _run(sys.executable, "-m", "venv", venv, timeout=300)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    # a copy, so that the build's egg-info / build folders never land in the source tree
    source = shutil.copytree(
        CLIENT_DIR, tmp_path / "icm-lora-client", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}}
    installed = _run(python, "-m", "pip", "install", "--quiet", source, timeout=600, env=env)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    no_torch = _run(python, "-c", "import torch", timeout=120, env=env)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    shown = _run(python, "-m", "pip", "show", "icm-lora-client", timeout=120, env=env)
    assert "Requires: httpx, pydantic" in shown.stdout

    with serve(settings_for()) as service:
        result = _run(python, QUICKSTART, timeout=300, env={**env, "ICM_LORA_BASE_URL": service.url})
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "health: ok"
    assert lines[1].startswith("task: fruit-or-animal adapter: ")
    assert lines[2].startswith("completion: ") and "model: fruit-or-animal" in lines[2]
    assert lines[3] == "models: tiny, fruit-or-animal"
    assert lines[4] == "torch imported: False"
