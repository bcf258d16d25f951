"""Integration: the lineage on the real default model (SmolLM2-135M) and real ShareGPT records."""

import json

import dagster as dg
import pytest

from assets.definitions import LINEAGE_JOB, build_definitions
from assets.resources import MlflowTracking, SdpoSettings, Warehouse
from sdpo_platform.sharegpt import write_sharegpt_slice

pytestmark = pytest.mark.slow


def test_lineage_on_default_model_and_real_logs(sdpo_home):
    write_sharegpt_slice(sdpo_home / "inbox" / "sharegpt.jsonl", 60)
    config = sdpo_home / "config.json"
    config.write_text(json.dumps({
        "model": "default",
        "targets": {"max_prompt_tokens": 128, "max_response_tokens": 32, "max_train": 4, "max_validation": 2},
        "training": {"steps": 2, "batch_size": 2},
        "registry": {"model_name": "sdpo-integration"},
    }))
    defs = build_definitions(
        settings=SdpoSettings(config_file=str(config), inbox=str(sdpo_home / "inbox")),
        warehouse=Warehouse(),
        mlflow_tracking=MlflowTracking(),
    )
    with dg.DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def(LINEAGE_JOB).execute_in_process(instance=instance)
        assert result.success
        assert all(c.passed for c in result.get_asset_check_evaluations())
    conversations = result.output_for_node("conversations")
    assert conversations["raw_records"] == 60 == conversations["kept"] + conversations["quarantined"]
    targets = result.output_for_node("hindsight_targets")
    assert 2 <= targets["rows"] <= 6 and targets["tokens"] > 0
    registered = result.output_for_node("registered_model")
    assert "champion" in registered["aliases"]
