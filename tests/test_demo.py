"""`vctmae demo --quick`: the real pipeline end to end (synth → ingest → pretrain → finetune → eval → explain)."""

from __future__ import annotations

import csv
import json

from typer.testing import CliRunner

from vctmae.cli import app


def test_demo_quick_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--quick"])
    assert result.exit_code == 0, result.output
    assert "f1" in result.output and "roc_auc" in result.output  # the metrics table

    summary = json.loads((out / "demo-summary.json").read_text())
    assert set(summary["timings_s"]) >= {
        "synth",
        "ingest",
        "pretrain",
        "finetune",
        "eval",
        "explain",
    }
    with (out / "data" / "manifest.csv").open() as f:
        test_keys = {row["key"] for row in csv.DictReader(f) if row["split"] == "test"}
    with (out / "report" / "predictions.csv").open() as f:
        predicted = [row["key"] for row in csv.DictReader(f)]
    # Measured on exactly the held-out split: one prediction per test crop.
    assert sorted(predicted) == sorted(test_keys) and summary["metrics"]["n"] == len(test_keys)
    assert (out / "runs" / "pretrain" / "model.safetensors").exists()
    assert list((out / "runs" / "pretrain" / "previews").glob("*.png"))
    assert (out / "runs" / "finetune" / "best.safetensors").exists()
    assert (out / "report" / "explain.png").stat().st_size > 10_000
    assert summary["explain"]["key"] in test_keys
