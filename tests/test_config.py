"""Configuration is typed, loads from JSON, and every knob is documented in the README."""

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from sdpo_platform.config import PlatformConfig, config_reference

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_documents_every_knob_with_its_current_default():
    readme = README.read_text()
    for row in config_reference().splitlines()[2:]:
        assert row in readme, f"README configuration table is stale: {row}"


def test_partial_json_keeps_defaults_and_unknown_keys_fail(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"training": {"steps": 3}}))
    config = PlatformConfig.load(path)
    assert config.training.steps == 3 and config.training.skip_tokens == 2
    path.write_text(json.dumps({"training": {"stepz": 3}}))
    with pytest.raises(ValidationError):
        PlatformConfig.load(path)
