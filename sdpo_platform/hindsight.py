"""The one place the student and hindsight-teacher prompts are built; every stage calls these.

The teacher is the same model with the follow-up o folded into the *last user turn* of x through a
template; it never sees the response y in its context. y is tokenized once and the same ids are scored
after both prompts, so teacher and student log-probs line up token for token.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sdpo_platform.prefix_tree import common_prefix_length

Message = dict[str, str]

# Bumped whenever encode_interaction's output changes for the same inputs, so stored target shards are
# recomputed rather than reused (2: left truncation cuts both prompts at the same token; 3: a response cut
# at the limit gets no EOS, and special-token text in a response is tokenized as text).
PROMPT_ENCODING_VERSION = 3


@dataclass(frozen=True)
class EncodedInteraction:
    """Token ids for one (x, y, o): both prompts end with the assistant generation prompt; y ends in EOS
    unless `truncated`."""

    student_prompt_ids: list[int]
    teacher_prompt_ids: list[int]
    response_ids: list[int]
    other_teacher_prompt_ids: tuple[list[int], ...] = ()  # the teacher prompt with each of `other_followups`
    truncated: bool = False  # y and its EOS did not fit: `response_ids` is y's start, without EOS


def _check_context(context: list[Message]) -> list[Message]:
    messages = [{"role": m["role"], "content": m["content"]} for m in context]
    if not messages or messages[0]["role"] != "user" or messages[-1]["role"] != "user":
        raise ValueError("context must start and end with a user message")
    return messages


def student_messages(context: list[Message]) -> list[Message]:
    """x as chat messages (a validated copy; callers may mutate it)."""
    return _check_context(context)


def teacher_messages(context: list[Message], followup: str, template: str) -> list[Message]:
    """x with its last user message replaced by `template.format(last_user=..., followup=o)`."""
    messages = _check_context(context)
    messages[-1]["content"] = template.format(last_user=messages[-1]["content"], followup=followup)
    return messages


def template_hash(template: str) -> str:
    """12-hex id of the template text; target rows carry it so a changed wording never mixes sets."""
    return hashlib.sha256(template.encode("utf-8")).hexdigest()[:12]


def _prompt_ids(tokenizer, messages: list[Message]) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def encode_interaction(
    tokenizer,
    context: list[Message],
    response: str,
    followup: str,
    template: str,
    max_prompt_tokens: int,
    max_response_tokens: int,
    other_followups: tuple[str, ...] | list[str] = (),
    complete: bool = True,
) -> EncodedInteraction:
    """Student prompt, teacher prompt and response ids for one interaction (and the teacher prompt with
    each of `other_followups`, e.g. a neutral "OK." baseline or control follow-ups).

    The response is tokenized once without special tokens. When it fits with its EOS
    (`tokenizer.eos_token_id`, the chat template's end of turn) it ends with it, so stopping is learned
    too. When it does not (`max_response_tokens` ids or more), its first `max_response_tokens` ids are
    kept *without* EOS and the encoding is `truncated`: the logged answer did not stop there, and an EOS
    after the cut would teach the student to stop mid-answer wherever the teacher's follow-up favours
    stopping ("too long"). At the default 128 tokens that is most ShareGPT answers (201 of the
    benchmark's 256). A response known to be cut already (`complete=False`: a generation that hit its
    token limit) is `truncated` whatever its length. Special-token text in the response (a literal
    "<|im_end|>") is tokenized as text: only the appended EOS is an end of turn.

    Prompt truncation: while the teacher prompt (the longer of the two) exceeds `max_prompt_tokens`,
    the oldest exchange of x (up to its next user turn) is dropped, for both prompts alike, so teacher and student
    always see the same conversation. Once only the last user turn is left and the teacher is still too
    long, the same number of leading ids is cut from both prompts: they keep starting at the same token
    of x (the teacher sees exactly the student's context plus o, and the scoring engine can still run
    that common prefix once). The hindsight block sits at the end of the teacher's last user turn, so it
    survives. Only a follow-up so long that the cut would reach past the common prefix makes each prompt
    keep its own last `max_prompt_tokens` ids. Other follow-ups' prompts take part in both rules (the
    longest prompt of all decides), so every branch sees the same conversation and a baseline measures
    the follow-up alone, not a context one branch kept and another lost.
    """
    if max_response_tokens < 1 or max_prompt_tokens < 1:
        raise ValueError("max_prompt_tokens and max_response_tokens must be positive")
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token_id")
    response_ids = list(tokenizer(response, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    truncated = len(response_ids) >= max_response_tokens or not complete
    response_ids = response_ids[:max_response_tokens] if truncated else response_ids + [tokenizer.eos_token_id]

    context = _check_context(context)
    while True:
        prompts = [_prompt_ids(tokenizer, student_messages(context))]
        prompts += [_prompt_ids(tokenizer, teacher_messages(context, o, template)) for o in (followup, *other_followups)]
        later_user_turns = [i for i, m in enumerate(context) if m["role"] == "user" and i > 0]
        if max(map(len, prompts)) <= max_prompt_tokens or not later_user_turns:
            break
        context = context[later_user_turns[0] :]  # drop the oldest exchange; x still starts with a user turn
    cut = max(map(len, prompts)) - max_prompt_tokens
    if cut > 0 and cut < common_prefix_length(*prompts):
        prompts = [prompt[cut:] for prompt in prompts]
    student, teacher, *others = [prompt[-max_prompt_tokens:] for prompt in prompts]
    return EncodedInteraction(
        student_prompt_ids=student,
        teacher_prompt_ids=teacher,
        response_ids=response_ids,
        other_teacher_prompt_ids=tuple(others),
        truncated=truncated,
    )
