"""The hindsight prompt: o folded into the last user turn, y scored on identical ids, truncation keeps x's end."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from sdpo_platform.config import DEFAULT_HINDSIGHT_TEMPLATE
from sdpo_platform.hindsight import common_prefix_length, encode_interaction, student_messages, teacher_messages, template_hash

CONTEXT = [
    {"role": "user", "content": "What is the capital of Australia?"},
    {"role": "assistant", "content": "Sydney."},
    {"role": "user", "content": "And of New Zealand?"},
]
RESPONSE = "The capital of New Zealand is Wellington."
FOLLOWUP = "Wrong earlier, the capital of Australia is Canberra."
GENERATION_PROMPT = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_teacher_replaces_only_the_last_user_turn():
    student = student_messages(CONTEXT)
    teacher = teacher_messages(CONTEXT, FOLLOWUP, DEFAULT_HINDSIGHT_TEMPLATE)
    assert student == CONTEXT
    assert teacher[:-1] == CONTEXT[:-1]
    assert teacher[-1]["role"] == "user"
    assert teacher[-1]["content"].startswith(CONTEXT[-1]["content"] + "\n\n<hindsight context>")
    assert teacher[-1]["content"].endswith(FOLLOWUP)
    assert CONTEXT[-1]["content"] == "And of New Zealand?"  # callers' context is not mutated


@pytest.mark.parametrize("bad", [[], [{"role": "assistant", "content": "hi"}], CONTEXT[:2]])
def test_context_must_start_and_end_with_user(bad):
    with pytest.raises(ValueError):
        student_messages(bad)


def test_template_hash_is_stable_and_tells_templates_apart():
    assert template_hash(DEFAULT_HINDSIGHT_TEMPLATE) == template_hash(str(DEFAULT_HINDSIGHT_TEMPLATE))
    assert template_hash(DEFAULT_HINDSIGHT_TEMPLATE) != template_hash(DEFAULT_HINDSIGHT_TEMPLATE + " ")


def test_hindsight_sits_inside_the_last_user_turn(tokenizer):
    enc = encode_interaction(tokenizer, CONTEXT, RESPONSE, FOLLOWUP, DEFAULT_HINDSIGHT_TEMPLATE, 384, 128)
    teacher = tokenizer.decode(enc.teacher_prompt_ids)
    student = tokenizer.decode(enc.student_prompt_ids)

    last_user = teacher.rindex("<|im_start|>user\n" + CONTEXT[-1]["content"])
    hindsight = teacher.index("<hindsight context>")
    followup = teacher.index(FOLLOWUP)
    end_of_user_turn = teacher.index("<|im_end|>", last_user)
    generation = teacher.rindex(GENERATION_PROMPT)
    assert last_user < hindsight < followup < end_of_user_turn < generation
    assert teacher.endswith(GENERATION_PROMPT) and student.endswith(GENERATION_PROMPT)
    assert RESPONSE not in teacher  # the teacher never sees y in its context
    assert "<hindsight context>" not in student and FOLLOWUP not in student
    assert CONTEXT[-1]["content"] in student


def test_response_is_tokenized_once_and_ends_with_eos(tokenizer):
    enc = encode_interaction(tokenizer, CONTEXT, RESPONSE, FOLLOWUP, DEFAULT_HINDSIGHT_TEMPLATE, 384, 128)
    plain = tokenizer(RESPONSE, add_special_tokens=False)["input_ids"]
    assert enc.response_ids == plain + [tokenizer.eos_token_id] and not enc.truncated


def test_a_response_cut_at_the_limit_gets_no_eos(tokenizer):
    """The logged answer did not stop at the cut: an EOS there would teach stopping mid-answer."""
    plain = tokenizer(RESPONSE, add_special_tokens=False)["input_ids"]
    encode = lambda limit: encode_interaction(tokenizer, CONTEXT, RESPONSE, FOLLOWUP, DEFAULT_HINDSIGHT_TEMPLATE, 384, limit)
    assert (encode(4).response_ids, encode(4).truncated) == (plain[:4], True)
    fits = encode(len(plain) + 1)  # the response and its EOS fill the limit exactly
    assert (fits.response_ids, fits.truncated) == (plain + [tokenizer.eos_token_id], False)
    no_room = encode(len(plain))  # every token fits, its EOS does not: the stop is not learned
    assert (no_room.response_ids, no_room.truncated) == (plain, True)
    empty = encode_interaction(tokenizer, CONTEXT, "", FOLLOWUP, DEFAULT_HINDSIGHT_TEMPLATE, 384, 1)
    assert (empty.response_ids, empty.truncated) == ([tokenizer.eos_token_id], False)


def test_truncation_drops_oldest_turns_and_keeps_the_last_user_turn(tokenizer):
    long_context = [
        {"role": "user", "content": "First question about gardening " * 10},
        {"role": "assistant", "content": "A long gardening answer " * 10},
    ] + CONTEXT
    full = encode_interaction(tokenizer, long_context, RESPONSE, FOLLOWUP, DEFAULT_HINDSIGHT_TEMPLATE, 10_000, 128)
    budget = len(full.teacher_prompt_ids) - 5
    enc = encode_interaction(tokenizer, long_context, RESPONSE, FOLLOWUP, DEFAULT_HINDSIGHT_TEMPLATE, budget, 128)
    teacher, student = tokenizer.decode(enc.teacher_prompt_ids), tokenizer.decode(enc.student_prompt_ids)

    assert len(enc.teacher_prompt_ids) <= budget and len(enc.student_prompt_ids) <= budget
    for prompt in (teacher, student):
        assert "gardening" not in prompt  # the oldest exchange went first, for both prompts alike
        assert CONTEXT[0]["content"] in prompt  # the rest of x is still there, starting with a user turn
        assert CONTEXT[-1]["content"] in prompt
    assert FOLLOWUP in teacher


def test_left_truncation_when_the_last_user_turn_alone_is_too_long(tokenizer):
    context = [{"role": "user", "content": "word " * 300 + "final question?"}]
    enc = encode_interaction(tokenizer, context, RESPONSE, FOLLOWUP, DEFAULT_HINDSIGHT_TEMPLATE, 64, 128)
    assert len(enc.teacher_prompt_ids) == 64 and len(enc.student_prompt_ids) < 64
    # both windows start at the same token of x: they differ only from the end of the last user message on
    tail = len(tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=True, return_dict=False))
    assert common_prefix_length(enc.student_prompt_ids, enc.teacher_prompt_ids) >= len(enc.student_prompt_ids) - tail
    teacher, student = tokenizer.decode(enc.teacher_prompt_ids), tokenizer.decode(enc.student_prompt_ids)
    assert teacher.endswith(FOLLOWUP + "<|im_end|>\n" + GENERATION_PROMPT)
    assert student.endswith("final question?<|im_end|>\n" + GENERATION_PROMPT)


def test_a_followup_longer_than_the_budget_falls_back_to_separate_windows(tokenizer):
    context = [{"role": "user", "content": "short question?"}]
    enc = encode_interaction(tokenizer, context, RESPONSE, "complaint " * 200, DEFAULT_HINDSIGHT_TEMPLATE, 64, 128)
    assert len(enc.teacher_prompt_ids) == 64
    assert tokenizer.decode(enc.student_prompt_ids).endswith("short question?<|im_end|>\n" + GENERATION_PROMPT)


def test_other_followups_are_cut_with_the_real_one_so_every_branch_sees_the_same_conversation(tokenizer):
    """A neutral or control follow-up is a baseline for the real one: if the long real follow-up drops an
    old exchange, the short baseline prompt must drop it too, or the baseline measures a context change."""
    long_context = [
        {"role": "user", "content": "First question about gardening " * 10},
        {"role": "assistant", "content": "A long gardening answer " * 10},
    ] + CONTEXT
    long_followup = "No, you ignored what I said about the capitals. " * 4
    fits_neutral = encode_interaction(tokenizer, long_context, RESPONSE, "OK.", DEFAULT_HINDSIGHT_TEMPLATE, 10_000, 128)
    budget = len(fits_neutral.teacher_prompt_ids) + 5  # the neutral prompt alone would keep the first exchange
    enc = encode_interaction(tokenizer, long_context, RESPONSE, long_followup, DEFAULT_HINDSIGHT_TEMPLATE, budget, 128, ("OK.",))
    [neutral] = enc.other_teacher_prompt_ids
    kept = [m for m in long_context if "gardening" not in m["content"]]
    assert neutral == tokenizer.apply_chat_template(teacher_messages(kept, "OK.", DEFAULT_HINDSIGHT_TEMPLATE), add_generation_prompt=True, tokenize=True, return_dict=False)
    assert all("gardening" not in tokenizer.decode(p) for p in (enc.student_prompt_ids, enc.teacher_prompt_ids, neutral))
    alone = encode_interaction(tokenizer, long_context, RESPONSE, long_followup, DEFAULT_HINDSIGHT_TEMPLATE, budget, 128)
    assert (alone.student_prompt_ids, alone.teacher_prompt_ids) == (enc.student_prompt_ids, enc.teacher_prompt_ids)

    # left-truncated alike: all three start at the same token of x
    context = [{"role": "user", "content": "word " * 300 + "final question?"}]
    enc = encode_interaction(tokenizer, context, RESPONSE, FOLLOWUP, DEFAULT_HINDSIGHT_TEMPLATE, 64, 128, ("OK.", "Thanks!"))
    prompts = (enc.student_prompt_ids, enc.teacher_prompt_ids, *enc.other_teacher_prompt_ids)
    tail = len(tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=True, return_dict=False))
    assert max(map(len, prompts)) == 64 and common_prefix_length(*prompts) >= len(enc.student_prompt_ids) - tail


def test_special_token_text_in_a_response_is_text_and_a_known_cut_gets_no_eos(tokenizer):
    eos_text = tokenizer.eos_token
    enc = encode_interaction(tokenizer, CONTEXT, f"Sure{eos_text} more", FOLLOWUP, DEFAULT_HINDSIGHT_TEMPLATE, 384, 128)
    assert enc.response_ids.count(tokenizer.eos_token_id) == 1 and enc.response_ids[-1] == tokenizer.eos_token_id
    cut = encode_interaction(tokenizer, CONTEXT, "Short.", FOLLOWUP, DEFAULT_HINDSIGHT_TEMPLATE, 384, 128, complete=False)
    assert cut.truncated and cut.response_ids == tokenizer("Short.", add_special_tokens=False)["input_ids"]
