"""PII redaction as DuckDB SQL macros: what leaves `raw_records` never carries these patterns.

Each kind is replaced by a typed placeholder, in this order (earlier kinds protect later ones: a URL's
`user:pass@host` is not an e-mail, a card number is not a phone number):

| kind            | placeholder              | what matches (RE2)                                                  |
|-----------------|--------------------------|---------------------------------------------------------------------|
| url_credentials | `<URL_WITH_CREDENTIALS>` | `scheme://user:password@host...`                                     |
| bearer_token    | `<BEARER_TOKEN>`         | `Bearer <8+ token chars>` (any case)                                 |
| api_key         | `<API_KEY>`              | OpenAI `sk-…`, AWS `AKIA…`, GitHub `ghp_…`/`github_pat_…`, Slack `xox?-…`, Google `AIza…`, HF `hf_…`, GitLab `glpat-…` |
| email           | `<EMAIL>`                | `local@domain.tld`                                                   |
| ip_address      | `<IP_ADDRESS>`           | dotted IPv4 (each octet ≤ 255), IPv6 full or `::`-compressed with ≥ 2 leading groups |
| credit_card     | `<CREDIT_CARD>`          | 13–19 digits, optionally grouped by spaces/dashes, *and* Luhn-valid  |
| phone           | `<PHONE>`                | `(+cc) area-3/4-4` groupings, or `+cc` followed by 3–6 digit groups  |

Known limits (documented, tested where they matter): version strings like `1.2.3.4` are redacted as IPs;
phone numbers written without separators (`5551234567`) or in 2-digit groups without `+` are not
caught; names and postal addresses are not detected.

Counts per conversation are the number of placeholders a kind added (placeholders already present in
the source text are not counted). The patterns are fixed constants of this module, written into the
macro text as SQL literals; no caller value is ever spliced into SQL.
"""

from __future__ import annotations

import duckdb

_IPV4_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_HEX = r"[0-9A-Fa-f]{1,4}"

# (kind, placeholder, RE2 pattern, literal cues: the pattern is only run on texts containing one of them).
# A regex pass costs about as much whatever it looks for; `contains` is ~10x cheaper, so each kind is
# gated by substrings every match must contain, and the digit kinds by one shared digit test.
DIGITS = "digits"
PATTERNS: list[tuple[str, str, str, tuple[str, ...]]] = [
    ("url_credentials", "<URL_WITH_CREDENTIALS>", r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@]+:[^\s/@]+@[^\s\"'<>]+", ("://",)),
    ("bearer_token", "<BEARER_TOKEN>", r"(?i)\bbearer\s+[A-Za-z0-9\-._~+/]{8,}=*", ("earer", "EARER")),
    ("api_key", "<API_KEY>",
     r"\b(?:sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,}"
     r"|xox[abposr]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35}|hf_[A-Za-z0-9]{30,}|glpat-[A-Za-z0-9_-]{20,})",
     ("sk-", "AKIA", "_", "xox", "AIza", "glpat-")),
    ("email", "<EMAIL>", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}", ("@",)),
    ("ip_address", "<IP_ADDRESS>",
     rf"\b(?:{_IPV4_OCTET}\.){{3}}{_IPV4_OCTET}\b|\b(?:{_HEX}:){{7}}{_HEX}\b|\b(?:{_HEX}:){{2,6}}:(?:{_HEX}:){{0,5}}{_HEX}\b",
     (".", ":")),
    ("credit_card", "<CREDIT_CARD>", r"\b(?:\d[ -]?){12,18}\d\b", (DIGITS,)),
    ("phone", "<PHONE>",
     r"(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\b\d{2,4}[ .-])\d{3,4}[ .-]\d{4}\b|\+\d{1,3}(?:[ .-]?\d{1,4}){3,6}\b", (DIGITS,)),
]
_DIGIT_KINDS = {"ip_address", "credit_card", "phone"}  # run only when the text has a digit at all
KINDS = [kind for kind, *_ in PATTERNS]
PLACEHOLDERS = {kind: placeholder for kind, placeholder, *_ in PATTERNS}


def _literal(text: str) -> str:
    """A module constant as a SQL string literal (never used with caller data)."""
    return "'" + text.replace("'", "''") + "'"


def _has_digit(var: str) -> str:
    """Whether `var` holds an ASCII digit: ten `contains` (a byte search each) cost ~8x less than one regex pass."""
    return "(" + " OR ".join(f"contains({var}, '{digit}')" for digit in range(10)) + ")"


