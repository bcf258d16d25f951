"""PII redaction as DuckDB SQL macros: what leaves `raw_records` never carries these patterns.

Each kind is replaced by a typed placeholder, in this order (earlier kinds protect later ones: a URL's
`user:pass@host` is not an e-mail, a card number is not a phone number):

| kind            | placeholder              | what matches (RE2)                                                  |
|-----------------|--------------------------|---------------------------------------------------------------------|
| url_credentials | `<URL_WITH_CREDENTIALS>` | `scheme://user:password@host...`                                     |
| bearer_token    | `<BEARER_TOKEN>`         | `Bearer`/`bearer`/`BEARER` + 8+ token chars, where the token has a digit, or is 20+ chars with lower and upper case |
| basic_auth      | `<BASIC_AUTH>`           | `[Aa]uthorization: Basic <base64-like: a digit, `+`, `/` or lower-then-upper>` (the label is kept) |
| api_key         | `<API_KEY>`              | OpenAI `sk-…`, AWS `AKIA…` and a 40-char value labelled `[aws_]secret_access_key` (any case) or `[AWS]SecretAccessKey` (label kept), GitHub `ghp_…`/`github_pat_…`, Slack `xox?-…`, Google `AIza…`, HF `hf_…`, GitLab `glpat-…`, Stripe `sk_live_…`/`sk_test_…`/`rk_…`/`pk_live_…`, bare JWTs `eyJ….eyJ….sig` |
| email           | `<EMAIL>`                | `local@domain.tld`                                                   |
| ip_address      | `<IP_ADDRESS>`           | dotted IPv4 (each octet ≤ 255); IPv6 full, `::`-compressed with ≥ 2 leading groups, 1 leading group and ≥ 2 after (`fe80::1ff:fe23:4567:890a`), `fe80::x`, or none (`::1`, `::ffff:1.2.3.4`; not after a word: `std::x`, `a::b` stay) |
| credit_card     | `<CREDIT_CARD>`          | 13–19 digits in a card's grouping (continuous, 4-4-4-4[-1..3], 4-6-4/5; one separator, space or dash) *and* Luhn-valid; a 4-4-4-4 card followed by a short group (`… 5100 10/25`) is found without it |
| phone           | `<PHONE>`                | `(area) 3/4-4` with optional `+cc`; US `[1-]NXX-XXX-XXXX`; `+cc` (optionally `(0)`) then groups of 1–4 then 2–4 digits; trunk `0` numbers (`07700 900123`, `030 1234567`, `020 7946 0958`, `0412 345 678`, `03-1234-5678`, FR `01 23 45 67 89`); IN mobiles `[6-9]XXXX XXXXX` |

Known limits (documented, tested where they matter): version strings like `1.2.3.4` are redacted as IPs;
phone numbers written without separators (`5551234567`) or without `+`/trunk `0` in other groupings
(`20 7946 0958`, `7700 900123`) are not caught, nor IN-style 5-5 mobiles without a separator or starting
below 6; number runs in phone groupings (`01 02 03 04 05`, `0800 1200 1500`, `70000 80000`) are redacted
as phones; a card inside a longer run of 4-digit groups is missed (the first four groups are the
candidate); IPv6 `x::y` with one group on each side (except `fe80::`) stays, as C++ `a::b` does; lowercase-only
bearer tokens without digits, all-caps `AUTHORIZATION` headers and AWS secrets without their label are not detected; names and postal
addresses are not detected.

Counts per conversation are the number of placeholders a kind added (placeholders already present in
the source text are not counted). The patterns are fixed constants of this module, written into the
macro text as SQL literals; no caller value is ever spliced into SQL. `sdpo_redact_pii(s)` redacts any one
text expression (messages, quarantine details, source ids); `sdpo_pii_found(s)` lists the kinds left in it.
"""

from __future__ import annotations

import duckdb

