"""`raw_records` → `conversations`: parse, normalize and filter chat logs in DuckDB SQL.

Each call rebuilds `conversations` and the 'conversations' quarantine rows from the whole raw table in
one transaction, so the stage is idempotent and `raw_records = kept + quarantined` always holds: every
rejected record gets exactly one quarantine row carrying the *first* failing reason, in this order:

  invalid_json → unknown_schema → unknown_role → invalid_content → empty_conversation →
  starts_with_assistant → too_few_messages → message_too_long → conversation_too_long → language →
  duplicate

Formats (detected per record, first match wins): ShareGPT `conversations: [{from, value}]`, OpenAI chat
`messages: [{role, content}]`, WildChat `conversation: [{role, content, ...}]`.

Normalization, in order:
- roles: human/user → user; gpt/assistant/chatgpt/bard/bing/model → assistant; system → system; any
  other role quarantines the record; content must be a JSON string (multimodal parts, null → quarantine);
- messages that are empty or whitespace are dropped;
- consecutive messages of the same role are merged, joined with a blank line ("\\n\\n"), so user and
  assistant strictly alternate. Runs are computed over the non-system messages (a system message in
  between does not break a run), and system messages are moved to the front, in their order: x never
  contains them, and this way every assistant turn is directly followed by the user turn answering it.
  Length filters apply to the merged messages, which is what training sees;
- conversation_id is the record_id (sha256 of file, line, text): unique and stable even when sources
  reuse ids (ShareGPT chunks, WildChat hashes); the source's id is kept in `source_id`.

Message counts for `min_messages` leave system messages out (they are not turns).

Language is a fast heuristic in SQL over the first `language_sample_chars` of the non-system messages:
non-Latin scripts by their share of letters (kana → ja, Hangul → ko, Han → zh, Cyrillic → ru), and for
Latin text the language whose short list of frequent function words covers the largest share of the
words (at least `language_min_stopword_share`), else 'und'. It is good enough to drop non-English chats,
not a language identifier.

Exact duplicates are conversations with the same content hash (roles + contents lower-cased with
whitespace collapsed); the first by (source_file, line_no) is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import duckdb

from sdpo_platform.config import CleaningConfig
from sdpo_platform.warehouse import run_steps

STAGE = "conversations"

USER_ROLES = ["human", "user"]
ASSISTANT_ROLES = ["gpt", "assistant", "chatgpt", "bard", "bing", "model"]

# Frequent function words, chosen to overlap little between languages.
STOPWORDS: dict[str, list[str]] = {
    "en": "the and is are of to that it for you with this on be have was what how can my your do not an "
    "as at by from or will would please which there if we they about but i me all has so some should "
    "like also these them their been were does did".split(),
    "es": "el los las del por para con una está pero más muy cómo qué también hay puede son sobre esto "
    "este esta y yo tu mi es".split(),
    "fr": "le les des est et une pour dans pas qui sur avec ce je vous il nous au du sont mais ou plus "
    "cette être faire".split(),
    "de": "der die das und ist nicht ein eine zu mit den von ich sie auf für sich dem auch wie bitte "
    "oder wir kann sind einen werden".split(),
    "pt": "não você isso uma são ao dos das muito os um em é seu sua meu minha ele ela também".split(),
    "it": "il di che è per non sono della gli anche questo più nel alla ma ho mi ti".split(),
}


@dataclass
class CleaningResult:
    raw_records: int = 0
    kept: int = 0
    quarantined: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    languages: dict[str, int] = field(default_factory=dict)  # detected among records that reached the language step
    examples: list[dict] = field(default_factory=list)  # a few kept conversations and one record per reason


_STEPS = [
    # 1. Parse and detect the format; a record that is not valid JSON stops here.
    """
    CREATE OR REPLACE TEMP TABLE clean_records AS
    WITH parsed AS (
        SELECT record_id, source_file, line_no, raw_text,
               CASE WHEN json_valid(raw_text) THEN raw_text::JSON END AS doc
        FROM raw_records
    )
    SELECT *,
        CASE WHEN json_type(doc, '$.conversations') = 'ARRAY' THEN 'sharegpt'
             WHEN json_type(doc, '$.messages') = 'ARRAY' THEN 'openai'
             WHEN json_type(doc, '$.conversation') = 'ARRAY' THEN 'wildchat' END AS source_format,
        CASE WHEN json_type(doc) = 'OBJECT'
             THEN coalesce(doc->>'id', doc->>'conversation_id', doc->>'conversation_hash') END AS source_id
    FROM parsed
    """,
    # 2. One row per source message, roles normalized (NULL = unknown), content type checked.
    """
    CREATE OR REPLACE TEMP TABLE clean_messages AS
    WITH items AS (
        SELECT r.record_id, m.key::INTEGER AS pos, m.type AS item_type,
               CASE r.source_format WHEN 'sharegpt' THEN m.value->>'from' ELSE m.value->>'role' END AS raw_role,
               CASE r.source_format WHEN 'sharegpt' THEN m.value->'value' ELSE m.value->'content' END AS content_json
        FROM clean_records r,
             json_each(CASE r.source_format WHEN 'sharegpt' THEN r.doc->'conversations'
                                            WHEN 'openai' THEN r.doc->'messages'
                                            ELSE r.doc->'conversation' END) m
        WHERE r.source_format IS NOT NULL
    )
    SELECT record_id, pos, item_type, raw_role,
        CASE WHEN lower(trim(raw_role)) IN (SELECT unnest($user_roles::VARCHAR[])) THEN 'user'
             WHEN lower(trim(raw_role)) IN (SELECT unnest($assistant_roles::VARCHAR[])) THEN 'assistant'
             WHEN lower(trim(raw_role)) = 'system' THEN 'system' END AS role,
        coalesce(json_type(content_json), 'missing') AS content_type,
        content_json->>'$' AS content
    FROM items
    """,
    # 3. Drop blank messages and merge runs of the same role (runs counted over non-system messages).
    """
    CREATE OR REPLACE TEMP TABLE clean_merged AS
    WITH kept AS (
        SELECT record_id, pos, role, content FROM clean_messages
        WHERE role IS NOT NULL AND content_type = 'VARCHAR' AND regexp_matches(content, '\\S')
    ),
    runs AS (
        SELECT *, CASE WHEN role = 'system' THEN 'system:' || pos
                       ELSE 'run:' || sum(new_run) OVER (PARTITION BY record_id, role = 'system' ORDER BY pos) END AS run
        FROM (SELECT *, (role IS DISTINCT FROM lag(role) OVER (PARTITION BY record_id, role = 'system' ORDER BY pos))::INTEGER AS new_run
              FROM kept)
    )
    SELECT record_id, min(pos) AS pos, any_value(role) AS role, string_agg(content, chr(10) || chr(10) ORDER BY pos) AS content
    FROM runs GROUP BY record_id, run
    """,
    # 4. Per-conversation shape, lengths, language sample and content hash.
    """
    CREATE OR REPLACE TEMP TABLE clean_shapes AS
    SELECT record_id,
        list({'role': role, 'content': content} ORDER BY role <> 'system', pos) AS messages,
        count(*)::INTEGER AS n_messages,
        count(*) FILTER (WHERE role <> 'system') AS n_turns,
        sum(length(content))::BIGINT AS n_chars,
        max(length(content)) AS longest,
        arg_min(role, pos) FILTER (WHERE role <> 'system') AS first_role,
        left(string_agg(content, chr(10) ORDER BY pos) FILTER (WHERE role <> 'system'), $sample_chars) AS sample,
        sha256(string_agg(role || chr(31) || lower(trim(regexp_replace(content, '\\s+', ' ', 'g'))), chr(30)
                          ORDER BY role <> 'system', pos)) AS content_hash
    FROM clean_merged GROUP BY record_id
    """,
    # 5. Language: script shares for non-Latin scripts, function-word share for Latin ones.
    """
    CREATE OR REPLACE TEMP TABLE clean_languages AS
    WITH stopwords AS (SELECT DISTINCT unnest($stop_langs::VARCHAR[]) AS lang, unnest($stop_words::VARCHAR[]) AS word),
    words AS (SELECT record_id, unnest(regexp_extract_all(lower(sample), '\\pL+')) AS word FROM clean_shapes),
    word_counts AS (SELECT record_id, count(*) AS n_words FROM words GROUP BY record_id),
    best_latin AS (
        SELECT w.record_id, s.lang, count(*) AS hits FROM words w JOIN stopwords s USING (word)
        GROUP BY w.record_id, s.lang
        QUALIFY row_number() OVER (PARTITION BY w.record_id ORDER BY count(*) DESC, s.lang = 'en' DESC, s.lang) = 1
    ),
    scripts AS (  -- script counts over the non-ASCII letters only: cheap for mostly-ASCII text
        SELECT record_id, ascii_letters + length(regexp_replace(other, '[^\\pL]', '', 'g')) AS letters,
            ascii_letters + length(regexp_replace(other, '[^\\p{Latin}]', '', 'g')) AS latin,
            length(regexp_replace(other, '[^\\p{Hiragana}\\p{Katakana}]', '', 'g')) AS kana,
            length(regexp_replace(other, '[^\\p{Hangul}]', '', 'g')) AS hangul,
            length(regexp_replace(other, '[^\\p{Han}]', '', 'g')) AS han,
            length(regexp_replace(other, '[^\\p{Cyrillic}]', '', 'g')) AS cyrillic
        FROM (SELECT record_id, length(regexp_replace(sample, '[^A-Za-z]', '', 'g')) AS ascii_letters,
                     regexp_replace(sample, '[\\x00-\\x7F]', '', 'g') AS other
              FROM clean_shapes)
    )
    SELECT s.record_id,
        CASE WHEN s.letters = 0 THEN 'und'
             WHEN s.kana >= 0.1 * s.letters THEN 'ja'
             WHEN s.hangul >= 0.3 * s.letters THEN 'ko'
             WHEN s.han >= 0.3 * s.letters THEN 'zh'
             WHEN s.cyrillic >= 0.3 * s.letters THEN 'ru'
             WHEN s.latin >= 0.5 * s.letters AND b.hits >= $min_stopword_share * c.n_words THEN b.lang
             ELSE 'und' END AS language
    FROM scripts s LEFT JOIN word_counts c USING (record_id) LEFT JOIN best_latin b USING (record_id)
    """,
    # 6. The first failing reason per record (NULL = kept), with a detail a person can act on.
    """
    CREATE OR REPLACE TEMP TABLE clean_verdicts AS
    WITH message_checks AS (
        SELECT record_id,
            arg_min(format('message {} has role {}', pos, coalesce(raw_role, 'NULL')), pos)
                FILTER (WHERE item_type = 'OBJECT' AND role IS NULL) AS unknown_role,
            arg_min(format('message {} content is {}', pos,
                           CASE WHEN item_type <> 'OBJECT' THEN 'not an object: ' || item_type ELSE content_type END), pos)
                FILTER (WHERE item_type <> 'OBJECT' OR (role IS NOT NULL AND content_type <> 'VARCHAR')) AS invalid_content
        FROM clean_messages GROUP BY record_id
    ),
    judged AS (
        SELECT r.record_id, r.source_file, r.line_no, r.source_id, r.source_format, s.messages, s.n_messages,
               s.n_chars, s.content_hash, l.language,
            CASE WHEN r.doc IS NULL THEN 'invalid_json'
                 WHEN r.source_format IS NULL THEN 'unknown_schema'
                 WHEN m.unknown_role IS NOT NULL THEN 'unknown_role'
                 WHEN m.invalid_content IS NOT NULL THEN 'invalid_content'
                 WHEN s.record_id IS NULL THEN 'empty_conversation'
                 WHEN s.first_role = 'assistant' THEN 'starts_with_assistant'
                 WHEN s.n_turns < $min_messages THEN 'too_few_messages'
                 WHEN s.longest > $max_message_chars THEN 'message_too_long'
                 WHEN s.n_chars > $max_conversation_chars THEN 'conversation_too_long'
                 WHEN len($languages::VARCHAR[]) > 0 AND NOT list_contains($languages::VARCHAR[], l.language) THEN 'language'
            END AS reason,
            CASE WHEN r.doc IS NULL THEN 'not valid JSON: ' || left(r.raw_text, 120)
                 WHEN r.source_format IS NULL THEN 'no conversations/messages/conversation array; top-level type '
                      || json_type(r.doc) || coalesce(', keys ' || array_to_string(json_keys(r.doc), ','), '')
                 WHEN m.unknown_role IS NOT NULL THEN m.unknown_role
                 WHEN m.invalid_content IS NOT NULL THEN m.invalid_content
                 WHEN s.record_id IS NULL THEN 'no non-blank messages'
                 WHEN s.first_role = 'assistant' THEN 'first non-system message is from the assistant'
                 WHEN s.n_turns < $min_messages THEN format('{} user/assistant messages after merging < {}', s.n_turns, $min_messages)
                 WHEN s.longest > $max_message_chars THEN format('longest message {} chars > {}', s.longest, $max_message_chars)
                 WHEN s.n_chars > $max_conversation_chars THEN format('{} chars > {}', s.n_chars, $max_conversation_chars)
                 ELSE 'detected language ' || l.language
            END AS detail
        FROM clean_records r
        LEFT JOIN message_checks m USING (record_id)
        LEFT JOIN clean_shapes s USING (record_id)
        LEFT JOIN clean_languages l USING (record_id)
    )
    SELECT * REPLACE (
        coalesce(reason, CASE WHEN first_of_hash <> record_id THEN 'duplicate' END) AS reason,
        CASE WHEN reason IS NULL AND first_of_hash <> record_id THEN 'same content as ' || first_of_hash
             ELSE detail END AS detail)
    FROM (
        SELECT *, first_value(record_id) OVER (
                      PARTITION BY content_hash, reason IS NULL ORDER BY source_file, line_no, record_id) AS first_of_hash
        FROM judged
    )
    """,
    "DELETE FROM conversations",
    """
    INSERT INTO conversations (conversation_id, record_id, source_file, line_no, source_id, source_format, language,
                               messages, n_messages, n_chars, content_hash)
    SELECT record_id, record_id, source_file, line_no, source_id, source_format, language,
           messages, n_messages, n_chars, content_hash
    FROM clean_verdicts WHERE reason IS NULL
    """,
    "DELETE FROM quarantine WHERE stage = $stage",
    """
    INSERT INTO quarantine (record_id, stage, reason, detail, source_file, line_no)
    SELECT record_id, $stage, reason, detail, source_file, line_no FROM clean_verdicts WHERE reason IS NOT NULL
    """,
]

_TEMP_TABLES = ["clean_records", "clean_messages", "clean_merged", "clean_shapes", "clean_languages", "clean_verdicts"]


def build_conversations(con: duckdb.DuckDBPyConnection, cfg: CleaningConfig | None = None) -> CleaningResult:
    """Rebuild `conversations` and the stage's quarantine rows from all of `raw_records`."""
    cfg = cfg or CleaningConfig()
    params = {
        "stage": STAGE,
        "user_roles": USER_ROLES,
        "assistant_roles": ASSISTANT_ROLES,
        "sample_chars": cfg.language_sample_chars,
        "min_stopword_share": cfg.language_min_stopword_share,
        "stop_langs": [lang for lang, words in STOPWORDS.items() for _ in words],
        "stop_words": [word for words in STOPWORDS.values() for word in words],
        "min_messages": cfg.min_messages,
        "max_message_chars": cfg.max_message_chars,
        "max_conversation_chars": cfg.max_conversation_chars,
        "languages": list(cfg.languages),
    }
    return run_steps(con, _STEPS, params, _TEMP_TABLES, _summarize)


