"""The MLflow registry round trip on the tiny model: aliases follow the gate, and the champion reloads exactly.

The exact-logits test is the guard the registry module's docstring promises: the transformers flavor is
documented for transformers 4.x only, and without `base_model_path` it reloads LoRA models with wrong
weights, so any upgrade that breaks the round trip must fail here.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from sdpo_platform.registry import (
    RegisteredVersion,
    configure_mlflow,
    current_champion,
    load_registered,
    log_checkpoint,
    promote,
)

MODEL_NAME = "sdpo-test"
PROMPT = "The capital of Australia is Sydney, isn't it?"


@pytest.fixture(scope="module")
def lora_adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A saved LoRA adapter whose B weights are random, so base+adapter differs from the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    out = tmp_path_factory.mktemp("lora_adapter")
    model.save_pretrained(out)
    return out


def _log(adapter_dir, base_dir, run_id=None, target_set="targets-1") -> RegisteredVersion:
    return log_checkpoint(
        adapter_dir,
        base_dir,
        run_id=run_id,
        model_name=MODEL_NAME,
        tags={"data_partition": "2026-01-01", "target_set": target_set, "validation_status": "passed"},
        metrics={"val_loss": 1.5},
    )


def _aliases(version: int) -> list[str]:
    return sorted(MlflowClient().get_model_version(MODEL_NAME, str(version)).aliases)


def test_aliases_follow_the_gate(sdpo_home, tiny_model_dir, lora_adapter_dir):
    uri = configure_mlflow()
    assert uri.startswith("sqlite:") and str(sdpo_home) in uri
    assert current_champion(MODEL_NAME) is None

    first = _log(lora_adapter_dir, tiny_model_dir)
    assert (first.version, first.model_uri) == (1, f"models:/{MODEL_NAME}/1")
    assert _aliases(1) == ["challenger"]
    tags = MlflowClient().get_model_version(MODEL_NAME, "1").tags
    assert tags["target_set"] == "targets-1" and tags["validation_status"] == "passed"
    assert float(tags["metric.val_loss"]) == 1.5
    experiment = mlflow.get_experiment(mlflow.get_run(first.run_id).info.experiment_id)
    assert experiment.artifact_location.startswith((sdpo_home / "mlflow" / "artifacts").as_uri())

    # No champion yet: the first version takes it even though its gate failed.
    assert promote(MODEL_NAME, 1, gate_passed=False) == ["challenger", "champion"]

    # A finished trainer run: the model is logged into it, not into a new run.
    with mlflow.start_run() as trainer_run:
        pass
    second = _log(lora_adapter_dir, tiny_model_dir, run_id=trainer_run.info.run_id, target_set="targets-2")
    assert second.run_id == trainer_run.info.run_id
    assert promote(MODEL_NAME, 2, gate_passed=False) == ["challenger"]
    assert _aliases(1) == ["champion"] and current_champion(MODEL_NAME) == 1
    assert MlflowClient().get_model_version(MODEL_NAME, "2").tags["gate_passed"] == "false"

    # The trainer's run still active in this process.
    with mlflow.start_run() as active_run:
        third = _log(lora_adapter_dir, tiny_model_dir, run_id=active_run.info.run_id)
    assert third.run_id == active_run.info.run_id
    assert promote(MODEL_NAME, 3, gate_passed=True) == ["challenger", "champion"]
    assert current_champion(MODEL_NAME) == 3
    assert _aliases(1) == [] and _aliases(2) == []


def test_champion_reloads_offline_with_identical_logits(sdpo_home, tiny_model_dir, lora_adapter_dir, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    configure_mlflow()
    registered = _log(lora_adapter_dir, tiny_model_dir)
    promote(MODEL_NAME, registered.version, gate_passed=True)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(input_ids).logits
        expected = PeftModel.from_pretrained(base, lora_adapter_dir).eval()(input_ids).logits
    assert (expected - base_logits).abs().max() > 1e-2, "the adapter must not be a no-op"

    model, loaded_tokenizer = load_registered(f"models:/{MODEL_NAME}@champion")
    assert loaded_tokenizer(PROMPT).input_ids == input_ids[0].tolist()
    with torch.no_grad():
        got = model(input_ids.to(model.device)).logits.cpu()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

    # Only the adapter is stored; the base weights are read from the local base directory.
    stored_weights = sorted(p.name for p in (sdpo_home / "mlflow" / "artifacts").rglob("*.safetensors"))
    assert stored_weights == ["adapter_model.safetensors"]


def test_pyfunc_serves_greedy_text(sdpo_home, tiny_model_dir, lora_adapter_dir):
    configure_mlflow()
    registered = _log(lora_adapter_dir, tiny_model_dir)
    promote(MODEL_NAME, registered.version, gate_passed=True)

    served = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    prompts = pd.DataFrame({"prompt": ["Hi!", PROMPT]})
    answers = served.predict(prompts, params={"max_new_tokens": 4})
    assert len(answers) == 2 and all(isinstance(answer, str) and answer for answer in answers)
    assert not any(answer.startswith("<|im_start|>") for answer in answers), "prompt must not be echoed"
    assert served.predict(prompts, params={"max_new_tokens": 4}) == answers, "greedy decoding is deterministic"

    # Explicit pins: MLflow's inferred requirements would import torchvision (not installed) and fail.
    requirements = Path(mlflow.pyfunc.get_model_dependencies(registered.model_uri)).read_text()
    assert "peft==" in requirements and "torchvision" not in requirements


def test_a_prompt_longer_than_the_window_is_cut_from_the_left(sdpo_home, tiny_model_dir, lora_adapter_dir):
    """The served model keeps the newest tokens of a prompt that does not fit its 2,048 positions with the answer
    (as scoring cuts a prompt): two prompts that differ only before the window answer the same. Uncut, they ran past
    the positions the model was trained on (transformers only warns) and answered differently."""
    configure_mlflow()
    registered = _log(lora_adapter_dir, tiny_model_dir)
    served = mlflow.pyfunc.load_model(registered.model_uri)
    shared = " ".join(f"item {i % 97}" for i in range(1200))  # ~2,400 tokens: fills the window on its own
    prompts = pd.DataFrame({"prompt": ["alpha beta gamma " * 400 + shared, "zeta eta theta " * 400 + shared]})
    first, second = served.predict(prompts, params={"max_new_tokens": 6})
    assert first == second


def test_next_round_builds_on_the_merged_champion(sdpo_home, tiny_model_dir, lora_adapter_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sdpo_platform.models import model_revision
    from sdpo_platform.registry import round_model

    configure_mlflow()
    assert round_model(MODEL_NAME, str(tiny_model_dir)) == (str(tiny_model_dir), f"base:{tiny_model_dir}")  # no champion yet
    registered = _log(lora_adapter_dir, tiny_model_dir)
    promote(MODEL_NAME, registered.version, gate_passed=True)

    spec, label = round_model(MODEL_NAME, str(tiny_model_dir))
    assert label == f"models:/{MODEL_NAME}/1" and Path(spec).is_dir()
    champion, _ = load_registered(f"models:/{MODEL_NAME}@champion")
    merged = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32).eval()
    input_ids = AutoTokenizer.from_pretrained(spec)(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids).logits, champion(input_ids).logits, atol=1e-5, rtol=0)
    assert model_revision(spec) != model_revision(str(tiny_model_dir))  # so its targets form a new set

    written = (Path(spec) / "config.json").stat().st_mtime_ns
    assert round_model(MODEL_NAME, str(tiny_model_dir))[0] == spec  # merged once, then reused
    assert (Path(spec) / "config.json").stat().st_mtime_ns == written
    assert round_model(MODEL_NAME, str(tiny_model_dir), next_round_from="base")[0] == str(tiny_model_dir)
    with pytest.raises(ValueError, match="next_round_from"):
        round_model(MODEL_NAME, str(tiny_model_dir), next_round_from="latest")


def test_a_base_named_by_a_hub_id_is_registered_from_its_local_snapshot(sdpo_home, tiny_model_dir, lora_adapter_dir, tmp_path, monkeypatch):
    """`model: <hub id>` scores and trains from the local hub cache; MLflow records the base as a folder, so
    registration takes the id to its snapshot there (it used to resolve the id against the working directory)."""
    import shutil

    import huggingface_hub.constants

    commit = "a" * 40
    repo = tmp_path / "hub" / "models--audit--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)

    configure_mlflow()
    version = _log(lora_adapter_dir, "audit/tiny")
    tags = MlflowClient().get_model_version(MODEL_NAME, str(version.version)).tags
    assert tags["base_model_path"] == str(repo / "snapshots" / commit)
    model, _ = load_registered(version.model_uri)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    with pytest.raises(ValueError, match="not a folder, nor a hub id in the local cache"):
        _log(lora_adapter_dir, "audit/not-cached")


def test_two_processes_merging_one_champion_both_get_the_whole_folder(sdpo_home, tiny_model_dir, lora_adapter_dir, tmp_path):
    """A scheduled round beside a manual one merge the same version at once: each builds its own copy and one
    rename wins; they used to share one temp folder and delete it under each other (a folder without weights)."""
    import os
    import subprocess
    import sys
    import time

    configure_mlflow()
    _log(lora_adapter_dir, tiny_model_dir)
    go = tmp_path / "go"
    script = (
        "import sys, time\nfrom pathlib import Path\n"
        f"while not Path({str(go)!r}).exists(): time.sleep(0.01)\n"
        "from sdpo_platform.registry import champion_model_dir\n"
        f"print(champion_model_dir({MODEL_NAME!r}, 1))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    workers = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    time.sleep(1.0)
    go.touch()
    outputs = [w.communicate(timeout=300) for w in workers]
    assert all(w.returncode == 0 for w in workers), [err[-1500:] for _, err in outputs]
    folders = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(folders) == 1
    folder = Path(folders.pop())
    assert (folder / "model.safetensors").exists() and (folder / "merged_from.json").exists()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no copy or temp folder left


def test_a_merged_folder_of_other_weights_is_built_again(sdpo_home, tiny_model_dir, lora_adapter_dir):
    """The merge is cached by name and version; a folder holding other weights (the registry rebuilt, another
    tracking server) or an incomplete one must not be served as the champion."""
    import json

    from sdpo_platform.registry import MERGED_FROM, champion_model_dir

    configure_mlflow()
    _log(lora_adapter_dir, tiny_model_dir)
    folder = champion_model_dir(MODEL_NAME, 1)
    recorded = (folder / MERGED_FROM).read_text()
    (folder / MERGED_FROM).write_text(json.dumps({"run_id": "another", "source": "elsewhere"}))
    assert champion_model_dir(MODEL_NAME, 1) == folder and (folder / MERGED_FROM).read_text() == recorded
    (folder / "model.safetensors").unlink()  # damaged
    assert champion_model_dir(MODEL_NAME, 1) == folder and (folder / "model.safetensors").exists()
    (folder / MERGED_FROM).unlink()  # built by an earlier version of this code: not known to be whole
    assert champion_model_dir(MODEL_NAME, 1) == folder and (folder / MERGED_FROM).read_text() == recorded


def test_an_unreachable_tracking_server_fails_fast_naming_it():
    """MLflow's client retries a refused connection for minutes; a mistyped URI must say so at once."""
    with pytest.raises(ConnectionError, match="MLflow tracking server http://127.0.0.1:9 is not reachable"):
        configure_mlflow("http://127.0.0.1:9")


def test_a_version_that_does_not_reload_as_its_checkpoint_is_never_champion(sdpo_home, tiny_model_dir, lora_adapter_dir):
    """Not even the first one, which becomes champion whatever its gate says."""
    from sdpo_platform.registry import record_reload, reloads_exactly

    configure_mlflow()
    first = _log(lora_adapter_dir, tiny_model_dir)
    assert promote(MODEL_NAME, first.version, gate_passed=True, reloads=False) == ["challenger"]
    assert current_champion(MODEL_NAME) is None
    assert reloads_exactly(record_reload(MODEL_NAME, first.version, lora_adapter_dir, tiny_model_dir))  # this one does, and says so
    assert MlflowClient().get_model_version(MODEL_NAME, str(first.version)).tags["checks"] == "passed"


def test_the_registration_check_names_the_missing_tags():
    from sdpo_platform.checks import check_registration

    required = ["data_partition", "target_set", "model_revision", "validation_status"]
    assert check_registration(3, ["challenger"], dict.fromkeys(required, "x"), required).passed
    report = check_registration(3, ["challenger"], {"target_set": "s", "model_revision": "r"}, required)
    assert not report.passed and report.description.endswith("missing: ['data_partition', 'validation_status']")
