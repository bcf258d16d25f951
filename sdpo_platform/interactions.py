"""`conversations` → `interactions`: the (x, y, o) triples SDPO learns from, in DuckDB SQL.

Every assistant message followed by a user message yields one triple:
- y: that assistant message; `turn_index` is its 0-based position in `conversations.messages`;
- o: the next non-system message, which must be from the user (the last assistant turn yields none);
- x: the messages before y with system messages dropped, the last `max_context_messages` of them,
  then trimmed so that x starts with a user turn. Cleaning merged same-role runs, so x alternates and
  ends with the user turn that y answers.

`interaction_id = conversation_id || ':' || turn_index`. The split is an md5 bucket (stable across
DuckDB versions) of the conversation's near-duplicate key (`cleaning.py`), not of its id: a
conversation never straddles train and validation, neither do a conversation and its near-duplicates
(a prompt re-sent in another file or partition), and the split depends only on content, so the same
logs split the same way wherever the files or the data root live.

Informativeness is a first rule-based flag (a later stage refines it): a follow-up is uninformative if it
is a bare acknowledgement ("thanks!", "OK, great.") once lower-cased and stripped of punctuation, or
shorter than `min_followup_chars`; otherwise it is 'feedback' when it opens like a correction or request
for change ("no, ...", "that's wrong", "make it shorter", ...) and 'other' else.

A conversation that yields no triple (e.g. two messages) gets an 'interactions'-stage quarantine row
'no_interactions', so `conversations = with interactions + quarantined` can be checked.
Partitions: a call rebuilds the triples (and 'interactions' quarantine rows) of the given daily
partitions (a triple's partition is its conversation's; all when None), whole partitions at a time in
batches of about `batch_conversations` conversations, each batch in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import duckdb

from sdpo_platform.config import InteractionConfig
from sdpo_platform.progress import Progress
from sdpo_platform.warehouse import fetch_scalar, partition_batches, run_steps, stage_partitions

STAGE = "interactions"

# Whole follow-ups made only of these (after lower-casing and dropping punctuation) carry no feedback.
ACKNOWLEDGEMENT_PATTERN = (
    r"^((ok|okay|k|kk|thanks|thank you|thank u|thx|ty|tysm|great|cool|nice|good|perfect|awesome|amazing|"
    r"excellent|wonderful|fantastic|got it|i see|sounds good|yes|yep|yeah|yup|sure|alright|all right|fine|"
    r"so much|a lot|very much|much|wow|lol|haha|hmm|ah|oh|that s|this is|it|good job|well done|"
    r"appreciate it|cheers|noted|understood)\s*)+$"
)
# Openings of corrections and change requests.
FEEDBACK_PATTERN = (
    r"^(no|nope|not|wrong|incorrect|that s (not|wrong|incorrect)|this is (not|wrong)|it s (not|wrong)|"
    r"you (are|re) wrong|actually|instead|but|why|try again|again|make it|rewrite|rephrase|shorter|longer|"
    r"too|please (make|change|fix|rewrite|shorten|add|remove|use|don t|do not)|change|fix|don t|do not|"
    r"doesn t|does not|didn t|did not|can you (make|change|fix|rewrite|shorten)|that doesn t|it doesn t|"
    r"i (said|asked|meant|wanted))\b"
)


@dataclass
class InteractionResult:
    conversations: int = 0  # conversations read
    total: int = 0  # triples extracted
    informative: int = 0
    train: int = 0
    validation: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)  # informative_reason → count
    examples: list[dict] = field(default_factory=list)  # one triple per informative_reason
    partitions: list[str] = field(default_factory=list)  # ISO days rebuilt


_STEPS = [
    "DELETE FROM interactions WHERE partition_date BETWEEN $first_day::DATE AND $last_day::DATE AND list_contains($parts::DATE[], partition_date)",
    # Triples straight from each conversation's message list: list functions per row, no unnest of every
    # message, no windows over them and no join back (what made this stage cost as much as cleaning).
    """
    INSERT INTO interactions (interaction_id, conversation_id, turn_index, context, response, followup,
                              informative, informative_reason, split, partition_date)
    WITH conversation_turns AS (  -- the non-system messages, each with its 0-based position in `messages`
        SELECT conversation_id, partition_date, coalesce(near_key, conversation_id) AS split_key,
            list_filter(list_transform(messages, lambda m, i: {'role': m.role, 'content': m.content, 'turn_index': (i - 1)::INTEGER}),
                        lambda t: t.role <> 'system') AS turns
        FROM conversations WHERE partition_date BETWEEN $first_day::DATE AND $last_day::DATE AND list_contains($parts::DATE[], partition_date)
    ),
    responses AS (  -- y = turns[k] from the assistant whose next turn, o = turns[k + 1], is the user's
        SELECT conversation_id, partition_date, split_key, turns,
            unnest(list_filter(range(1, len(turns)), lambda k: turns[k].role = 'assistant' AND turns[k + 1].role = 'user')) AS k
        FROM conversation_turns
    ),
    windows AS (  -- x = the last max_context_messages turns before y ...
        SELECT conversation_id, partition_date, split_key, turns[k].turn_index AS turn_index, turns[k].content AS response,
            turns[k + 1].content AS followup, turns[greatest(1, k - $max_context_messages):k - 1] AS recent
        FROM responses
    ),
    triples AS (  -- ... from its first user turn on (no user turn among them: no triple)
        SELECT * EXCLUDE (recent, first_user),
            list_transform(recent[first_user:], lambda t: {'role': t.role, 'content': t.content}) AS context
        FROM (SELECT *, list_position(list_transform(recent, lambda t: t.role), 'user') AS first_user FROM windows)
        WHERE first_user IS NOT NULL
    ),
    judged AS (
        SELECT *,
            CASE WHEN length(trim(followup)) < $min_followup_chars THEN 'too_short'
                 WHEN regexp_matches(normalized, $ack_pattern) THEN 'acknowledgement'
                 WHEN regexp_matches(normalized, $feedback_pattern) THEN 'feedback'
                 ELSE 'other' END AS reason
        FROM (SELECT *, trim(regexp_replace(regexp_replace(lower(followup), '[^\\pL\\pN\\s]+', ' ', 'g'), '\\s+', ' ', 'g')) AS normalized
              FROM triples)
    )
    SELECT conversation_id || ':' || turn_index, conversation_id, turn_index, context, response, followup,
           reason IN ('feedback', 'other'), reason,
           CASE WHEN (md5_number(split_key) % 1000000) / 1000000.0 < $validation_fraction
                THEN 'validation' ELSE 'train' END,
           partition_date
    FROM judged
    """,
    "DELETE FROM quarantine WHERE stage = $stage AND partition_date BETWEEN $first_day::DATE AND $last_day::DATE AND list_contains($parts::DATE[], partition_date)",
    """
    INSERT INTO quarantine (record_id, stage, reason, detail, source_file, line_no, partition_date, level)
    SELECT c.record_id, $stage, 'no_interactions',
           format('{} messages, no assistant turn followed by a user turn', c.n_messages), c.source_file, c.line_no,
           c.partition_date, 'record'
    FROM conversations c
    ANTI JOIN (SELECT conversation_id FROM interactions  -- a triple's partition is its conversation's
               WHERE partition_date BETWEEN $first_day::DATE AND $last_day::DATE AND list_contains($parts::DATE[], partition_date)) i
        USING (conversation_id)
    WHERE c.partition_date BETWEEN $first_day::DATE AND $last_day::DATE AND list_contains($parts::DATE[], c.partition_date)
    """,
]

_TEMP_TABLES: list[str] = []  # the stage needs no intermediate tables


def extract_interactions(con: duckdb.DuckDBPyConnection, cfg: InteractionConfig | None = None,
                         partitions: list[str] | None = None, progress: Progress | None = None) -> InteractionResult:
    """Rebuild `interactions` (and the stage's quarantine rows) for `partitions` (ISO days; None = all).
    `progress(conversations done, conversations total)` is called after each batch of days."""
    cfg = cfg or InteractionConfig()
    if cfg.max_context_messages < 1:
        raise ValueError("max_context_messages must be at least 1 (x must hold the user turn y answers)")
    if partitions is None:
        partitions = stage_partitions(con, [("conversations", "true"), ("interactions", "true"),
                                            ("quarantine", "stage = 'interactions'")])
    partitions = sorted({str(day) for day in partitions})
    params = {
        "stage": STAGE,
        "max_context_messages": cfg.max_context_messages,
        "validation_fraction": cfg.validation_fraction,
        "min_followup_chars": cfg.min_followup_chars,
        "ack_pattern": ACKNOWLEDGEMENT_PATTERN,
        "feedback_pattern": FEEDBACK_PATTERN,
    }
    total = InteractionResult(partitions=partitions)
    batches = partition_batches(con, "conversations", partitions, cfg.batch_conversations)
    conversations_total, conversations_done = sum(rows for _, rows in batches), 0
    for batch, rows in batches:
        scope = {"parts": batch, "first_day": batch[0], "last_day": batch[-1]}  # the range lets scans skip row groups
        part = run_steps(con, _STEPS, {**params, **scope}, _TEMP_TABLES, lambda c, b=batch: _summarize(c, b))
        for name in ("conversations", "total", "informative", "train", "validation"):
            setattr(total, name, getattr(total, name) + getattr(part, name))
        for key, value in part.by_reason.items():
            total.by_reason[key] = total.by_reason.get(key, 0) + value
        seen = {row["informative_reason"] for row in total.examples}
        total.examples += [row for row in part.examples if row["informative_reason"] not in seen]
        conversations_done += rows
        if progress is not None:
            progress(conversations_done, conversations_total)
    total.by_reason = dict(sorted(total.by_reason.items(), key=lambda kv: (-kv[1], kv[0])))
    return total


def _summarize(con: duckdb.DuckDBPyConnection, parts: list[str]) -> InteractionResult:
    """Counts over the batch's partitions only."""
    scope = {"parts": parts}
    conversations = fetch_scalar(con, "SELECT count(*) FROM conversations WHERE list_contains($parts::DATE[], partition_date)", scope)
    total, informative, train, validation = con.execute(
        """SELECT count(*), count(*) FILTER (WHERE informative),
                  count(*) FILTER (WHERE split = 'train'), count(*) FILTER (WHERE split = 'validation')
           FROM interactions WHERE list_contains($parts::DATE[], partition_date)""", scope
    ).fetchall()[0]
    by_reason = dict(con.execute(
        """SELECT informative_reason, count(*) FROM interactions WHERE list_contains($parts::DATE[], partition_date)
           GROUP BY 1 ORDER BY count(*) DESC, 1""", scope
    ).fetchall())
    columns = ["interaction_id", "informative_reason", "split", "n_context", "last_user", "response", "followup"]
    examples = con.execute(
        """
        SELECT interaction_id, informative_reason, split, len(context), left(context[-1].content, 160),
               left(response, 160), left(followup, 160)
        FROM interactions WHERE list_contains($parts::DATE[], partition_date)
        QUALIFY row_number() OVER (PARTITION BY informative_reason ORDER BY interaction_id) = 1
        ORDER BY informative_reason
        """, scope
    ).fetchall()
    return InteractionResult(
        conversations=conversations,
        total=total,
        informative=informative,
        train=train,
        validation=validation,
        by_reason=by_reason,
        examples=[dict(zip(columns, row)) for row in examples],
    )