def _summarize(con: duckdb.DuckDBPyConnection) -> CleaningResult:
    by_reason = dict(con.execute(
        "SELECT reason, count(*) FROM clean_verdicts WHERE reason IS NOT NULL GROUP BY reason ORDER BY count(*) DESC, reason"
    ).fetchall())
    languages = dict(con.execute(
        """SELECT language, count(*) FROM clean_verdicts
           WHERE language IS NOT NULL AND (reason IS NULL OR reason IN ('language', 'duplicate'))
           GROUP BY language ORDER BY count(*) DESC, language"""
    ).fetchall())
    columns = ["status", "record_id", "source_file", "line_no", "source_format", "language", "n_messages", "detail", "preview"]
    examples = con.execute(
        """
        SELECT coalesce(reason, 'kept') AS status, record_id, source_file, line_no, source_format, language, n_messages,
               detail, left(messages[1].content, 160) AS preview
        FROM clean_verdicts
        QUALIFY row_number() OVER (PARTITION BY reason ORDER BY source_file, line_no) <= CASE WHEN reason IS NULL THEN 3 ELSE 1 END
        ORDER BY reason NULLS FIRST, source_file, line_no
        """
    ).fetchall()
    raw, kept = con.execute(
        "SELECT count(*), count(*) FILTER (WHERE reason IS NULL) FROM clean_verdicts"
    ).fetchall()[0]
    return CleaningResult(
        raw_records=raw,
        kept=kept,
        quarantined=raw - kept,
        by_reason=by_reason,
        languages=languages,
        examples=[dict(zip(columns, row)) for row in examples],
    )
