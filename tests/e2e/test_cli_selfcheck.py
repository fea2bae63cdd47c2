"""``icm-lora generate`` self-checks the adapter it writes (as the service does) and stores the result with it."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from generator.adapter import ADAPTER_WEIGHTS, GeneratedAdapter
from icm_lora.cli import app

runner = CliRunner()


def test_generate_prints_and_stores_the_self_check(small_run: Path, tmp_path: Path) -> None:
    spec = {
        "description": "Decide whether the words are fruits or animals.",
        "examples": [{"input": "kiwi pear lime", "output": "fruits"}, {"input": "wolf goat", "output": "animals"}],
    }
    task_file = tmp_path / "task.json"
    task_file.write_text(json.dumps(spec))
    generator = str(small_run / "generator")
    out = tmp_path / "adapter"
    result = runner.invoke(app, ["generate", "--generator", generator, "--task", str(task_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    written = GeneratedAdapter.from_safetensors_bytes((out / ADAPTER_WEIGHTS).read_bytes())
    check = json.loads(written.metadata["self_check"])
    assert check["examples"] == 2 and check["held_out"] is False
    verdict = "passed" if check["passed"] else "FAILED"
    assert f"self-check: {verdict}: answer log-likelihood {check['adapter_loglik']:.4f}" in result.output
    assert f"({check['delta']:+.4f} nats/token) on 2 in-sample examples" in result.output

    choices = {**spec, "examples": [{**e, "choices": ["fruits", "animals"]} for e in spec["examples"]]}
    task_file.write_text(json.dumps(choices))
    result = runner.invoke(app, ["generate", "--generator", generator, "--task", str(task_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    check = json.loads(
        GeneratedAdapter.from_safetensors_bytes((out / ADAPTER_WEIGHTS).read_bytes()).metadata["self_check"]
    )
    right = f"{check['adapter_correct']} right with the adapter vs {check['base_correct']} without; answer"
    assert 0 <= check["adapter_correct"] <= 2 and 0 <= check["base_correct"] <= 2 and right in result.output

    task_file.write_text(json.dumps(spec))
    unchecked = tmp_path / "unchecked"
    args = ["generate", "--generator", generator, "--task", str(task_file), "--out", str(unchecked), "--no-self-check"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "self-check: skipped" in result.output
    plain = GeneratedAdapter.from_safetensors_bytes((unchecked / ADAPTER_WEIGHTS).read_bytes())
    assert "self_check" not in plain.metadata
    assert plain.adapter_id == written.adapter_id and plain.sha256 == written.sha256  # the check changes no weights