def _gate(cues: tuple[str, ...]) -> str:
    return " OR ".join(f"contains(x, {_literal(cue)})" for cue in cues if cue != DIGITS) or "true"


def _replace_step(expr: str, kind: str, placeholder: str, pattern: str, cues: tuple[str, ...]) -> str:
    """One redaction step over `expr`. The text is bound once through `list_transform([expr], lambda x: ...)[1]`
    so that a step using its input twice does not make the nested expression grow exponentially."""
    if kind == "credit_card":  # only Luhn-valid candidates are replaced
        candidates = f"list_filter(regexp_extract_all(x, {_literal(pattern)}), lambda c: sdpo_luhn_valid(c))"
        body = f"list_reduce({candidates}, lambda acc, c: replace(acc, c, {_literal(placeholder)}), x)"
    else:
        body = f"regexp_replace(x, {_literal(pattern)}, {_literal(placeholder)}, 'g')"
    return f"list_transform([{expr}], lambda x: CASE WHEN {_gate(cues)} THEN {body} ELSE x END)[1]"


def macros_sql() -> list[str]:
    """Statements creating the temp macros `sdpo_redact_pii(s)`, `sdpo_pii_counts(before, after)` (a struct:
    kind → count), `sdpo_pii_found(s)` and `sdpo_luhn_valid(s)` on a connection."""
    luhn = """
    CREATE OR REPLACE TEMP MACRO sdpo_luhn_valid(s) AS (
        list_sum(list_transform(list_reverse(regexp_extract_all(s, '\\d')),
                 lambda d, i: CASE WHEN i % 2 = 0 THEN (d::INTEGER * 2) - CASE WHEN d::INTEGER >= 5 THEN 9 ELSE 0 END
                                   ELSE d::INTEGER END)) % 10 = 0
        AND NOT regexp_full_match(regexp_replace(s, '[^0-9]', '', 'g'), '0+')
    )"""
    text_steps, digit_steps = "s", "x"
    for kind, placeholder, pattern, cues in PATTERNS:
        if kind in _DIGIT_KINDS:
            digit_steps = _replace_step(digit_steps, kind, placeholder, pattern, cues)
        else:
            text_steps = _replace_step(text_steps, kind, placeholder, pattern, cues)
    # the digit kinds come last (after e-mails and keys, which may hold digits), behind one digit test
    expr = f"list_transform([{text_steps}], lambda x: CASE WHEN {_has_digit('x')} THEN {digit_steps} ELSE x END)[1]"
    redact = f"CREATE OR REPLACE TEMP MACRO sdpo_redact_pii(s) AS ({expr})"

    def occurrences(text: str, placeholder: str) -> str:
        return f"((length({text}) - length(replace({text}, {_literal(placeholder)}, ''))) // {len(placeholder)})"

    fields = ", ".join(
        f"{_literal(kind)}: ({occurrences('after', p)} - {occurrences('before', p)})::INTEGER" for kind, p, *_ in PATTERNS
    )
    counts = f"CREATE OR REPLACE TEMP MACRO sdpo_pii_counts(before, after) AS ({{{fields}}})"
    found_parts = []
    for kind, _, pattern, cues in PATTERNS:  # same gates as the redaction, so the check costs about as much
        if kind == "credit_card":
            test = f"len(list_filter(regexp_extract_all(x, {_literal(pattern)}), lambda c: sdpo_luhn_valid(c))) > 0"
        else:
            test = f"regexp_matches(x, {_literal(pattern)})"
        digit_gate = "d AND " if kind in _DIGIT_KINDS else ""
        found_parts.append(f"CASE WHEN {digit_gate}({_gate(cues)}) AND {test} THEN {_literal(kind)} END")
    kinds_found = f"list_filter([{', '.join(found_parts)}], lambda k: k IS NOT NULL)"
    found = ("CREATE OR REPLACE TEMP MACRO sdpo_pii_found(s) AS "
             f"(list_transform([s], lambda x: list_transform([{_has_digit('x')}], lambda d: {kinds_found})[1])[1])")
    return [luhn, redact, counts, found]


def install_macros(con: duckdb.DuckDBPyConnection) -> None:
    for statement in macros_sql():
        con.execute(statement).fetchall()


def redact(con: duckdb.DuckDBPyConnection, text: str) -> str:
    """Redact one string (for tests and for callers outside the SQL stages)."""
    install_macros(con)
    return con.execute("SELECT sdpo_redact_pii($text)", {"text": text}).fetchall()[0][0]
