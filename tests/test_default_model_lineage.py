"""Integration: `make demo`'s code path on the real default model (SmolLM2-135M) and real ShareGPT logs,
twice — the second run reuses the converted model, adds no rows, and builds on the first round's champion."""

import json

import pytest

from assets.demo import SUMMARY_KEYS, run_demo

pytestmark = pytest.mark.slow


def test_demo_runs_twice_on_default_model_and_real_logs(sdpo_home, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(sdpo_home / "dagster"))
    config = sdpo_home / "config.json"
    config.write_text(json.dumps({
        "model": "default",
        "targets": {"max_prompt_tokens": 128, "max_response_tokens": 32, "max_train": 4, "max_validation": 2},
        "training": {"steps": 2, "batch_size": 2},
        "registry": {"model_name": "sdpo-integration"},
    }))
    monkeypatch.setenv("SDPO_CONFIG", str(config))

    first = run_demo(records=60)
    assert list(first) == SUMMARY_KEYS
    assert json.loads((sdpo_home / "demo_summary.json").read_text()) == first
    assert first["raw_records"] == 60
    assert first["conversations_kept"] > 0 and first["interactions_total"] >= first["interactions_kept"] > 0
    assert 2 <= first["target_rows"] <= 6 and first["target_tokens"] > 0
    assert first["train_steps"] == 2 and first["model_version"] == 1
    assert first["aliases"] == ["challenger", "champion"]
    converted = sdpo_home / "models" / "base" / "smollm2-135m-instruct"
    weights_mtime = next(converted.glob("*.safetensors")).stat().st_mtime_ns

    second = run_demo(records=60)
    for key in ("raw_records", "conversations_kept", "conversations_quarantined", "interactions_total", "target_rows"):
        assert second[key] == first[key], key  # nothing duplicated
    assert first["teacher"] == "base:default" and second["teacher"] == "models:/sdpo-integration/1"  # round 2 builds on v1
    assert second["model_version"] == 2 and "challenger" in second["aliases"]
    assert next(converted.glob("*.safetensors")).stat().st_mtime_ns == weights_mtime  # conversion reused
