"""Tiny chat logs in three formats, with the kinds of bad lines real inboxes contain."""

from __future__ import annotations

import json
from pathlib import Path

TOPICS = [
    ("How do I reverse a list in Python?", "You can call reversed() on the list or use slicing with a step of minus one.", "That is too long, please give me just the code."),
    ("What is the capital of Australia?", "The capital of Australia is Sydney, which is also its largest city.", "That's wrong, the capital is Canberra."),
    ("Write a short greeting for my team.", "Hello team, I hope you all have a wonderful and productive week ahead.", "Make it more formal, please."),
    ("Explain what a hash table is.", "A hash table stores key and value pairs and uses a hash function to find the slot for each key.", "Can you give an example in Java?"),
    ("Suggest a name for my new bakery.", "How about calling it The Golden Crust, which sounds warm and inviting?", "I would like something shorter and funnier."),
    ("How many legs does a spider have?", "A spider has six legs, like all other insects in the garden.", "No, spiders have eight legs and they are not insects."),
    ("Summarize the plot of Hamlet in one sentence.", "A prince seeks revenge on his uncle for murdering his father, and the quest ends in tragedy for the whole court.", "Thanks, that is perfect."),
    ("Give me a tip for sleeping better.", "Try to keep a regular schedule and avoid screens for an hour before you go to bed.", "What about drinking coffee in the evening?"),
    ("Translate good morning into French.", "Good morning in French is bonjour, which you can use until the early afternoon.", "And how do I say good night?"),
    ("What is the boiling point of water?", "Water boils at one hundred degrees Celsius at sea level under normal atmospheric pressure.", "Please answer in Fahrenheit instead."),
    ("Recommend a book about the history of science.", "You might enjoy A Short History of Nearly Everything by Bill Bryson, which is funny and clear.", "I have already read that one, give me another."),
    ("How do I boil an egg?", "Place the egg in boiling water for about nine minutes, then cool it in cold water before peeling.", "I wanted a soft boiled egg, not a hard one."),
]


def sharegpt_record(i: int, prompt: str, answer: str, followup: str) -> dict:
    return {
        "id": f"sg{i}",
        "conversations": [
            {"from": "human", "value": prompt},
            {"from": "gpt", "value": answer},
            {"from": "human", "value": followup},
            {"from": "gpt", "value": "Sure, here is a better answer that takes your message into account."},
        ],
    }


def openai_record(prompt: str, answer: str, followup: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": followup},
        ]
    }


FIXTURE_DAY = "2026-01-05"  # the records carry no timestamps: their partition is the files' arrival day


def arrived_on(path: Path, day: str) -> None:
    """Set a file's mtime to noon UTC of `day` (its arrival day, hence its partition)."""
    import datetime as dt
    import os

    noon = dt.datetime.fromisoformat(day).replace(hour=12, tzinfo=dt.timezone.utc).timestamp()
    os.utime(path, (noon, noon))


def write_inbox(inbox: Path, day: str = FIXTURE_DAY) -> dict:
    """Writes a mixed inbox (arrived on `day`) and returns the counts a correct pipeline must reconcile to.

    Prompts mention the day, so inboxes of different days are not duplicates of each other."""
    inbox.mkdir(parents=True, exist_ok=True)
    topics = [(f"{prompt} (asked on {day})", answer, followup) for prompt, answer, followup in TOPICS]
    sharegpt = [json.dumps(sharegpt_record(i, *t)) for i, t in enumerate(topics[:8])]
    sharegpt.insert(3, '{"id": "broken", "conversations": [')  # truncated line
    sharegpt.append(json.dumps({"id": "short", "conversations": [{"from": "human", "value": "hi there friend"}]}))
    (inbox / "sharegpt.jsonl").write_text("\n".join(sharegpt) + "\n")
    openai = [json.dumps(openai_record(*t)) for t in topics[8:]]
    openai.append(json.dumps({"messages": [{"role": "user", "content": 42}]}))  # wrong type
    (inbox / "openai.jsonl").write_text("\n".join(openai) + "\n")
    arrived_on(inbox / "sharegpt.jsonl", day)
    arrived_on(inbox / "openai.jsonl", day)
    return {"raw_records": len(sharegpt) + len(openai), "good_conversations": len(TOPICS)}


def write_garbage_inbox(inbox: Path, day: str = FIXTURE_DAY, name: str = "garbage.jsonl") -> Path:
    """A file in which no record is usable: the conversations check of its day must fail."""
    inbox.mkdir(parents=True, exist_ok=True)
    path = inbox / name
    path.write_text("not json\n{\"foo\": 1}\n[1, 2, 3]\n")
    arrived_on(path, day)
    return path


def tiny_config(path: Path, model_dir: Path) -> Path:
    """A platform config that runs the whole lineage in seconds on the tiny random model."""
    config = {
        "model": str(model_dir),
        "interactions": {"validation_fraction": 0.35},
        "targets": {"max_prompt_tokens": 96, "max_response_tokens": 24, "max_train": 8, "max_validation": 4},
        "training": {"steps": 2, "batch_size": 2, "weighting": "informativeness"},
        "registry": {"model_name": "sdpo-test", "serve_max_new_tokens": 12},
    }
    path.write_text(json.dumps(config))
    return path
