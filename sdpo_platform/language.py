"""A fast language heuristic in DuckDB SQL (no model, no dependency), and its measured accuracy.

Over the first `language_sample_chars` of a conversation's user/assistant text:
- non-Latin scripts by their share of letters: kana ≥ 10 % → ja, Hangul ≥ 30 % → ko, Han ≥ 30 % → zh,
  Cyrillic ≥ 30 % → ru, Arabic ≥ 30 % → ar;
- Latin text: the language whose short list of frequent function words covers most of the words
  (ties prefer English), if that share reaches `language_min_stopword_share`; else 'und'.

Accuracy on a labelled sample (`labelled_sample`: hand-written chat prompts in 11 languages plus
English prompts from IFEval, MT-Bench and HH-RLHF read from the shared reference data) is computed by
`measure_accuracy`, asserted by `tests/test_cleaning.py` and reported in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb

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
    "nl": "het een van en niet dat ik je zijn op voor met maar ook wat er hoe kan".split(),
}


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _hits(lang: str, text: str = "padded") -> str:
    """Occurrences of `lang`'s function words in `text` (spaces doubled, so adjacent words do not share
    the delimiter a match consumes)."""
    pattern = "[^\\pL](?:" + "|".join(sorted(set(STOPWORDS[lang]))) + ")[^\\pL]"
    return f"len(regexp_extract_all({text}, {_literal(pattern)}))"


def language_sql(samples_table: str) -> str:
    """SQL selecting (key, language) from `samples_table(key, sample)`; `samples_table` is a fixed
    temp-table name of the caller, never user input. Uses $min_stopword_share; the word lists are
    module constants compiled into the SQL.

    Cost matters at a million conversations: a regex pass over the sample costs about the same whatever
    it looks for, so the work is gated: pure-ASCII samples (bytes = characters) skip the script counts,
    and samples whose English function-word share is already high (≥ 15 %, far above what any other
    listed language reaches) skip the other languages' word lists. Counting words costs per match, so
    English is first counted in the first half of the text: a match there is a match of the whole text
    (each match is one whole word between two non-letters), so when the half alone reaches the English
    threshold the outcome is the same and the second half is never scanned."""
    others = [lang for lang in STOPWORDS if lang != "en"]
    other_hits = ", ".join(f"{{'hits': {_hits(lang)}, 'en': 0, 'lang': {_literal(lang)}}}" for lang in others)
    return f"""
    WITH texts AS (
        SELECT key, sample, strlen(sample) = length(sample) AS ascii_only,
               ' ' || replace(replace(lower(sample), ' ', '  '), chr(10), '  ') || ' ' AS padded,
        FROM {samples_table}
    ),
    counted AS (  -- every space and newline was doubled (lower-casing keeps the length): words = separators + 1
        SELECT *, length(padded) - length(sample) - 1 AS n_words FROM texts
    ),
    first_half AS (
        SELECT *, {_hits("en", "left(padded, length(padded) // 2)")} AS en_half_hits FROM counted
    ),
    scored AS (  -- the full count only where the first half does not settle it (hits in a prefix ≤ hits in the whole)
        SELECT key, ascii_only, n_words, sample, padded,
            CASE WHEN en_half_hits >= greatest(0.15, $min_stopword_share) * n_words THEN en_half_hits ELSE {_hits("en")} END AS en_hits
        FROM first_half
    ),
    scripts AS (  -- script shares, only for samples with non-ASCII characters
        SELECT key, n_words, en_hits, padded, ascii_only,
            CASE WHEN ascii_only THEN regexp_matches(sample, '[A-Za-z]') END AS has_letters,
            CASE WHEN NOT ascii_only THEN length(regexp_replace(sample, '[^\\pL]+', '', 'g')) END AS letters,
            CASE WHEN NOT ascii_only THEN length(regexp_replace(sample, '[^\\p{{Latin}}]+', '', 'g')) END AS latin,
            CASE WHEN NOT ascii_only THEN length(regexp_replace(sample, '[^\\p{{Hiragana}}\\p{{Katakana}}]+', '', 'g')) END AS kana,
            CASE WHEN NOT ascii_only THEN length(regexp_replace(sample, '[^\\p{{Hangul}}]+', '', 'g')) END AS hangul,
            CASE WHEN NOT ascii_only THEN length(regexp_replace(sample, '[^\\p{{Han}}]+', '', 'g')) END AS han,
            CASE WHEN NOT ascii_only THEN length(regexp_replace(sample, '[^\\p{{Cyrillic}}]+', '', 'g')) END AS cyrillic,
            CASE WHEN NOT ascii_only THEN length(regexp_replace(sample, '[^\\p{{Arabic}}]+', '', 'g')) END AS arabic
        FROM scored
    ),
    latin AS (
        SELECT *,
            CASE WHEN en_hits >= 0.15 * n_words THEN {{'hits': en_hits, 'en': 1, 'lang': 'en'}}
                 ELSE list_sort([{{'hits': en_hits, 'en': 1, 'lang': 'en'}}, {other_hits}], 'DESC')[1]  -- most hits, ties: English
            END AS best
        FROM scripts
    )
    SELECT key,
        CASE WHEN ascii_only AND NOT has_letters THEN 'und'
             WHEN NOT ascii_only AND letters = 0 THEN 'und'
             WHEN NOT ascii_only AND kana >= 0.1 * letters THEN 'ja'
             WHEN NOT ascii_only AND hangul >= 0.3 * letters THEN 'ko'
             WHEN NOT ascii_only AND han >= 0.3 * letters THEN 'zh'
             WHEN NOT ascii_only AND cyrillic >= 0.3 * letters THEN 'ru'
             WHEN NOT ascii_only AND arabic >= 0.3 * letters THEN 'ar'
             WHEN (ascii_only OR latin >= 0.5 * letters) AND best.hits > 0 AND best.hits >= $min_stopword_share * n_words
             THEN best.lang
             ELSE 'und' END AS language
    FROM latin
    """


def detect(con: duckdb.DuckDBPyConnection, texts: list[str], min_stopword_share: float = 0.05,
           sample_chars: int = 2000) -> list[str]:
    """Language of each text, with the same SQL the cleaning stage runs."""
    con.execute(
        "CREATE OR REPLACE TEMP TABLE language_samples AS "
        "SELECT i AS key, left(t, $n) AS sample FROM (SELECT unnest($texts::VARCHAR[]) AS t, "
        "unnest(range(len($texts::VARCHAR[]))) AS i)",
        {"texts": texts, "n": sample_chars},
    ).fetchall()
    rows = con.execute(language_sql("language_samples"), {"min_stopword_share": min_stopword_share}).fetchall()
    con.execute("DROP TABLE language_samples").fetchall()
    found = dict(rows)
    return [found.get(i, "und") for i in range(len(texts))]


def labelled_sample(handwritten: str | Path, shared_data: str | Path | None = None, english_per_source: int = 40) -> list[dict]:
    """The labelled sample: hand-written texts in 11 languages (`tests/data/language_sample.jsonl`) plus,
    when the shared reference data is there, English prompts read from it at run time (IFEval prompts,
    MT-Bench first turns, HH-RLHF first human turns; never copied into the repository)."""
    rows = [json.loads(line) for line in Path(handwritten).read_text(encoding="utf-8").splitlines() if line.strip()]
    if shared_data is None or not Path(shared_data).is_dir():
        return rows
    import gzip
    from itertools import islice

    shared = Path(shared_data)
    with open(shared / "ifeval" / "input_data.jsonl", encoding="utf-8") as f:
        rows += [{"text": json.loads(line)["prompt"], "language": "en"} for line in islice(f, english_per_source)]
    with open(shared / "mt_bench" / "question.jsonl", encoding="utf-8") as f:
        rows += [{"text": json.loads(line)["turns"][0], "language": "en"} for line in islice(f, english_per_source)]
    with gzip.open(shared / "hh_rlhf" / "harmless-base-test.jsonl.gz", "rt", encoding="utf-8") as f:
        rows += [{"text": json.loads(line)["chosen"].split("\n\nHuman: ")[1].split("\n\nAssistant:")[0], "language": "en"}
                 for line in islice(f, english_per_source)]
    return rows


def measure_accuracy(con: duckdb.DuckDBPyConnection, rows: list[dict], min_stopword_share: float = 0.05) -> dict:
    """Accuracy overall and per language on labelled {"text", "language"} rows, plus the precision and
    recall of the default filter decision (keep English)."""
    predicted = detect(con, [r["text"] for r in rows], min_stopword_share)
    labels = [r["language"] for r in rows]
    per_language: dict[str, list[int]] = {}
    for label, guess in zip(labels, predicted):
        per_language.setdefault(label, [0, 0])
        per_language[label][0] += label == guess
        per_language[label][1] += 1
    kept_en = [g == "en" for g in predicted]
    true_en = [label == "en" for label in labels]
    tp = sum(k and t for k, t in zip(kept_en, true_en))
    return {
        "n": len(rows),
        "accuracy": sum(l == g for l, g in zip(labels, predicted)) / len(rows),
        "per_language": {lang: f"{ok}/{n}" for lang, (ok, n) in sorted(per_language.items())},
        "english_precision": tp / max(sum(kept_en), 1),
        "english_recall": tp / max(sum(true_en), 1),
        "errors": [(l, g, r["text"][:60]) for l, g, r in zip(labels, predicted, rows) if l != g],
    }
