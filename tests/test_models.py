"""Model specs: the default converts once (atomically), paths and hub ids resolve, revisions track weights."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdpo_platform import models


def test_local_dir_and_hub_id_resolve(tiny_model_dir):
    assert models.resolve_model(str(tiny_model_dir)) == str(tiny_model_dir.resolve())
    assert models.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_hub_revision_offline_is_stable_and_distinct():
    a = models.model_revision("someone/not-cached-model")
    assert a == models.model_revision("someone/not-cached-model")
    assert a != models.model_revision("someone/other-model") and len(a) == 12


def test_load_model_is_eval_float32_with_pad_token(tiny_model_dir):
    model, tok = models.load_model(str(tiny_model_dir), device="cpu")
    assert not model.training and model.dtype == torch.float32
    assert tok.pad_token_id is not None


def test_revision_is_stable_and_changes_with_the_weights(tiny_model_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert models.model_revision(str(copy)) == models.model_revision(str(tiny_model_dir))

    model = AutoModelForCausalLM.from_pretrained(copy)
    with torch.no_grad():
        model.model.norm.weight.add_(1e-3)  # same shapes, same sizes, different weights
    model.save_pretrained(copy)
    assert models.model_revision(str(copy)) != models.model_revision(str(tiny_model_dir))


@pytest.fixture()
def fake_gguf(monkeypatch, tiny_model_dir):
    """Stand the tiny model in for the GGUF so conversion mechanics are tested in milliseconds."""
    calls = []

    def load():
        calls.append("gguf")
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        model.config.quantization_config = {"quant_method": "gguf"}  # as transformers flags a GGUF load
        return model, AutoTokenizer.from_pretrained(tiny_model_dir)

    monkeypatch.setattr(models, "_load_default_gguf", load)
    return calls


def test_default_converts_once_without_quantization_config(sdpo_home, fake_gguf):
    path = models.resolve_model("default")
    assert path == str(sdpo_home / "models" / "base" / "smollm2-135m-instruct")
    assert fake_gguf == ["gguf"]
    config = json.loads((models.default_model_dir() / "config.json").read_text())
    assert "quantization_config" not in config
    assert models.resolve_model("default") == path and len(fake_gguf) == 1  # reused, not reconverted
    assert [p.name for p in (sdpo_home / "models" / "base").iterdir()] == ["smollm2-135m-instruct"]


def test_crashed_conversion_leaves_nothing_behind(sdpo_home, fake_gguf, monkeypatch):
    load = models._load_default_gguf

    def load_with_failing_tokenizer_save():
        model, tokenizer = load()

        def crash(*args, **kwargs):
            raise RuntimeError("disk full")

        tokenizer.save_pretrained = crash  # fails after the weights were already written
        return model, tokenizer

    monkeypatch.setattr(models, "_load_default_gguf", load_with_failing_tokenizer_save)
    with pytest.raises(RuntimeError, match="disk full"):
        models.resolve_model("default")
    assert list((sdpo_home / "models" / "base").iterdir()) == []


@pytest.mark.slow
def test_real_default_converts_once_and_matches_the_gguf(sdpo_home):
    import time

    path = models.resolve_model("default")
    start = time.perf_counter()
    assert models.resolve_model("default") == path
    second_call_s = time.perf_counter() - start
    print(f"second resolve_model('default'): {second_call_s:.4f}s")

    gguf_dir = importlib.util.find_spec(models.DEFAULT_GGUF_PACKAGE).submodule_search_locations[0]
    reference = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=models.DEFAULT_GGUF_FILE).eval()
    converted, tok = models.load_model("default", device="cpu")
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits
        got = converted(torch.tensor([ids])).logits
    assert (got - expected).abs().max().item() < 1e-4
    assert len(models.model_revision("default")) == 12
