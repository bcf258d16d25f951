"""`raw_records` → `conversations`: parse, normalize, redact and filter chat logs in DuckDB SQL.

Partitions: a call rebuilds the conversations and the 'conversations' quarantine rows of the given
daily partitions (all when None), batch by batch (whole partitions, about `batch_records` raw records
per transaction, so memory stays bounded on a backfill). Within the rebuilt partitions every raw record
ends up either in exactly one kept conversation (`conversations.record_ids`) or with exactly one
record-level quarantine row carrying the *first* failing reason, in this order:

  invalid_utf8 / record_too_large (read errors from ingestion) → invalid_json → unknown_schema →
  duplicate_id (a ShareGPT chunk index seen twice) → unknown_role → invalid_content → empty_conversation →
  starts_with_assistant → too_few_messages → message_too_long → conversation_too_long → language →
  duplicate → duplicate_id

so `raw records = records in kept conversations + quarantined records`. The work follows the same order:
PII redaction, merging, lengths and language are only computed for records that passed the rules before
them (none of these can change an earlier rule's verdict), so most rejected records never pay for them.
Dropped blank messages get a message-level row ('empty_message', `level = 'message'`, `message_index`)
that does not count as a record.

Formats (the file's, from ingestion, when a record has that shape, else the record's own shape; a
record of no known shape is `unknown_schema`): ShareGPT
`conversations: [{from, value}]`, OpenAI `messages: [{role, content}]` (content a string or a list of
text parts, joined with a newline; any other part type is `invalid_content`), WildChat
`conversation: [{role, content}]`, HH-RLHF transcripts (`chosen`, else `transcript`/`text`) split at
"\\n\\nHuman: " / "\\n\\nAssistant: ".

ShareGPT chunks: records of one file and partition whose ids are `X_0, X_1, ...` form one conversation
(messages in chunk order, `source_id = X`); it is kept or rejected as a whole, and each chunk record
counts as one raw record (so such a conversation accounts for several raw records). Nothing in the ids tells
such chunks from sources whose `X_N` ids are separate conversations (FastChat's `identity_N`; the real dumps'
suffixes are message offsets, with gaps), so `join_sharegpt_chunks` is a setting.

Normalization, in order:
- roles: human/user → user; gpt/assistant/chatgpt/bard/bing/model → assistant; system → system; any
  other role quarantines the record (`unknown_role`); non-string content (number, object, null) is
  `invalid_content`;
- PII is redacted in every message (`pii.py`: typed placeholders, counts in `pii_counts`); user ids
  (WildChat `hashed_ip`, `user_id`, OpenAI `user`) are replaced by sha256(`user_id_salt`, id), and so is a
  source id that holds PII (`'sha256:' || hash`: still one identity for `duplicate_id`);
- an HH transcript's text before its first turn marker is dropped with a message-level row
  ('text_before_first_turn');
- empty or whitespace messages are dropped;
- consecutive messages of the same role are merged, joined with a blank line ("\\n\\n"), so user and
  assistant strictly alternate. Runs are computed over the non-system messages (a system message in
  between does not break a run), and system messages are moved to the front, in their order. Length
  filters apply to the merged messages, which is what training sees; `min_messages` does not count
  system messages;
- conversation_id is the record_id of the (first) record: unique and stable even when sources reuse ids.

Language: `language.py` (a SQL heuristic with a measured accuracy).

Exact duplicates: same content hash (roles + redacted contents, lower-cased, whitespace removed),
across all partitions: a conversation whose hash is already kept in another partition, or earlier in
(partition, file, line) order in the rebuilt ones, is a `duplicate`. A conversation whose source id
(same format) is already used by a kept conversation with different content is a `duplicate_id`. Both
name that conversation in `quarantine.duplicate_of`, so that a day whose originals vanish is found
stale and rebuilt (`stale.py`).

Near-duplicates are flagged, not removed: `near_key` = sha256 of the first `near_duplicate_chars`
characters of the first user turn and of the first assistant turn, lower-cased, keeping letters only
(digits, punctuation and whitespace dropped); a kept conversation whose key matches an earlier kept one (another partition, or
earlier in order) gets `near_duplicate_of` = that conversation. It catches re-sent prompts that differ
in case, spacing, punctuation, numbers or in later turns; it does not catch paraphrases.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import duckdb

from sdpo_platform import language, pii
from sdpo_platform.config import CleaningConfig
from sdpo_platform.progress import Progress
from sdpo_platform.warehouse import fetch_scalar, partition_batches, run_steps, stage_partitions

STAGE = "conversations"

USER_ROLES = ["human", "user"]
ASSISTANT_ROLES = ["gpt", "assistant", "chatgpt", "bard", "bing", "model"]
STOPWORDS = language.STOPWORDS  # kept importable from here


@dataclass
class CleaningResult:
    raw_records: int = 0  # raw records in the rebuilt partitions
    kept: int = 0  # conversations kept
    quarantined: int = 0  # raw records rejected (record level)
    records_kept: int = 0  # raw records inside kept conversations (> kept when ShareGPT chunks were joined)
    messages_dropped: int = 0  # blank messages (and HH text before the first turn) dropped from records
    by_reason: dict[str, int] = field(default_factory=dict)  # record-level reason → raw records
    languages: dict[str, int] = field(default_factory=dict)  # detected among records that reached the language step
    partitions: list[str] = field(default_factory=list)  # ISO days rebuilt
    examples: list[dict] = field(default_factory=list)  # a few kept conversations and one record per reason


# placeholder counts per kind, summed over a unit's messages (`per_message`: one pii_counts struct each, or NULL)
_PII_SUM = "{" + ", ".join(f"{kind}: coalesce(list_sum(list_transform(per_message, lambda c: c.{kind})), 0)::INTEGER"
                           for kind in pii.KINDS) + "}"  # fixed identifiers


def _merged_sql(usable: str) -> str:
    """SQL turning the list column `usable` ({role, content} in order) into the stored messages: system messages
    first, then each run of same-role turns joined by a blank line. `usable` is a fixed column name."""
    turns = f"list_filter({usable}, lambda m: m.role <> 'system')"
    return f"""list_filter({usable}, lambda m: m.role = 'system') || list_transform([{turns}], lambda turns:
        list_transform([list_filter(range(1, len(turns) + 1), lambda i: i = 1 OR turns[i].role <> turns[i - 1].role)], lambda starts:
            list_transform(range(1, len(starts) + 1), lambda k: {{
                'role': turns[starts[k]].role,
                'content': array_to_string(list_transform(turns[starts[k]:coalesce(starts[k + 1] - 1, len(turns))],
                                                          lambda m: m.content), chr(10) || chr(10))}}))[1])[1]"""

# The start of a text for a quarantine detail: redacted *before* it is cut (a cut e-mail no longer matches the
# pattern), and when cut, without its last, possibly partial, token or digit group.
_SAFE_PREVIEW = r"""
CREATE OR REPLACE TEMP MACRO sdpo_safe_preview(s, n) AS (list_transform([sdpo_redact_pii(left(s, 8 * n))], lambda h:
    CASE WHEN length(h) <= n AND length(s) <= 8 * n THEN h
         ELSE regexp_replace(left(h, n), '[\d\s()+.-]*[^\s",;{}\[\]<>]*$', '') || '…' END)[1])
