"""`sdpo advantages`: every row comes back with its tokens and advantages; missing responses are generated."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from sdpo_platform.advantages import context_and_response
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
        assert len(row["tokens"]) == len(row["advantages"]) >= 1 and (row["tokens"][-1] == tok.eos_token) != row["truncated"]
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


BAD_ROWS = [  # (line 2 of the input, what the error must say)
    ('{"prompt": "hi", "followup": ', "not JSON"),
    ('["prompt", "hi"]', "expected a JSON object"),
    ('{"prompt": "no follow-up here"}', "'followup' string"),
    ('{"prompt": "hi", "followup": 3}', "'followup' string"),
    ('{"followup": "ok"}', "needs 'messages' or 'prompt'"),
    ('{"prompt": "A", "messages": [{"role": "user", "content": "B"}], "followup": "ok"}', "both 'messages' and 'prompt'"),
    ('{"prompt": null, "followup": "ok"}', "'prompt' must be a string"),
    ('{"prompt": 123, "followup": "ok"}', "'prompt' must be a string"),
    ('{"prompt": "hi", "response": 42, "followup": "ok"}', "'response' must be a string"),
    ('{"messages": "hello", "followup": "ok"}', "'messages' must be a list"),
    ('{"messages": ["hello"], "followup": "ok"}', "messages[0] is not an object"),
    ('{"messages": [{"role": "user"}], "followup": "ok"}', "messages[0] has no content"),
    ('{"messages": [{"content": "hi"}], "followup": "ok"}', "messages[0] has no role"),
    ('{"messages": [{"role": "user", "content": 5}], "followup": "ok"}', "messages[0]: content must be a string"),
    ('{"messages": [{"role": "robot", "content": "hi"}], "followup": "ok"}', "unknown role 'robot'"),
    ('{"messages": [], "followup": "ok"}', "start and end with a user message"),
    ('{"messages": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}], "followup": "ok"}', "start and end with a user message"),
    ('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "response": "Hey", "followup": "ok"}', "two responses"),
    ('{"prompt": "cut emoji \\ud83d here", "followup": "ok"}', "half of a surrogate pair"),
    ('{"prompt": "ok", "followup": "fine", "note": "\\udfff"}', "half of a surrogate pair"),  # any field: it is written back
]


@pytest.fixture()
def no_model(monkeypatch):
    """Loading a model fails the test: bad input must be refused before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("sdpo_platform.models.load_model", refuse)