_IPV4_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = rf"(?:{_IPV4_OCTET}\.){{3}}{_IPV4_OCTET}"
_HEX = r"[0-9A-Fa-f]{1,4}"
IP_ADDRESS = "|".join([
    rf"\b{_IPV4}\b",
    rf"\b(?:{_HEX}:){{7}}{_HEX}\b",
    rf"\b(?:{_HEX}:){{2,6}}:(?:{_HEX}:){{0,5}}{_HEX}\b",
    rf"\b{_HEX}::(?:{_HEX}:){{1,5}}{_HEX}\b",  # one leading group needs ≥ 2 after it: `a::b` is C++
    rf"\b[Ff][Ee]80::{_HEX}\b",  # link-local, the common one-and-one case
    rf"\B::(?:[Ff]{{4}}:{_IPV4}\b|(?:{_HEX}:){{1,5}}{_HEX}\b|\d{{1,4}}\b)",  # none (`::1`); \B: not right after a word
])
# Candidates in a card's real groupings, one separator kind each (RE2 has no backreferences, so each is spelled
# out): a trailing number is never part of a candidate, except 1–3 digits after 4-4-4-4 (19-digit cards),
# which the mask below drops again when the whole fails Luhn and its first 16 digits pass.
CREDIT_CARD = (r"\b(?:\d{13,19}|\d{4}(?: \d{4}){3}(?: \d{1,3})?|\d{4}(?:-\d{4}){3}(?:-\d{1,3})?"
               r"|\d{4} \d{6} \d{4,5}|\d{4}-\d{6}-\d{4,5})\b")
PHONE = "|".join([
    r"(?:\+\d{1,3}[ .-]?)?\(\d{2,4}\)[ .-]?\d{3,4}[ .-]\d{4}\b",  # (555) 123-4567, +1 (555) 123-4567
    r"\+\d{1,3}(?:[ .-]?\(0\))?[ .-]?\d{1,4}(?:[ .-]?\d{2,4}){2,5}\b",  # +44 20 7946 0958, +49 (0)30 12345678
    r"(?:\b1[ .-])?\b[2-9]\d\d[ .-]\d{3}[ .-]\d{4}\b",  # US 555.123.4567, 1-800-555-0199 (area codes start 2-9)
    # trunk 0: 020 7946 0958, 03-1234-5678; 0412 345 678; 07700 900123, 030 1234567; FR 01 23 45 67 89 (no 0xx 3-3-3:
    # that is a thousands grouping, `10 050 000 000`)
    r"\b0[1-9](?:\d{0,3}[ -]\d{3,4}[ -]\d{4}|\d{2,3}[ -]\d{3}[ -]\d{3}|\d{1,3}[ -]\d{5,8}|(?: \d\d){4}|(?:\.\d\d){4})\b",
    r"\b[6-9]\d{4}[ -]\d{5}\b",  # IN mobile 98765 43210 (separator required: 10 bare digits are too common)
])
BEARER = r"\b(?:[Bb]earer|BEARER)\s+[A-Za-z0-9\-._~+/]{8,}=*"
# `(?P<keep>…)` is group 1 and stays in the text (`\1` in the replacement): the label that makes the value a secret
BASIC_AUTH = (r"(?P<keep>[Aa]uthorization[\"']?\s*[:=]\s*[\"']?)(?i:basic)\s+"
              r"[A-Za-z0-9+/]*(?:[0-9+/]|[a-z][A-Za-z0-9+/]*[A-Z])[A-Za-z0-9+/]*={0,2}")  # base64-like, not a word
API_KEY = (
    r"\b(?:sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,}"
    r"|xox[abposr]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35}|hf_[A-Za-z0-9]{30,}|glpat-[A-Za-z0-9_-]{20,}"
    r"|(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}|pk_live_[A-Za-z0-9]{16,}"
    r"|eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*)"
    r"|(?P<keep>(?:(?i:(?:aws_)?secret_access_key)|(?:AWS|Aws)?SecretAccessKey)[\"']?\s*[:=]\s*[\"']?)[A-Za-z0-9/+]{40}"
)

