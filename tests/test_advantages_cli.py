"""`sdpo advantages`: every row comes back with its tokens and advantages; missing responses are generated."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sdpo_platform.cli import main
from sdpo_platform.config import TargetsConfig
from sdpo_platform.hindsight import encode_interaction
from sdpo_platform.logprobs import response_logprobs
from sdpo_platform.models import load_model


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_advantages_command_writes_rows_and_heatmap(tiny_model_dir, sdpo_home, tmp_path):
    rows = [
        {"prompt": "What is the capital of Australia?", "response": "Sydney.", "followup": "That's wrong, it is Canberra.", "id": 7},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello <b>there</b>!"}], "followup": "Too formal."},
        {"prompt": "Name a colour.", "followup": "Shorter please."},  # no response: generated
    ]
    source, out, page = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "out.html"
    write_rows(source, rows)
    assert main(["advantages", str(source), "--out", str(out), "--html", str(page), "--model", str(tiny_model_dir)]) == 0

    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(scored) == 3 and scored[0]["id"] == 7 and scored[0]["response"] == "Sydney."
    assert scored[1]["response"] == "Hello <b>there</b>!"
    assert isinstance(scored[2]["response"], str)
    model, tok = load_model(str(tiny_model_dir))
    cfg = TargetsConfig()
    for row in scored:
        assert len(row["tokens"]) == len(row["advantages"]) >= 1 and row["tokens"][-1] == tok.eos_token
        assert row["mean_advantage"] == pytest.approx(np.mean(row["advantages"]), abs=1e-5)
        assert row["mean_abs_advantage"] == pytest.approx(np.mean(np.abs(row["advantages"])), abs=1e-5)
    context = [{"role": "user", "content": rows[0]["prompt"]}]
    enc = encode_interaction(tok, context, "Sydney.", rows[0]["followup"], cfg.template, cfg.max_prompt_tokens, cfg.max_response_tokens)
    expected = (response_logprobs(model, enc.teacher_prompt_ids, enc.response_ids) - response_logprobs(model, enc.student_prompt_ids, enc.response_ids)).detach().numpy()
    np.testing.assert_allclose(scored[0]["advantages"], expected, atol=1e-4)

    html = page.read_text()
    assert html.count('class="tok"') == sum(len(r["tokens"]) for r in scored)
    assert "<b>there" not in html and "&lt;" in html  # the logged markup is shown, never interpreted


def test_generation_is_seeded_and_repeatable(tiny_model_dir, sdpo_home, tmp_path):
    source = tmp_path / "in.jsonl"
    write_rows(source, [{"prompt": "Tell me a story.", "followup": "Too long."}])
    outputs = []
    for name in ("a.jsonl", "b.jsonl"):
        main(["advantages", str(source), "--out", str(tmp_path / name), "--model", str(tiny_model_dir)])
        outputs.append(json.loads((tmp_path / name).read_text()))
    assert outputs[0]["response"] == outputs[1]["response"] and outputs[0]["advantages"] == outputs[1]["advantages"]


def test_bad_rows_fail_before_the_model_loads(tmp_path, sdpo_home):
    source = tmp_path / "in.jsonl"
    write_rows(source, [{"prompt": "ok", "followup": "fine"}, {"prompt": "no follow-up here"}])
    with pytest.raises(ValueError, match="line 2.*followup"):
        main(["advantages", str(source), "--out", str(tmp_path / "out.jsonl"), "--model", "/nonexistent/model"])