@pytest.mark.parametrize(("line", "says"), BAD_ROWS)
def test_bad_rows_are_one_line_errors_naming_file_and_line(tmp_path, sdpo_home, no_model, capsys, line, says):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text('{"prompt": "ok", "followup": "fine"}\n' + line + "\n")
    assert main(["advantages", str(source), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sdpo: error: {source}:2: ") and says in err and err.count("\n") == 1, err
    assert not out.exists()


def test_empty_input_is_an_error(tmp_path, sdpo_home, no_model, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text("\n  \n")
    assert main(["advantages", str(source), "--out", str(tmp_path / "out.jsonl")]) == 2
    assert capsys.readouterr().err == f"sdpo: error: {source}: no rows\n"


def test_missing_input_is_an_error(tmp_path, sdpo_home, no_model, capsys):
    assert main(["advantages", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "out.jsonl")]) == 2
    assert capsys.readouterr().err == f"sdpo: error: No such file or directory: {tmp_path / 'nope.jsonl'}\n"


def test_unloadable_model_is_an_error(tmp_path, sdpo_home, capsys):
    source = tmp_path / "in.jsonl"
    write_rows(source, [{"prompt": "ok", "response": "yes", "followup": "fine"}])
    assert main(["advantages", str(source), "--out", str(tmp_path / "out.jsonl"), "--model", str(tmp_path / "no-model")]) == 2
    assert capsys.readouterr().err.startswith(f"sdpo: error: cannot load model '{tmp_path / 'no-model'}': ")


def test_an_empty_model_spec_or_a_file_is_an_error_naming_the_spec(tmp_path, sdpo_home, tiny_model_dir, capsys):
    """An unset `$MODEL` must not quietly score with the config's model; every load failure names the spec."""
    source = tmp_path / "in.jsonl"
    write_rows(source, [{"prompt": "ok", "response": "yes", "followup": "fine"}])
    no_tokenizer = tmp_path / "weights-only"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    for spec, says in [("", "the model spec is empty"), (str(source), f"cannot load model '{source}': "),
                       (str(no_tokenizer), f"cannot load model '{no_tokenizer}': ")]:
        assert main(["advantages", str(source), "--out", str(tmp_path / "out.jsonl"), "--model", spec]) == 2
        assert capsys.readouterr().err.startswith(f"sdpo: error: {says}")
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("same_as", ["--out", "input"])
def test_the_page_never_replaces_the_results_or_the_input(tmp_path, sdpo_home, no_model, capsys, same_as):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_rows(source, [{"prompt": "ok", "response": "yes", "followup": "fine"}])
    before = source.read_text()
    page = out if same_as == "--out" else tmp_path / "." / "in.jsonl"  # the same file under another spelling
    assert main(["advantages", str(source), "--out", str(out), "--html", str(page)]) == 2
    assert "is the same file as" in capsys.readouterr().err and source.read_text() == before and not out.exists()


def test_a_missing_response_is_generated_from_the_prompt_it_is_scored_under(tiny_model_dir, sdpo_home, tmp_path, monkeypatch):
    """A context longer than `targets.max_prompt_tokens` is scored on its cut student prompt; generating from the
    whole context would answer text the scored prompt never shows (and can pass the model's window)."""
    from sdpo_platform import advantages

    seen = []
    real = advantages.generate_continuation

    def spy(model, tokenizer, prompt_ids, *args):
        seen.append(list(prompt_ids))
        return real(model, tokenizer, prompt_ids, *args)

    monkeypatch.setattr(advantages, "generate_continuation", spy)
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    long_context = [{"role": "user", "content": "old question " * 300}, {"role": "assistant", "content": "old answer " * 300},
                    {"role": "user", "content": "And now? " * 10}]
    write_rows(source, [{"messages": long_context, "followup": "Shorter."}])
    assert main(["advantages", str(source), "--out", str(out), "--model", str(tiny_model_dir)]) == 0
    row = json.loads(out.read_text())
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = TargetsConfig()
    scored = encode_interaction(tok, long_context, row["response"], "Shorter.", cfg.template, cfg.max_prompt_tokens, cfg.max_response_tokens)
    assert seen == [scored.student_prompt_ids] and len(seen[0]) <= cfg.max_prompt_tokens


def test_bugs_keep_their_traceback(tmp_path, monkeypatch):
    """Only input errors become one line; anything else is a bug and must surface whole."""

    def broken(*args):
        raise KeyError("bug")

    monkeypatch.setattr("sdpo_platform.advantages.run", broken)
    with pytest.raises(KeyError):
        main(["advantages", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl")])


def test_system_turns_are_dropped_and_a_final_assistant_turn_is_the_response():
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "followup": "ok"}
    assert context_and_response(row) == ([{"role": "user", "content": "Hi"}], "Hello")
    assert context_and_response(row | {"response": "Hello"}) == ([{"role": "user", "content": "Hi"}], "Hello")  # our own output
    blank = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}], "followup": "ok"}
    assert context_and_response(blank | {"response": "Generated"})[1] == "Generated"  # `sdpo informativeness` wrote it
    assert context_and_response(blank)[1] == " "


def test_output_with_raw_line_separators_reads_back(tiny_model_dir, sdpo_home, tmp_path):
    """JSON strings may hold U+2028, U+2029 and U+0085 raw (`--out` writes them so): they are not line ends."""
    source, first, second, labelled = (tmp_path / name for name in ("in.jsonl", "a.jsonl", "b.jsonl", "c.jsonl"))
    row = {"prompt": "line one\u2028line two", "response": "a\x85b", "followup": "fine\u2029thanks"}
    source.write_text(json.dumps(row, ensure_ascii=False) + "\r\n", encoding="utf-8")
    assert main(["advantages", str(source), "--out", str(first), "--model", str(tiny_model_dir)]) == 0
    assert "\u2028" in first.read_text(encoding="utf-8")  # written raw: the round trip below is a real test
    assert main(["advantages", str(first), "--out", str(second), "--model", str(tiny_model_dir)]) == 0
    again = json.loads(second.read_text(encoding="utf-8"))
    assert {k: again[k] for k in row} == row and again["advantages"] == json.loads(first.read_text(encoding="utf-8"))["advantages"]
    assert main(["informativeness", str(first), "--out", str(labelled), "--model", str(tiny_model_dir)]) == 0
    assert json.loads(labelled.read_text(encoding="utf-8"))["prompt"] == row["prompt"]


