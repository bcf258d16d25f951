"""Raw → conversations → interactions at scale: the platform's DuckDB stages vs per-record Python.

Generates WildChat-shaped JSONL files (100k conversations per file; 2–10 messages, log-normal message
lengths, ~5 % Spanish, ~1 % with an e-mail/phone/card, ~0.5 % re-sent duplicates, ~0.2 % broken
lines, timestamps over 30 days), then, each in its own process so peak RSS is per run:

1. the platform on all files: `ingest_files` → `build_conversations` → `extract_interactions` → `CHECKPOINT`
   (default config, DuckDB `memory_limit` as given), conversations/s and peak RSS; the final checkpoint is timed
   because data still in the write-ahead log is not written yet (it was left untimed before 2026-11-27);
2. the platform on the first file only (100k), and
3. a straightforward per-record Python implementation of the same rules on that same file
   (json.loads, the same PII patterns with `re` + Luhn and the other candidate masks, merge rule,
   filters, language heuristic, exact dedup, triples), so the ratio compares like with like in the
   same run, and
4. the same Python with the PII module's literal cues as gates (a pattern runs only on texts holding
   one of its cues), the SQL's one optimization that a Python loop can copy: the ratio against it
   says what the engine, not the gating, buys.

    python bench/bench_ingest.py --n 100000 --keep DIR   # side-by-side ratio (figures in docs/BENCHMARKS.md)
    python bench/bench_ingest.py --n 1000000 --keep DIR --skip-python   # 1M: conversations/s and peak RSS
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PER_FILE = 100_000
EN_WORDS = ("the of and to a in is you that it for on with as are this be at have from or can your will not by "
            "what how please write code function python list data file error example make use explain why when "
            "which should would could help me my we they there about more some time like just also need want "
            "story email text question answer value table model user system number string return class test "
            "thanks great good better new first last other into than then them these those very well only").split()
ES_WORDS = ("el la de que y en los las por para con una un es pero más muy cómo qué también hay puede son sobre "
            "esto este esta yo tu mi código función lista datos archivo ejemplo escribe explica").split()


def _corpus(words: list[str], chars: int, rng: random.Random) -> str:
    out, size = [], 0
    while size < chars:
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(6, 18))).capitalize() + ". "
        out.append(sentence)
        size += len(sentence)
    return "".join(out)


def generate(out_dir: Path, n: int, seed: int = 0) -> list[Path]:
    """`n` WildChat-shaped conversations in files of PER_FILE lines."""
    rng = random.Random(seed)
    en, es = _corpus(EN_WORDS, 4_000_000, rng), _corpus(ES_WORDS, 1_000_000, rng)
    turn_weights = [0.45, 0.25, 0.15, 0.10, 0.05]
    paths, recent = [], []
    for start in range(0, n, PER_FILE):
        path = out_dir / f"wildchat_{start // PER_FILE:03d}.jsonl"
        with open(path, "w", encoding="utf-8") as out:
            for i in range(start, min(n, start + PER_FILE)):
                day = 1 + i % 30
                stamp = f"2024-04-{day:02d} {i % 24:02d}:{i % 60:02d}:00+00:00"
                if rng.random() < 0.002:
                    out.write('{"conversation_hash": "broken", "conversation": [\n')
                    continue
                if recent and rng.random() < 0.005:
                    conversation = rng.choice(recent)  # the same chat sent again
                else:
                    corpus = es if rng.random() < 0.05 else en
                    users = rng.choices(range(1, 6), turn_weights)[0]
                    roles = ["user", "assistant"] * users + (["user"] if rng.random() < 0.1 else [])
                    conversation = []
                    for role in roles[:10]:
                        mean = 120 if role == "user" else 700
                        length = max(2, min(int(rng.lognormvariate(0, 0.9) * mean), 9000))
                        offset = rng.randrange(0, len(corpus) - length)
                        conversation.append({"role": role, "content": corpus[offset:offset + length], "timestamp": stamp,
                                             "language": "English", "toxic": False, "redacted": False})
                    if rng.random() < 0.01:
                        conversation[0]["content"] += f" Contact me at user{i}@example.com or 555-{i % 900 + 100}-4567."
                    if len(recent) < 1000:
                        recent.append(conversation)
                record = {"conversation_hash": hashlib.md5(str(i).encode()).hexdigest(), "model": "gpt-3.5-turbo",
                          "timestamp": stamp, "conversation": conversation, "turn": len(conversation) // 2,
                          "language": "English", "toxic": False, "redacted": False, "state": "Bavaria",
                          "country": "Germany", "hashed_ip": hashlib.sha1(str(i % 50_000).encode()).hexdigest()}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
        paths.append(path)
    return paths


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_platform(files: list[str], home: str, memory_limit: str) -> dict:
    from sdpo_platform.cleaning import build_conversations
    from sdpo_platform.config import PlatformConfig
    from sdpo_platform.ingest import ingest_files
    from sdpo_platform.interactions import extract_interactions
    from sdpo_platform.warehouse import connect, stats

    cfg = PlatformConfig()
    con = connect(Path(home) / "warehouse.duckdb", memory_limit=memory_limit)
    times = {}
    started = time.perf_counter()
    ingested = ingest_files(con, files, cfg=cfg.ingest)
    times["ingest_s"] = time.perf_counter() - started
    mark = time.perf_counter()
    cleaned = build_conversations(con, cfg.cleaning, ingested.partitions)
    times["clean_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    extracted = extract_interactions(con, cfg.interactions, ingested.partitions)
    times["interactions_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    con.execute("CHECKPOINT").fetchall()  # what is still only in the WAL gets written too: the work is not done before
    times["checkpoint_s"] = time.perf_counter() - mark
    total = time.perf_counter() - started
    numbers = stats(con)
    return {**{k: round(v, 1) for k, v in times.items()}, "total_s": round(total, 1),
            "raw_records": ingested.records_new, "conversations_per_s": round(ingested.records_new / total),
            "kept": cleaned.kept, "quarantined": cleaned.quarantined, "interactions": extracted.total,
            "by_reason": cleaned.by_reason, "reconciles": numbers["raw_records"] == numbers["records_kept"] + numbers["quarantined"],
            "peak_rss_mb": round(peak_rss_mb())}


# ---- the same rules, one record at a time, in plain Python -------------------------------------------

def _python_rules(gated: bool = False):
    from sdpo_platform import pii
    from sdpo_platform.config import CleaningConfig
    from sdpo_platform.interactions import ACKNOWLEDGEMENT_PATTERN, FEEDBACK_PATTERN
    from sdpo_platform.language import STOPWORDS

    cfg = CleaningConfig()
    # the module's patterns; `gated`: also its cues (a kind runs only on texts holding one of them, the digit kinds only
    # on texts with a digit), the one optimization of the SQL that plain Python can copy line for line
    patterns = [(kind, placeholder, re.compile(pattern), [c for c in cues if c != pii.DIGITS])
                for kind, placeholder, pattern, cues in pii.PATTERNS]

    stop = {}
    for lang, words in STOPWORDS.items():
        for word in words:
            stop.setdefault(word, set()).add(lang)
    word_re, ack_re, feedback_re = re.compile(r"[^\W\d_]+"), re.compile(ACKNOWLEDGEMENT_PATTERN), re.compile(FEEDBACK_PATTERN)

    def has_digit(text: str) -> bool:
        return any(digit in text for digit in "0123456789")

    def luhn(candidate: str) -> bool:
        digits = [int(c) for c in candidate if c.isdigit()][::-1]
        total = sum(d if i % 2 == 0 else (d * 2 - 9 if d >= 5 else d * 2) for i, d in enumerate(digits))
        return total % 10 == 0 and any(digits)

    def card(candidate: str, placeholder: str) -> str:  # a 4-4-4-4 card may carry a short group that is not its own
        if luhn(candidate):
            return placeholder
        return placeholder + candidate[19:] if len(candidate) > 19 and luhn(candidate[:19]) else candidate

    def bearer(candidate: str, placeholder: str) -> str:  # the token must look like a credential
        token = candidate[6:].lstrip(" \t\n\f\r")
        credential = has_digit(candidate) or (len(token) >= 20 and token.lower() != token and token.upper() != token)
        return placeholder if credential else candidate

    masks = {"credit_card": card, "bearer_token": bearer}

    def redact(text: str) -> tuple[str, int]:
        found = 0
        for kind, placeholder, regex, cues in patterns:
            if gated and ((cues and not any(cue in text for cue in cues)) or (kind in pii._DIGIT_KINDS and not has_digit(text))):
                continue
            if kind in masks:
                new = regex.sub(lambda m: masks[kind](m.group(0), placeholder), text)
            else:
                new = regex.sub((r"\g<keep>" if "(?P<keep>" in regex.pattern else "") + placeholder, text)
            found += new.count(placeholder) - text.count(placeholder)
            text = new
        return text, found

    def language(sample: str) -> str:
        letters = [c for c in sample if c.isalpha()]
        if not letters:
            return "und"
        count = lambda lo, hi: sum(lo <= c <= hi for c in letters)  # noqa: E731
        if count("\u3040", "\u30ff") >= 0.1 * len(letters):
            return "ja"
        if count("\uac00", "\ud7af") >= 0.3 * len(letters):
            return "ko"
        if count("\u4e00", "\u9fff") >= 0.3 * len(letters):
            return "zh"
        if count("\u0400", "\u04ff") >= 0.3 * len(letters):
            return "ru"
        words = word_re.findall(sample.lower())
        hits: dict[str, int] = {}
        for word in words:
            for lang in stop.get(word, ()):
                hits[lang] = hits.get(lang, 0) + 1
        if not hits:
            return "und"
        best = max(sorted(hits), key=lambda lang: (hits[lang], lang == "en"))
        return best if hits[best] >= cfg.language_min_stopword_share * len(words) else "und"

    return cfg, redact, language, ack_re, feedback_re


def run_python(files: list[str], gated: bool = False) -> dict:
    cfg, redact, language, ack_re, feedback_re = _python_rules(gated)
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
             "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system"}
    started = time.perf_counter()
    raw = kept = 0
    by_reason: dict[str, int] = {}
    seen_hashes: set[str] = set()
    conversations, interactions = [], []

    def reject(reason: str) -> None:
        by_reason[reason] = by_reason.get(reason, 0) + 1

    for path in files:
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                if not line.strip():
                    continue
                raw += 1
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    reject("invalid_json")
                    continue
                items = record.get("conversation") if isinstance(record, dict) else None
                if not isinstance(items, list):
                    reject("unknown_schema")
                    continue
                messages, problem = [], None
                for item in items:
                    role = roles.get(str(item.get("role", "")).strip().lower()) if isinstance(item, dict) else None
                    if role is None:
                        problem = problem or "unknown_role"
                        continue
                    if not isinstance(item.get("content"), str):
                        problem = problem or "invalid_content"
                        continue
                    text, _ = redact(item["content"])
                    if text.strip():
                        messages.append([role, text])
                if problem:
                    reject(problem)
                    continue
                systems = [m for m in messages if m[0] == "system"]
                merged: list[list[str]] = []
                for role, text in (m for m in messages if m[0] != "system"):
                    if merged and merged[-1][0] == role:
                        merged[-1][1] += "\n\n" + text
                    else:
                        merged.append([role, text])
                if not merged:
                    reject("empty_conversation")
                elif merged[0][0] == "assistant":
                    reject("starts_with_assistant")
                elif len(merged) < cfg.min_messages:
                    reject("too_few_messages")
                elif max(len(t) for _, t in systems + merged) > cfg.max_message_chars:
                    reject("message_too_long")
                elif sum(len(t) for _, t in systems + merged) > cfg.max_conversation_chars:
                    reject("conversation_too_long")
                elif language("\n".join(t for _, t in merged)[: cfg.language_sample_chars]) not in cfg.languages:
                    reject("language")
                else:
                    normalized = "\x1e".join(r + "\x1f" + " ".join(t.split()).lower() for r, t in systems + merged)
                    digest = hashlib.sha256(normalized.encode()).hexdigest()
                    if digest in seen_hashes:
                        reject("duplicate")
                        continue
                    seen_hashes.add(digest)
                    kept += 1
                    conversations.append(merged)
                    for k in range(1, len(merged) - 1):
                        if merged[k][0] == "assistant" and merged[k + 1][0] == "user":
                            context = merged[max(0, k - 5):k]
                            while context and context[0][0] != "user":
                                context = context[1:]
                            followup = merged[k + 1][1]
                            normalized = " ".join(re.sub(r"[^\w\s]+", " ", followup.lower()).split())
                            flag = ("too_short" if len(followup.strip()) < 2 else "acknowledgement" if ack_re.search(normalized)
                                    else "feedback" if feedback_re.search(normalized) else "other")
                            interactions.append((context, merged[k][1], followup, flag))
    total = time.perf_counter() - started
    return {"total_s": round(total, 1), "raw_records": raw, "conversations_per_s": round(raw / total), "kept": kept,
            "quarantined": raw - kept, "interactions": len(interactions), "by_reason": by_reason, "peak_rss_mb": round(peak_rss_mb())}


def _in_child(mode: str, files: list[str], memory_limit: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="sdpo-bench-") as home:
        command = [sys.executable, __file__, "--child", mode, "--memory-limit", memory_limit, "--home", home, *files]
        output = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "SDPO_HOME": home})
        if output.returncode:
            raise SystemExit(f"{mode} run failed:\n{output.stderr[-4000:]}")
        return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--memory-limit", default="1GB", help="DuckDB buffer pool cap (spills beyond it)")
    parser.add_argument("--keep", help="generate into (or reuse) this folder instead of a temporary one")
    parser.add_argument("--skip-python", action="store_true")
    parser.add_argument("--child", choices=["platform", "python", "python_gated"], help=argparse.SUPPRESS)
    parser.add_argument("--home", help=argparse.SUPPRESS)
    parser.add_argument("files", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "platform":
        print(json.dumps(run_platform(args.files, args.home, args.memory_limit)))
        return
    if args.child in ("python", "python_gated"):
        print(json.dumps(run_python(args.files, gated=args.child == "python_gated")))
        return

    with tempfile.TemporaryDirectory(prefix="sdpo-bench-data-") as tmp:
        data = Path(args.keep or tmp)
        data.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        files = sorted(str(p) for p in data.glob("wildchat_*.jsonl"))
        if len(files) * PER_FILE < args.n:
            files = [str(p) for p in generate(data, args.n)]
        files = files[: -(-args.n // PER_FILE)]
        size_mb = sum(os.path.getsize(f) for f in files) / 1e6
        print(f"data: {len(files)} files, {size_mb:.0f} MB ({time.perf_counter() - started:.0f}s to prepare)", flush=True)
        report = {"n": args.n, "input_mb": round(size_mb), "memory_limit": args.memory_limit, "cpus": os.cpu_count()}
        report["platform_all"] = _in_child("platform", files, args.memory_limit)
        print(json.dumps(report["platform_all"]), flush=True)
        report["platform_subset"] = _in_child("platform", files[:1], args.memory_limit)
        print(json.dumps(report["platform_subset"]), flush=True)
        if not args.skip_python:
            report["python_subset"] = _in_child("python", files[:1], args.memory_limit)
            print(json.dumps(report["python_subset"]), flush=True)
            report["speedup_subset"] = round(report["python_subset"]["total_s"] / report["platform_subset"]["total_s"], 2)
            report["python_gated_subset"] = _in_child("python_gated", files[:1], args.memory_limit)
            print(json.dumps(report["python_gated_subset"]), flush=True)
            report["speedup_subset_gated"] = round(report["python_gated_subset"]["total_s"] / report["platform_subset"]["total_s"], 2)
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