"""

_STEPS = [
    # 1. The batch's raw records, each parsed once (json_transform into the fields any format needs, values kept
    #    as JSON so that their types can still be judged); the record's shape must be its file's format.
    """
    CREATE OR REPLACE TEMP TABLE clean_records AS
    WITH parsed AS (
        SELECT record_id, source_file, line_no, partition_date,
               source_format AS file_format, read_error, raw_text,
               read_error IS NULL AND json_valid(raw_text) AS valid,
               CASE WHEN NOT valid THEN sdpo_safe_preview(raw_text, 120) END AS raw_preview,  -- for the detail of a line that does not parse
               CASE WHEN valid THEN json_transform(raw_text, '{"conversation": ["JSON"], "conversations": ["JSON"], "messages": ["JSON"],
                   "chosen": "JSON", "transcript": "JSON", "text": "JSON", "id": "JSON", "conversation_id": "JSON",
                   "conversation_hash": "JSON", "hashed_ip": "JSON", "user_id": "JSON", "user": "JSON"}') END AS doc
        FROM raw_records WHERE partition_date BETWEEN $first_day::DATE AND $last_day::DATE AND list_contains($parts::DATE[], partition_date)
    ),
    typed AS (  -- a valid document that starts with '{' is an object: json_type (another parse) only for the rest
        SELECT *, CASE WHEN valid THEN CASE WHEN starts_with(raw_text, '{') THEN 'OBJECT' ELSE json_type(raw_text) END END AS top_type
        FROM parsed
    ),
    shaped AS (  -- a list field is non-NULL exactly when the document holds a JSON array there
        SELECT *,
            CASE WHEN top_type <> 'OBJECT' THEN NULL
                 WHEN file_format = 'wildchat' AND doc.conversation IS NOT NULL THEN 'wildchat'
                 WHEN file_format = 'sharegpt' AND doc.conversations IS NOT NULL THEN 'sharegpt'
                 WHEN file_format = 'openai' AND doc.messages IS NOT NULL THEN 'openai'
                 WHEN doc.conversation IS NOT NULL THEN 'wildchat'
                 WHEN doc.conversations IS NOT NULL THEN 'sharegpt'
                 WHEN doc.messages IS NOT NULL THEN 'openai'
                 WHEN regexp_matches(coalesce(doc.chosen->>'$', doc.transcript->>'$', doc.text->>'$', ''), '(^|\n\n)Human: ')
                 THEN 'hh_rlhf' END AS source_format,
            CASE WHEN top_type = 'OBJECT' THEN coalesce(doc.id->>'$', doc.conversation_id->>'$', doc.conversation_hash->>'$') END AS raw_source_id,
            CASE WHEN top_type = 'OBJECT' THEN coalesce(doc.hashed_ip->>'$', doc.user_id->>'$', doc.user->>'$') END AS user_key
        FROM typed
    ),
    chunked AS (
        SELECT * EXCLUDE (raw_text, valid, doc),
            CASE source_format WHEN 'sharegpt' THEN doc.conversations WHEN 'openai' THEN doc.messages
                               WHEN 'wildchat' THEN doc.conversation END AS items,  -- each item's JSON text
            CASE WHEN source_format = 'hh_rlhf' THEN coalesce(doc.chosen->>'$', doc.transcript->>'$', doc.text->>'$') END AS transcript,
            CASE WHEN top_type = 'OBJECT' AND source_format IS NULL THEN json_keys(raw_text)[:12] END AS top_keys,  -- for the detail
            CASE WHEN source_format = 'sharegpt' AND $join_sharegpt_chunks THEN nullif(regexp_extract(raw_source_id, '^(.+)_([0-9]+)$', 1), '') END AS chunk_base,
            CASE WHEN source_format = 'sharegpt' AND $join_sharegpt_chunks THEN try_cast(regexp_extract(raw_source_id, '^(.+)_([0-9]+)$', 2) AS INTEGER) END AS chunk_no
        FROM shaped
    ),
    chunk_units AS (  -- windows over the (few, narrow) chunked rows only: the wide rows never get sorted
        SELECT record_id,
            arg_min(record_id, (chunk_no, line_no)) OVER (PARTITION BY partition_date, source_file, chunk_base) AS unit_id,
            row_number() OVER (PARTITION BY partition_date, source_file, chunk_base, chunk_no ORDER BY line_no) > 1 AS repeated_chunk
        FROM (SELECT record_id, partition_date, source_file, chunk_base, chunk_no, line_no FROM chunked WHERE chunk_base IS NOT NULL)
    )
    SELECT c.* EXCLUDE (chunk_base, chunk_no),
        list_transform([coalesce(c.chunk_base, c.raw_source_id)], lambda id:
            CASE WHEN sdpo_redact_pii(id) = id THEN id ELSE 'sha256:' || sha256($user_id_salt || chr(31) || id) END)[1] AS source_id,
        coalesce(c.chunk_no, 0) AS chunk_no,
        CASE WHEN c.transcript IS NOT NULL AND NOT regexp_matches(c.transcript, '^(Human|Assistant):')  -- text before the first turn
             THEN list_filter([regexp_extract(c.transcript, '(?s)^(.*?)\n\n(?:Human|Assistant):', 1)], lambda t: regexp_matches(t, '\S'))[1]
             END AS preamble,
        coalesce(u.unit_id, c.record_id) AS unit_id,
        coalesce(u.repeated_chunk, false) AS repeated_chunk
    FROM chunked c LEFT JOIN chunk_units u USING (record_id)
    """,
    # 2. One row per source message: role normalized (NULL = unknown), content type checked.
    """
    CREATE OR REPLACE TEMP TABLE clean_messages AS
    WITH json_items AS (
        SELECT unit_id, record_id, chunk_no, source_format, (i - 1)::INTEGER AS pos, item
        FROM (SELECT unit_id, record_id, chunk_no, source_format, unnest(items) AS item, generate_subscripts(items, 1) AS i
              FROM clean_records WHERE items IS NOT NULL AND NOT repeated_chunk)
    ),
    item_fields AS (  -- one parse per item; types from the first character of the JSON text, json_type only for the rare rest
        SELECT *,
            CASE WHEN item IS NULL THEN 'NULL' WHEN starts_with(item, '{') THEN 'OBJECT' ELSE json_type(item) END AS item_type,
            json_transform(item, '{"role": "JSON", "from": "JSON", "content": "JSON", "value": "JSON"}') AS f
        FROM json_items
    ),
    item_values AS (
        SELECT unit_id, record_id, chunk_no, pos, item_type,
            CASE source_format WHEN 'sharegpt' THEN f.from ELSE f.role END->>'$' AS raw_role,
            CASE source_format WHEN 'sharegpt' THEN f.value ELSE f.content END AS content_json,
            CASE WHEN content_json IS NULL  -- absent, or JSON null: only the item itself tells which
                 THEN CASE source_format WHEN 'sharegpt' THEN json_type(item, '$.value') ELSE json_type(item, '$.content') END
                 WHEN starts_with(content_json, '"') THEN 'VARCHAR'
                 WHEN starts_with(content_json, '[') THEN 'ARRAY'
                 ELSE json_type(content_json) END AS json_content_type
        FROM item_fields
    ),
    json_messages AS (
        SELECT unit_id, record_id, chunk_no, pos, item_type, raw_role,
            CASE json_content_type
                 WHEN 'VARCHAR' THEN 'VARCHAR'
                 WHEN 'ARRAY' THEN CASE WHEN list_bool_and(list_transform(json_extract(content_json, '$[*]'), lambda p:
                                            json_type(p) = 'VARCHAR'
                                            OR (json_type(p) = 'OBJECT' AND p->>'type' = 'text' AND json_type(p, '$.text') = 'VARCHAR')))
                                       THEN 'VARCHAR' ELSE 'ARRAY with a non-text part' END
                 ELSE coalesce(json_content_type, 'missing') END AS content_type,
            CASE json_content_type
                 WHEN 'ARRAY' THEN array_to_string(list_transform(json_extract(content_json, '$[*]'), lambda p:
                                       CASE WHEN json_type(p) = 'VARCHAR' THEN p->>'$' ELSE p->>'text' END), chr(10))
                 ELSE content_json->>'$' END AS content
        FROM item_values
    ),
    hh_pieces AS (  -- transcript → pieces 'Role<US>text' split at the turn markers
        SELECT unit_id, record_id, chunk_no,
               string_split(regexp_replace(transcript, '(^|\\n\\n)(Human|Assistant): ?', chr(30) || '\\2' || chr(31), 'g'), chr(30)) AS pieces
        FROM clean_records WHERE source_format = 'hh_rlhf'
    ),
    hh_messages AS (
        SELECT unit_id, record_id, chunk_no, (i - 2)::INTEGER AS pos, 'OBJECT' AS item_type,
               split_part(piece, chr(31), 1) AS raw_role, 'VARCHAR' AS content_type,
               substr(piece, strpos(piece, chr(31)) + 1) AS content
        FROM (SELECT unit_id, record_id, chunk_no, unnest(pieces) AS piece, generate_subscripts(pieces, 1) AS i FROM hh_pieces)
        WHERE i > 1  -- the text before the first marker (normally empty)
    ),
    unified AS (SELECT * FROM json_messages UNION ALL SELECT * FROM hh_messages)
    SELECT unit_id, record_id, chunk_no, pos, item_type, raw_role, content_type,
        CASE WHEN lower(trim(raw_role)) IN (SELECT unnest($user_roles::VARCHAR[])) THEN 'user'
             WHEN lower(trim(raw_role)) IN (SELECT unnest($assistant_roles::VARCHAR[])) THEN 'assistant'
             WHEN lower(trim(raw_role)) = 'system' THEN 'system' END AS role,
        CASE WHEN content_type = 'VARCHAR' THEN content END AS content  -- not redacted yet: see step 4
    FROM unified
    """,
    "ALTER TABLE clean_records DROP COLUMN items",  # parsed documents are not needed past this point: free them
    "ALTER TABLE clean_records DROP COLUMN transcript",
    """
    CREATE OR REPLACE TEMP TABLE clean_dropped AS  -- message-level rows: dropped text of records judged as a whole
    SELECT record_id, pos, 'empty_message' AS reason, format('message {} is empty or whitespace; dropped', pos) AS detail
    FROM clean_messages
    WHERE role IS NOT NULL AND content_type = 'VARCHAR' AND NOT regexp_matches(content, '\\S')
    UNION ALL
    SELECT record_id, NULL, 'text_before_first_turn',
           'transcript text before its first "Human:"/"Assistant:" turn; dropped: ' || sdpo_safe_preview(preamble, 120)
    FROM clean_records WHERE preamble IS NOT NULL
    """,
    # 3. One aggregate per conversation unit (the only regrouping of messages): what the checks need from single
    #    messages, and the usable messages in order (unknown roles, bad content and blank messages left out).
    f"""
    CREATE OR REPLACE TEMP TABLE clean_unit_messages AS
    SELECT unit_id,
        arg_min(format('message {{}} has role {{}}', pos, coalesce(raw_role, 'NULL')), (chunk_no, pos))
            FILTER (WHERE item_type = 'OBJECT' AND role IS NULL) AS unknown_role,
        arg_min(format('message {{}} content is {{}}', pos,
                       CASE WHEN item_type <> 'OBJECT' THEN 'not an object: ' || item_type ELSE content_type END), (chunk_no, pos))
            FILTER (WHERE item_type <> 'OBJECT' OR (role IS NOT NULL AND content_type <> 'VARCHAR')) AS invalid_content,
        -- in (chunk, position) order: collected unordered, then sorted per unit by that key (unique within a unit,
        -- so the text never takes part), which costs far less than an ordered aggregate
        list_transform(list_sort(list({{'key': {{'chunk': chunk_no, 'pos': pos}}, 'role': role, 'content': content}})
                                     FILTER (WHERE role IS NOT NULL AND content_type = 'VARCHAR' AND regexp_matches(content, '\\S'))),
                       lambda m: {{'role': m.role, 'content': m.content}}) AS usable
    FROM clean_messages GROUP BY unit_id
    """,
    "DROP TABLE clean_messages",
    # 4. The shape of every unit from its roles alone (no text is touched): what the structural rules need.
    #    Reasons are recorded in a fixed order (module docstring), so a unit that fails one of these rules gets
    #    that reason whatever its text holds: redaction, merging, lengths and language are only computed for the
    #    others ("well formed"). Redaction cannot change these rules' outcome: a placeholder is never blank and
    #    blank text holds no PII, so the usable messages and their roles are the same before and after it.
    """
    CREATE OR REPLACE TEMP TABLE clean_structure AS
    WITH roles AS (
        SELECT unit_id, unknown_role, invalid_content, usable,
            list_transform(list_filter(usable, lambda m: m.role <> 'system'), lambda m: m.role) AS turn_roles,
            len(list_filter(usable, lambda m: m.role = 'system')) AS n_system
        FROM clean_unit_messages
    ),
    runs AS (  -- consecutive same-role turns merge into one message: the turns left = the runs
        SELECT *, len(list_filter(range(1, len(turn_roles) + 1), lambda i: i = 1 OR turn_roles[i] <> turn_roles[i - 1])) AS n_turns
        FROM roles
    ),
    checked AS (
        SELECT *, unknown_role IS NULL AND invalid_content IS NULL AND usable IS NOT NULL
                  AND coalesce(turn_roles[1], '') <> 'assistant' AND n_turns >= $min_messages AS well_formed
        FROM runs
    )
    SELECT unit_id, unknown_role, invalid_content, usable IS NOT NULL AS has_usable, well_formed,
        CASE WHEN usable IS NOT NULL THEN (n_system + n_turns)::INTEGER END AS n_messages, n_turns,
        turn_roles[1] AS first_role,
        n_system > 0 OR n_turns < len(turn_roles) AS needs_merge,  -- else the messages are already in their stored order and shape
        CASE WHEN NOT well_formed THEN usable END AS raw_usable  -- the others' source text, for the examples only
    FROM checked
    """,
    # 4b. Well-formed units only: PII redacted in every message (typed placeholders, counts per kind), runs of the
    #     same role merged per row with list functions (no sort, no regrouping), lengths.
    f"""
    CREATE OR REPLACE TEMP TABLE clean_shapes AS
    WITH redacted AS (
        SELECT unit_id, needs_merge, usable AS raw_usable, list_transform(usable, lambda m: sdpo_redact_pii(m.content)) AS texts
        FROM clean_unit_messages JOIN clean_structure USING (unit_id) WHERE well_formed
    ),
    counted AS (  -- counting placeholders costs two string passes per kind: only where redaction changed a text
        SELECT unit_id, needs_merge,
            list_transform(raw_usable, lambda m, i: {{'role': m.role, 'content': texts[i]}}) AS usable,
            CASE WHEN list_transform(raw_usable, lambda m: m.content) <> texts
                 THEN list_transform(raw_usable, lambda m, i: sdpo_pii_counts(m.content, texts[i])) END AS per_message
        FROM redacted
    ),
    merged AS (
        SELECT unit_id, {_PII_SUM} AS pii_counts, CASE WHEN needs_merge THEN {_merged_sql("usable")} ELSE usable END AS messages
        FROM counted
    )
    SELECT unit_id, messages, list_transform(messages, lambda m: length(m.content)) AS lengths,
        list_sum(lengths)::BIGINT AS n_chars, list_max(lengths) AS longest, pii_counts
    FROM merged
    """,
    "DROP TABLE clean_unit_messages",
    # 5. Language, of the units that passed every rule before it, from the first characters of their
    #    (non-system) messages.
    """
    CREATE OR REPLACE TEMP TABLE clean_samples AS
    SELECT unit_id AS key,  -- each message cut first: the sample's first characters only come from theirs
        left(array_to_string(list_transform(list_filter(messages, lambda m: m.role <> 'system'), lambda m: left(m.content, $sample_chars)),
                             chr(10)), $sample_chars) AS sample
    FROM clean_shapes WHERE longest <= $max_message_chars AND n_chars <= $max_conversation_chars
    """,
    f"""
    CREATE OR REPLACE TEMP TABLE clean_languages AS
    SELECT key AS unit_id, language FROM ({language.language_sql("clean_samples")})
    """,
    # 6. The first failing reason per conversation unit (NULL = kept), with a detail a person can act on.
    """
    CREATE OR REPLACE TEMP TABLE clean_units AS
    WITH units AS (
        SELECT unit_id, any_value(source_format) AS source_format, any_value(source_id) AS source_id,
               any_value(partition_date) AS partition_date, arg_min(source_file, (chunk_no, line_no)) AS source_file,
               min(line_no) AS line_no, list(record_id ORDER BY chunk_no, line_no) AS record_ids,
               any_value(user_key) FILTER (WHERE user_key IS NOT NULL) AS user_key
        FROM clean_records WHERE source_format IS NOT NULL AND NOT repeated_chunk AND read_error IS NULL
        GROUP BY unit_id
    ),
    judged AS (
        SELECT u.*, m.n_messages, s.n_chars, s.pii_counts, l.language,
            CASE WHEN m.unknown_role IS NOT NULL THEN 'unknown_role'
                 WHEN m.invalid_content IS NOT NULL THEN 'invalid_content'
                 WHEN NOT coalesce(m.has_usable, false) THEN 'empty_conversation'
                 WHEN m.first_role = 'assistant' THEN 'starts_with_assistant'
                 WHEN m.n_turns < $min_messages THEN 'too_few_messages'
                 WHEN s.longest > $max_message_chars THEN 'message_too_long'
                 WHEN s.n_chars > $max_conversation_chars THEN 'conversation_too_long'
                 WHEN len($languages::VARCHAR[]) > 0 AND NOT list_contains($languages::VARCHAR[], l.language) THEN 'language'
            END AS reason,
            CASE WHEN m.unknown_role IS NOT NULL THEN m.unknown_role
                 WHEN m.invalid_content IS NOT NULL THEN m.invalid_content
                 WHEN NOT coalesce(m.has_usable, false) THEN 'no non-blank messages'
                 WHEN m.first_role = 'assistant' THEN 'first non-system message is from the assistant'
                 WHEN m.n_turns < $min_messages THEN format('{} user/assistant messages after merging < {}', m.n_turns, $min_messages)
                 WHEN s.longest > $max_message_chars THEN format('longest message {} chars > {}', s.longest, $max_message_chars)
                 WHEN s.n_chars > $max_conversation_chars THEN format('{} chars > {}', s.n_chars, $max_conversation_chars)
                 ELSE 'detected language ' || l.language
            END AS detail
        FROM units u
        LEFT JOIN clean_structure m USING (unit_id)
        LEFT JOIN clean_shapes s USING (unit_id)
        LEFT JOIN clean_languages l USING (unit_id)
    ),
    candidates AS MATERIALIZED (  -- dedup keys, hashed only for the conversations that passed every other check (hashing costs)
        SELECT unit_id, partition_date, source_file, line_no, source_format, source_id,
            sha256(array_to_string(list_transform(messages, lambda m: m.role || chr(31) ||
                list_transform([replace(replace(lower(m.content), ' ', ''), chr(10), '')], lambda t:  -- tabs, CRs: rare, so tested first
                    CASE WHEN contains(t, chr(9)) OR contains(t, chr(13)) THEN replace(replace(t, chr(9), ''), chr(13), '') ELSE t END)[1]),
                chr(30))) AS content_hash,
            sha256(regexp_replace(lower(left(coalesce(messages[list_position(roles, 'user')].content, ''), $near_duplicate_chars)
                                        || left(coalesce(messages[list_position(roles, 'assistant')].content, ''), $near_duplicate_chars)),
                                  '[^\\pL]+', '', 'g')) AS near_key
        FROM (SELECT j.*, s.messages, list_transform(s.messages, lambda m: m.role) AS roles
              FROM judged j JOIN clean_shapes s USING (unit_id) WHERE j.reason IS NULL)
    ),
    elsewhere_hash AS (  -- only the candidates' keys are looked up: the warehouse's other partitions are not regrouped
        SELECT content_hash, min(conversation_id) AS conversation_id FROM conversations
        WHERE NOT list_contains($parts::DATE[], partition_date) AND content_hash IN (SELECT content_hash FROM candidates)
        GROUP BY content_hash
    ),
    elsewhere_id AS (
        SELECT source_format, source_id, min(conversation_id) AS conversation_id FROM conversations
        WHERE NOT list_contains($parts::DATE[], partition_date) AND source_id IN (SELECT source_id FROM candidates)
        GROUP BY ALL
    ),
    firsts AS (  -- the first candidate per content hash and per source id, on the narrow rows (no wide sort)
        SELECT unit_id, content_hash, near_key,
            first_value(unit_id) OVER (PARTITION BY content_hash ORDER BY partition_date, source_file, line_no, unit_id) AS first_of_hash,
            first_value(unit_id) OVER (PARTITION BY source_format, source_id ORDER BY partition_date, source_file, line_no, unit_id) AS first_of_id
        FROM candidates
    ),
    ordered AS (
        SELECT j.*, f.content_hash, f.near_key, f.first_of_hash, f.first_of_id,
            h.conversation_id AS same_hash_elsewhere, i.conversation_id AS same_id_elsewhere
        FROM judged j
        LEFT JOIN firsts f USING (unit_id)
        LEFT JOIN elsewhere_hash h ON j.reason IS NULL AND h.content_hash = f.content_hash
        LEFT JOIN elsewhere_id i ON j.reason IS NULL AND i.source_format = j.source_format AND i.source_id = j.source_id
    )
    SELECT * EXCLUDE (same_hash_elsewhere, same_id_elsewhere, first_of_hash, first_of_id) REPLACE (
        CASE WHEN reason IS NOT NULL THEN reason
             WHEN same_hash_elsewhere IS NOT NULL OR first_of_hash <> unit_id THEN 'duplicate'
             WHEN source_id IS NOT NULL AND (same_id_elsewhere IS NOT NULL OR first_of_id <> unit_id) THEN 'duplicate_id'
        END AS reason,
        CASE WHEN reason IS NOT NULL THEN detail
             WHEN same_hash_elsewhere IS NOT NULL THEN 'same content as conversation ' || same_hash_elsewhere || ' (another partition)'
             WHEN first_of_hash <> unit_id THEN 'same content as conversation ' || first_of_hash
             WHEN source_id IS NOT NULL AND (same_id_elsewhere IS NOT NULL OR first_of_id <> unit_id)
             THEN format('id {} already used by conversation {} with different content', source_id,
                         coalesce(same_id_elsewhere, first_of_id))
        END AS detail),
        CASE WHEN reason IS NOT NULL THEN NULL  -- the kept conversation a duplicate points at (`stale.py` follows it)
             WHEN same_hash_elsewhere IS NOT NULL OR first_of_hash <> unit_id THEN coalesce(same_hash_elsewhere, first_of_hash)
             WHEN source_id IS NOT NULL AND (same_id_elsewhere IS NOT NULL OR first_of_id <> unit_id)
             THEN coalesce(same_id_elsewhere, first_of_id)
        END AS duplicate_of
    FROM ordered
    """,
    # 7. One verdict per raw record: its own read/parse problem, else its conversation's.
    """
    CREATE OR REPLACE TEMP TABLE clean_verdicts AS
    SELECT r.record_id, r.source_file, r.line_no, r.partition_date, r.unit_id,
        CASE WHEN r.read_error IS NOT NULL THEN r.read_error
             WHEN r.top_type IS NULL THEN 'invalid_json'
             WHEN r.source_format IS NULL THEN 'unknown_schema'
             WHEN r.repeated_chunk THEN 'duplicate_id'
             ELSE u.reason END AS reason,
        CASE WHEN r.read_error = 'invalid_utf8' THEN 'line is not valid UTF-8: ' || r.raw_preview
             WHEN r.read_error IS NOT NULL THEN 'record larger than the ingest limit; first chars: ' || r.raw_preview
             WHEN r.top_type IS NULL THEN 'not valid JSON: ' || r.raw_preview
             WHEN r.source_format IS NULL THEN format('no {} shape; top-level type {}{}', coalesce(r.file_format, 'known'),
                  r.top_type, coalesce(', keys ' || array_to_string(r.top_keys, ','), ''))
             WHEN r.repeated_chunk THEN format('chunk {} of {} appears twice in the file', r.chunk_no, r.source_id)
             ELSE u.detail END AS detail,
        CASE WHEN r.read_error IS NULL AND r.top_type IS NOT NULL AND r.source_format IS NOT NULL AND NOT r.repeated_chunk
             THEN u.duplicate_of END AS duplicate_of,
        u.language
    FROM clean_records r LEFT JOIN clean_units u USING (unit_id)
    """,
    "DELETE FROM conversations WHERE partition_date BETWEEN $first_day::DATE AND $last_day::DATE AND list_contains($parts::DATE[], partition_date)",
    # What the interactions stage built from the old conversations goes with them: if that stage does not run
    # next (a failed check blocks it), the day holds no triples rather than triples of conversations now gone.
    "DELETE FROM interactions WHERE partition_date BETWEEN $first_day::DATE AND $last_day::DATE AND list_contains($parts::DATE[], partition_date)",
    "DELETE FROM quarantine WHERE stage = 'interactions' AND partition_date BETWEEN $first_day::DATE AND $last_day::DATE AND list_contains($parts::DATE[], partition_date)",
    """
    INSERT INTO conversations (conversation_id, record_id, source_file, line_no, source_id, source_format, language,
                               messages, n_messages, n_chars, content_hash, partition_date, record_ids, user_hash,
                               pii_counts, near_key, near_duplicate_of)
    WITH kept AS (SELECT u.*, s.messages FROM clean_units u JOIN clean_shapes s USING (unit_id) WHERE u.reason IS NULL),
    elsewhere_near AS (
        SELECT near_key, min(conversation_id) AS conversation_id FROM conversations
        WHERE near_key IN (SELECT near_key FROM kept) GROUP BY near_key
    )
    SELECT k.unit_id, k.unit_id, k.source_file, k.line_no, k.source_id, k.source_format, k.language,
           k.messages, k.n_messages, k.n_chars, k.content_hash, k.partition_date, k.record_ids,
           CASE WHEN k.user_key IS NOT NULL THEN sha256($user_id_salt || chr(31) || k.user_key) END,
           map_from_entries(list_filter(map_entries(k.pii_counts::MAP(VARCHAR, INTEGER)), lambda e: e.value > 0)),
           k.near_key,
           coalesce(e.conversation_id,
                    nullif(first_value(k.unit_id) OVER (PARTITION BY k.near_key ORDER BY k.partition_date, k.source_file, k.line_no, k.unit_id),
                           k.unit_id))
    FROM kept k LEFT JOIN elsewhere_near e USING (near_key)
    """,
    "DELETE FROM quarantine WHERE stage = $stage AND partition_date BETWEEN $first_day::DATE AND $last_day::DATE AND list_contains($parts::DATE[], partition_date)",
    """
    INSERT INTO quarantine (record_id, stage, reason, detail, source_file, line_no, partition_date, level, duplicate_of)
    SELECT record_id, $stage, reason, sdpo_redact_pii(detail), source_file, line_no, partition_date, 'record', duplicate_of
    FROM clean_verdicts WHERE reason IS NOT NULL
    """,
    """
    INSERT INTO quarantine (record_id, stage, reason, detail, source_file, line_no, partition_date, level, message_index)
    SELECT m.record_id, $stage, m.reason, m.detail, r.source_file, r.line_no, r.partition_date, 'message', m.pos
    FROM clean_dropped m JOIN clean_records r USING (record_id)
    """,
]

_TEMP_TABLES = ["clean_records", "clean_messages", "clean_unit_messages", "clean_dropped", "clean_structure", "clean_shapes",
                "clean_samples", "clean_languages", "clean_units", "clean_verdicts", "clean_examples", "clean_example_samples"]


def build_conversations(con: duckdb.DuckDBPyConnection, cfg: CleaningConfig | None = None,
                        partitions: list[str] | None = None, progress: Progress | None = None) -> CleaningResult:
    """Rebuild `conversations` and the stage's quarantine rows for `partitions` (ISO days; None = all).
    `progress(records done, records total)` is called after each batch of days."""
    cfg = cfg or CleaningConfig()
    if partitions is None:
        partitions = stage_partitions(con, [("raw_records", "true"), ("conversations", "true"),
                                            ("quarantine", "stage = 'conversations'")])
    partitions = sorted({str(day) for day in partitions})
    pii.install_macros(con)
    con.execute(_SAFE_PREVIEW).fetchall()
    params = {
        "stage": STAGE,
        "user_roles": USER_ROLES,
        "assistant_roles": ASSISTANT_ROLES,
        "sample_chars": cfg.language_sample_chars,
        "min_stopword_share": cfg.language_min_stopword_share,
        "min_messages": cfg.min_messages,
        "max_message_chars": cfg.max_message_chars,
        "max_conversation_chars": cfg.max_conversation_chars,
        "languages": list(cfg.languages),
        "user_id_salt": cfg.user_id_salt,
        "near_duplicate_chars": cfg.near_duplicate_chars,
        "join_sharegpt_chunks": cfg.join_sharegpt_chunks,
    }
    total = CleaningResult(partitions=partitions)
    batches = partition_batches(con, "raw_records", partitions, cfg.batch_records)
    records_total, records_done = sum(rows for _, rows in batches), 0
    for batch, rows in batches:
        # the day range lets scans skip row groups by their zone maps (raw records are stored clustered by day)
        scope = {"parts": batch, "first_day": batch[0], "last_day": batch[-1]}
        part = run_steps(con, _STEPS, {**params, **scope}, _TEMP_TABLES, lambda c: _summarize(c, params))
        _accumulate(total, part)
        records_done += rows
        if progress is not None:
            progress(records_done, records_total)
    return total


def _accumulate(total: CleaningResult, part: CleaningResult) -> None:
    for name in ("raw_records", "kept", "quarantined", "records_kept", "messages_dropped"):
        setattr(total, name, getattr(total, name) + getattr(part, name))
    for mine, theirs in ((total.by_reason, part.by_reason), (total.languages, part.languages)):
        for key, value in theirs.items():
            mine[key] = mine.get(key, 0) + value
    seen = {row["status"] for row in total.examples}
    total.examples += [row for row in part.examples if row["status"] not in seen or row["status"] == "kept"][:10]
    total.by_reason = dict(sorted(total.by_reason.items(), key=lambda kv: (-kv[1], kv[0])))
    total.languages = dict(sorted(total.languages.items(), key=lambda kv: (-kv[1], kv[0])))


def _summarize(con: duckdb.DuckDBPyConnection, params: dict) -> CleaningResult:
    by_reason = dict(con.execute(
        "SELECT reason, count(*) FROM clean_verdicts WHERE reason IS NOT NULL GROUP BY reason ORDER BY count(*) DESC, reason"
    ).fetchall())
    languages = dict(con.execute(
        """SELECT language, count(*) FROM clean_units
           WHERE language IS NOT NULL AND (reason IS NULL OR reason IN ('language', 'duplicate', 'duplicate_id'))
           GROUP BY language ORDER BY count(*) DESC, language"""
    ).fetchall())
    # The few example rows, with what a person looks at: their messages (redacted and merged here for the
    # units whose rejection came before that work) and their language (detected here for the same reason).
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE clean_examples AS
        WITH picked AS (
            SELECT * FROM clean_verdicts
            QUALIFY row_number() OVER (PARTITION BY reason ORDER BY source_file, line_no) <= CASE WHEN reason IS NULL THEN 3 ELSE 1 END
        ),
        unformed AS (
            SELECT unit_id, list_transform(raw_usable, lambda m: {{'role': m.role, 'content': sdpo_redact_pii(m.content)}}) AS usable
            FROM clean_structure WHERE raw_usable IS NOT NULL AND unit_id IN (SELECT unit_id FROM picked)
        )
        SELECT v.*, u.source_format, u.n_messages, coalesce(s.messages, CASE WHEN f.usable IS NOT NULL THEN {_merged_sql("f.usable")} END) AS messages
        FROM picked v LEFT JOIN clean_units u USING (unit_id) LEFT JOIN clean_shapes s USING (unit_id)
        LEFT JOIN unformed f USING (unit_id)
        """
    ).fetchall()
    con.execute(
        """
        CREATE OR REPLACE TEMP TABLE clean_example_samples AS
        SELECT DISTINCT unit_id AS key,
            left(array_to_string(list_transform(list_filter(messages, lambda m: m.role <> 'system'), lambda m: m.content), chr(10)),
                 $sample_chars) AS sample
        FROM clean_examples WHERE language IS NULL AND messages IS NOT NULL
        """, {"sample_chars": params["sample_chars"]}
    ).fetchall()
    columns = ["status", "record_id", "source_file", "line_no", "source_format", "language", "n_messages", "detail", "preview"]
    examples = con.execute(
        f"""
        SELECT coalesce(v.reason, 'kept') AS status, v.record_id, v.source_file, v.line_no, v.source_format,
               coalesce(v.language, l.language), v.n_messages, sdpo_redact_pii(v.detail),
               left(list_filter(v.messages, lambda m: m.role <> 'system')[1].content, 160) AS preview  -- the opening, not a system prompt
        FROM clean_examples v LEFT JOIN ({language.language_sql("clean_example_samples")}) l ON l.key = v.unit_id
        ORDER BY v.reason NULLS FIRST, v.source_file, v.line_no
        """, {"min_stopword_share": params["min_stopword_share"]}
    ).fetchall()
    raw, records_kept = con.execute(
        "SELECT count(*), count(*) FILTER (WHERE reason IS NULL) FROM clean_verdicts"
    ).fetchall()[0]
    kept = fetch_scalar(con, "SELECT count(*) FROM clean_units WHERE reason IS NULL")
    dropped = fetch_scalar(con, "SELECT count(*) FROM clean_dropped")
    return CleaningResult(
        raw_records=raw,
        kept=kept,
        quarantined=raw - records_kept,
        records_kept=records_kept,
        messages_dropped=dropped,
        by_reason=by_reason,
        languages=languages,
        examples=[dict(zip(columns, row)) for row in examples],
    )