@pytest.mark.parametrize("option", ["--out", "--html"])
def test_an_unwritable_output_is_refused_before_the_model_loads(tmp_path, sdpo_home, no_model, capsys, option):
    source = tmp_path / "in.jsonl"
    write_rows(source, [{"prompt": "ok", "response": "yes", "followup": "fine"}])
    paths = {"--out": str(tmp_path / "out.jsonl"), "--html": str(tmp_path / "page.html")}
    (tmp_path / "a-file").write_text("x")
    paths[option] = str(tmp_path / "a-file" / "file")
    assert main(["advantages", str(source), "--out", paths["--out"], "--html", paths["--html"]]) == 2
    assert f"{option} {paths[option]}: {tmp_path / 'a-file'} is not a folder" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_a_failed_run_leaves_the_previous_output(tiny_model_dir, sdpo_home, tmp_path, monkeypatch):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_rows(source, [{"prompt": "ok", "response": "yes", "followup": "fine"}])
    out.write_text("previous results\n")

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("sdpo_platform.heatmap.html.escape", crash)  # fails while the page is rendered
    with pytest.raises(RuntimeError):
        main(["advantages", str(source), "--out", str(out), "--html", str(tmp_path / "p.html"), "--model", str(tiny_model_dir)])
    assert out.read_text() == "previous results\n" and [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_long_responses_are_scored_as_training_scores_them_and_marked(tiny_model_dir, sdpo_home, tmp_path, monkeypatch):
    monkeypatch.delenv("SDPO_CONFIG", raising=False)  # defaults: max_response_tokens 128
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_rows(source, [{"prompt": "Count.", "response": "one two three four. " * 60, "followup": "Shorter."},
                        {"prompt": "Hi", "response": "Hello!", "followup": "ok"}])
    page = tmp_path / "out.html"
    assert main(["advantages", str(source), "--out", str(out), "--html", str(page), "--model", str(tiny_model_dir)]) == 0
    long, short = [json.loads(line) for line in out.read_text().splitlines()]
    assert page.read_text().count("response cut at the length limit") == 1  # the page says which row was cut
    assert long["truncated"] is True and len(long["tokens"]) == TargetsConfig().max_response_tokens
    eos = AutoTokenizer.from_pretrained(tiny_model_dir).eos_token
    assert long["tokens"][-1] != eos and long["response"].startswith("".join(long["tokens"]))  # its start, no EOS
    assert short["truncated"] is False and short["tokens"][-1] == eos and "".join(short["tokens"][:-1]) == "Hello!"


def test_the_principles_preamble_is_scored_as_training_scores_it(tiny_model_dir, sdpo_home, tmp_path, monkeypatch):
    """With the preamble on, the targets asset scores under it: so must the command."""
    from sdpo_platform.safety import principled_template

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"informativeness": {"principles_preamble": True}}))
    monkeypatch.setenv("SDPO_CONFIG", str(config))
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    row = {"prompt": "What is the capital of Australia?", "response": "Sydney.", "followup": "Wrong, it is Canberra."}
    write_rows(source, [row])
    assert main(["advantages", str(source), "--out", str(out), "--model", str(tiny_model_dir)]) == 0
    model, tok = load_model(str(tiny_model_dir))
    cfg = TargetsConfig()
    enc = encode_interaction(tok, [{"role": "user", "content": row["prompt"]}], row["response"], row["followup"],
                             principled_template(cfg.template), cfg.max_prompt_tokens, cfg.max_response_tokens)
    expected = (response_logprobs(model, enc.teacher_prompt_ids, enc.response_ids) - response_logprobs(model, enc.student_prompt_ids, enc.response_ids)).detach().numpy()
    np.testing.assert_allclose(json.loads(out.read_text())["advantages"], expected, atol=1e-4)


def test_progress_bars_on_a_terminal(tiny_model_dir, sdpo_home, tmp_path, monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    source = tmp_path / "in.jsonl"
    write_rows(source, [{"prompt": f"Question {i}", "followup": "Shorter."} for i in range(3)] + [{"prompt": "Hi", "response": "Hello", "followup": "ok"}])
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert main(["advantages", str(source), "--out", str(tmp_path / "out.jsonl"), "--model", str(tiny_model_dir)]) == 0
    shown = terminal.getvalue()
    assert "generating responses" in shown and "3/3" in shown and "scoring" in shown and "4/4" in shown and "tokens_per_s" in shown


@pytest.mark.parametrize("stops", [False, True])
def test_a_generation_the_limit_cut_is_scored_without_eos_even_when_its_text_is_shorter(tiny_model_dir, stops):
    """decode + strip can drop a cut generation's edge whitespace, so its text fits with an EOS: the
    generator's own word (it hit max_new_tokens) decides."""
    import torch

    from sdpo_platform.advantages import score_rows

    model, tok = load_model(str(tiny_model_dir))
    cfg = TargetsConfig(max_response_tokens=16)
    words = tok("Here are the steps you need to follow to get this working on your machine", add_special_tokens=False)["input_ids"]
    paragraph = tok("\n\n", add_special_tokens=False)["input_ids"]
    generated = words[: 15] + [tok.eos_token_id] if stops else words[: 16 - len(paragraph)] + paragraph  # 16 ids
    model.generate = lambda input_ids, max_new_tokens, **kw: torch.cat([input_ids, torch.tensor([generated[:max_new_tokens]])], 1)

    [row] = score_rows([{"prompt": "How do I set this up?", "followup": "Go on."}], model, tok, cfg)
    assert row["truncated"] is (not stops) and (row["tokens"][-1] == tok.eos_token) is stops
    assert len(row["tokens"]) == (16 if stops else 16 - len(paragraph))  # cut: its text, no EOS