# (kind, placeholder, RE2 pattern, literal cues: the pattern is only run on texts containing one of them).
# A regex pass costs about as much whatever it looks for; `contains` is ~10x cheaper, so each kind is
# gated by substrings every match must contain, and the digit kinds by one shared digit test.
DIGITS = "digits"
PATTERNS: list[tuple[str, str, str, tuple[str, ...]]] = [
    ("url_credentials", "<URL_WITH_CREDENTIALS>", r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@]+:[^\s/@]+@[^\s\"'<>]+", ("://",)),
    ("bearer_token", "<BEARER_TOKEN>", BEARER, ("bearer", "Bearer", "BEARER")),
    ("basic_auth", "<BASIC_AUTH>", BASIC_AUTH, ("zation",)),
    ("api_key", "<API_KEY>", API_KEY, ("k-", "AKIA", "_", "xox", "AIza", "glpat-", ".eyJ", "AccessKey")),
    ("email", "<EMAIL>", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}", ("@",)),
    ("ip_address", "<IP_ADDRESS>", IP_ADDRESS, (".", ":")),
    ("credit_card", "<CREDIT_CARD>", CREDIT_CARD, (DIGITS,)),
    ("phone", "<PHONE>", PHONE, (DIGITS,)),
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


# Kinds whose regex only finds candidates: SQL over a candidate `c` and the placeholder `p` giving its
# replacement (`c` itself when it is not PII). RE2 has no lookahead, so "Luhn-valid" or "has a digit" is a filter.
_MASKS = {  # no regex inside: a lambda recompiles each pattern it holds for every chunk it runs on
    "bearer_token": "CASE WHEN " + _has_digit("c") + " OR (length(ltrim(c[7:], ' ' || chr(9) || chr(10) || chr(12) || chr(13))) >= 20"
                    " AND lower(c[7:]) <> c[7:] AND upper(c[7:]) <> c[7:]) THEN p ELSE c END",  # c[7:]: after `bearer`
    "credit_card": "CASE WHEN sdpo_luhn_valid(c) THEN p WHEN length(c) > 19 AND sdpo_luhn_valid(c[:19]) THEN p || c[20:] ELSE c END",
}


def _gate(cues: tuple[str, ...], var: str = "x") -> str:
    return " OR ".join(f"contains({var}, {_literal(cue)})" for cue in cues if cue != DIGITS) or "true"


def _mask(kind: str, placeholder: str, candidate: str) -> str:
    return f"sdpo_mask_{kind}({candidate}, {_literal(placeholder)})"


def _replace_step(expr: str, kind: str, placeholder: str, pattern: str, cues: tuple[str, ...]) -> str:
    """One redaction step over `expr`. The text is bound once through `list_transform([expr], lambda x: ...)[1]`
    so that a step using its input twice does not make the nested expression grow exponentially.
    A masked kind is linear in the text (one `replace()` per candidate was quadratic): its candidates are masked
    once; a text where all became the placeholder gets one `regexp_replace`, one where only some did is rebuilt
    from the pieces between candidates (`regexp_split_to_array`) and the masked candidates."""
    if kind in _MASKS:
        pat = _literal(pattern)
        rebuilt = (f"array_to_string(list_transform(regexp_split_to_array(x, {pat}), "
                   "lambda piece, i: piece || coalesce(masked[i], '')), '')")
        body = (f"list_transform([regexp_extract_all(x, {pat})], lambda found: CASE WHEN len(found) = 0 THEN x "
                f"ELSE list_transform([list_transform(found, lambda c: {_mask(kind, placeholder, 'c')})], "
                f"lambda masked: CASE WHEN masked = found THEN x WHEN list_distinct(masked) = [{_literal(placeholder)}] "
                f"THEN regexp_replace(x, {pat}, {_literal(placeholder)}, 'g') ELSE {rebuilt} END)[1] END)[1]")
    else:  # `(?P<keep>…)`, when there, is group 1 and stays
        replacement = ("\\1" if "(?P<keep>" in pattern else "") + placeholder
        body = f"regexp_replace(x, {_literal(pattern)}, {_literal(replacement)}, 'g')"
    return f"list_transform([{expr}], lambda x: CASE WHEN {_gate(cues)} THEN {body} ELSE x END)[1]"


def macros_sql() -> list[str]:
    """Statements creating the temp macros `sdpo_redact_pii(s)` (any one text expression), `sdpo_pii_counts(before,
    after)` (a struct: kind → count), `sdpo_pii_found(s)` (the kinds still in `s`), `sdpo_luhn_valid(s)` and
    the candidate masks `sdpo_mask_<kind>(c, placeholder)` on a connection."""
    luhn = """
    CREATE OR REPLACE TEMP MACRO sdpo_luhn_valid(s) AS (  -- s: a card candidate (digits, spaces, dashes)
        list_transform([replace(replace(s, ' ', ''), '-', '')], lambda digits:
            list_sum(list_transform(list_reverse(string_split(digits, '')),
                     lambda d, i: CASE WHEN i % 2 = 0 THEN (d::INTEGER * 2) - CASE WHEN d::INTEGER >= 5 THEN 9 ELSE 0 END
                                       ELSE d::INTEGER END)) % 10 = 0
            AND ltrim(digits, '0') <> '')[1]
    )"""
    masks = [f"CREATE OR REPLACE TEMP MACRO sdpo_mask_{kind}(c, p) AS ({sql})" for kind, sql in _MASKS.items()]
    text_steps, digit_steps, text_cues = "t", "x", []
    for kind, placeholder, pattern, cues in PATTERNS:
        if kind in _DIGIT_KINDS:
            digit_steps = _replace_step(digit_steps, kind, placeholder, pattern, cues)
        else:
            text_steps = _replace_step(text_steps, kind, placeholder, pattern, cues)
            text_cues += [cue for cue in cues if cue not in text_cues]
    # Binding a text (a list of one) costs about as much as a `contains`: one test of all the text kinds' cues
    # first, so that a text without any (most) is bound twice, not once per kind. The digit kinds come last
    # (after e-mails and keys, which may hold digits), behind one digit test.
    expr = (f"list_transform([s], lambda t: list_transform([CASE WHEN {_gate(tuple(text_cues), 't')} THEN {text_steps} ELSE t END], "
            f"lambda x: CASE WHEN {_has_digit('x')} THEN {digit_steps} ELSE x END)[1])[1]")
    redact = f"CREATE OR REPLACE TEMP MACRO sdpo_redact_pii(s) AS ({expr})"

    def occurrences(text: str, placeholder: str) -> str:
        return f"((length({text}) - length(replace({text}, {_literal(placeholder)}, ''))) // {len(placeholder)})"

    fields = ", ".join(
        f"{_literal(kind)}: ({occurrences('after', p)} - {occurrences('before', p)})::INTEGER" for kind, p, *_ in PATTERNS
    )
    counts = f"CREATE OR REPLACE TEMP MACRO sdpo_pii_counts(before, after) AS ({{{fields}}})"
    found_parts = []
    for kind, placeholder, pattern, cues in PATTERNS:  # same gates and masks as the redaction: costs about as much
        if kind in _MASKS:
            test = (f"len(list_filter(regexp_extract_all(x, {_literal(pattern)}), "
                    f"lambda c: {_mask(kind, placeholder, 'c')} <> c)) > 0")
        else:
            test = f"regexp_matches(x, {_literal(pattern)})"
        digit_gate = "d AND " if kind in _DIGIT_KINDS else ""
        found_parts.append(f"CASE WHEN {digit_gate}({_gate(cues)}) AND {test} THEN {_literal(kind)} END")
    kinds_found = f"list_filter([{', '.join(found_parts)}], lambda k: k IS NOT NULL)"
    found = ("CREATE OR REPLACE TEMP MACRO sdpo_pii_found(s) AS "
             f"(list_transform([s], lambda x: list_transform([{_has_digit('x')}], lambda d: {kinds_found})[1])[1])")
    return [luhn, *masks, redact, counts, found]


def install_macros(con: duckdb.DuckDBPyConnection) -> None:
    for statement in macros_sql():
        con.execute(statement).fetchall()


def redact(con: duckdb.DuckDBPyConnection, text: str) -> str:
    """Redact one string (for tests and for callers outside the SQL stages)."""
    install_macros(con)
    return con.execute("SELECT sdpo_redact_pii($text)", {"text": text}).fetchall()[0][0]
