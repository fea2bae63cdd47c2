"""The ``icm-lora demo`` run, end to end: tiny model, synthetic family, the whole pipeline, the report's claims."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from typer.testing import CliRunner

from icm_lora.cli import app


def test_demo_meets_its_quality_bar(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "| **seen**" in result.output

    report = json.loads((out / "report" / "quality.json").read_text())
    assert (out / "report" / "quality.md").is_file()
    seen = [r for r in report["tasks"] if r["split"] == "seen"]
    unseen = [r for r in report["tasks"] if r["split"] == "unseen"]
    assert len(seen) == 24 and len(unseen) == 8
    means = report["means"]["seen"]

    # generated adapters reach at least 90% of the trained LoRAs' score on tasks the generator saw
    assert means["generated"] >= 0.9 * means["trained"]
    ratios = [r["scores"]["generated"] / r["scores"]["trained"] for r in seen]
    assert statistics.median(ratios) >= 0.9
    # ... while the base model is clearly worse
    assert means["base"] <= means["trained"] - 0.25
    assert means["generated"] >= means["base"] + 0.25
    # ... and a wrong task vector scores lower than the right one
    assert means["wrong_vector"] <= means["generated"] - 0.1
    # every generated adapter is compared with its nearest training checkpoint
    assert all(r["nearest_checkpoint"]["cosine"] <= 1.0 + 1e-6 for r in report["tasks"])
    assert report["summary"]["median_generated_over_trained_seen"] == round(statistics.median(ratios), 4)
    # the store the generator replaces: one fp32 adapter per training task (not the checkpoints it trained on)
    layout_dim = json.loads((out / "manifest.json").read_text())["layout_dim"]
    assert report["summary"]["collection_bytes"] == len(seen) * layout_dim * 4