def length_histogram(con: duckdb.DuckDBPyConnection, partitions: list[str] | None = None,
                     edges: tuple[int, ...] = (0, 250, 500, 1000, 2000, 4000, 8000, 16000, 32000, 64000)) -> list[dict]:
    """Kept conversations by total characters: [{'bucket': '500-1000', 'lower': 500, 'count': n}, ...] (all buckets)."""
    rows = dict(con.execute(
        """
        SELECT list_filter($edges::BIGINT[], lambda e: e <= n_chars)[-1] AS lower, count(*)
        FROM conversations WHERE $all OR list_contains($parts::DATE[], partition_date) GROUP BY 1
        """,
        {"edges": list(edges), "all": partitions is None, "parts": list(partitions or [])},
    ).fetchall())
    uppers = list(edges[1:]) + [None]
    return [{"bucket": f"{lo}-{hi}" if hi else f"{lo}+", "lower": lo, "count": int(rows.get(lo, 0))}
            for lo, hi in zip(edges, uppers)]


def language_mix(con: duckdb.DuckDBPyConnection, partitions: list[str] | None = None) -> dict[str, int]:
    """Detected language → records that reached the language step (kept, or rejected for language or
    duplication), so that the mix shows what the language filter removed."""
    kept = con.execute(
        "SELECT language, count(*) FROM conversations WHERE $all OR list_contains($parts::DATE[], partition_date) GROUP BY 1",
        {"all": partitions is None, "parts": list(partitions or [])},
    ).fetchall()
    rejected = con.execute(
        """SELECT regexp_extract(detail, '^detected language (\\S+)$', 1), count(*) FROM quarantine
           WHERE stage = 'conversations' AND reason = 'language' AND ($all OR list_contains($parts::DATE[], partition_date))
           GROUP BY 1""",
        {"all": partitions is None, "parts": list(partitions or [])},
    ).fetchall()
    mix: dict[str, int] = {}
    for lang, n in kept + rejected:
        mix[lang] = mix.get(lang, 0) + n
    return dict(sorted(mix.items(), key=lambda kv: (-kv[1], kv[0])))
