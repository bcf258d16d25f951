"""What kind of follow-up a user wrote: a cheap, deterministic taxonomy with the evidence for each label.

The kind says *what* a follow-up can teach (a correction says the response was wrong; "thanks" says
almost nothing; a new topic says nothing about the response at all), so the interactions stage can
weight or drop triples before any model runs. Rules are regular expressions plus two structural
features (is it a question/request, how many of its content words already appear in x and y), all
evaluated in one DuckDB query over the whole table. Every row gets exactly one kind (first matching
rule in `KIND_PRIORITY`) and the list of features that fired, so a label can always be explained.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import pandas as pd

FOLLOWUP_KINDS = (
    "correction",
    "refinement",
    "negative_reaction",
    "positive_reinforcement",
    "continuation",
    "unrelated",
    "acknowledgement",
    "other",
)

# Lexical features: name -> RE2 pattern, matched against the lower-cased follow-up.
LEXICAL_FEATURES: dict[str, str] = {
    "says_wrong": r"\b(wrong|incorrect|inaccurate|untrue|not (correct|right|true|accurate)|(is|was)n'?t (correct|right|true)|that'?s not (it|true|right|correct)|(not|never) telling the truth|you('re| are) lying|liar|is (this|that|it) (true|right|correct))\b",
    "points_to_mistake": r"\b(mistake|typo|you (forgot|forget|missed|left out|ignored)|(does|did)(n'?t| not) include|is missing|you misunderstood|misunderstood me|not what i meant)\b",
    "restates_intent": r"(^|[.!?,]\s*)(no,? |nope,? )?(i mean|i meant|what i mean)\b|\bi thought it was\b|\bno,? (it|that|the) (is|was|should)\b",
    "asks_length_change": r"\b(shorter|longer|more concise|concise|briefer|too long|too short|fewer words|more details?|elaborate|expand|in (less|fewer|under) than|under \d+ words|in \d+ words|more detail)\b",
    "asks_format_change": r"\b(bullet|bullets|table|json|yaml|csv|markdown|numbered list|single line|one line|format|code block|paragraphs?|as a (poem|limerick|song|haiku|list|story|script))\b",
    "asks_style_change": r"\b(rewrite|re-write|rephrase|reword|revise|rework|reformulate|simplify|simpler|more formal|less formal|casual|tone|like i'?m (five|5)|polite|funnier|in the style|translate|amend|modify|alter|adjust|update (it|your|the)|change (it|this|that|your)|replace|make it|instead|do the same|repeat the same|same task|include it|also include|add (a|an|more|some)|(remove|eliminate) (it|the|this|that|all|any)|round all|(provide|give|add|include|cite) (the |a |some )?(sources?|citations?|references?))\b",
    "negative_words": r"\b(useless|unhelpful|not helpful|(does|did)(n'?t| not) (help|answer|work)|terrible|awful|horrible|bad (answer|response|job)|stupid|dumb|i don'?t like|not what i asked|you suck|worst|nonsense|garbage|rubbish|disappointing|why not|ugh|cuts off|cut off|ashamed|brain dead|you('re| are) (not|so far)|of course you don'?t|stop (lecturing|preaching|moralizing|refusing))\b",
    "positive_words": r"\b(great|perfect|awesome|excellent|exactly|well done|good (job|answer|one|ones|idea|ideas|work)|those are good|that'?s good|love (it|this|that)|nice|amazing|brilliant|that worked|it worked|lifesaver|(very|really|so) helpful|fantastic|wonderful|makes sense)\b",
    "acknowledges": r"^\W*(thanks|thank you|thank u|thx|ty|ok|okay|k|got it|cool|i see|noted|alright|all right|understood)\b",
    "asks_to_continue": r"^\W*(continue|go on|keep going|carry on|proceed|more|next|and then|what else|tell me more|finish)\b|\b(continue|go on|keep going|tell me more|what else|anything else|more (variations|examples|ideas|options)|move on to|next step|finish (it|the))\b",
    "builds_on_it": r"\b(what about|how about|what if|if we|in your (last|previous|first|second)|building on|based on (that|this|the above)|the above|above|previous|earlier|you said|same (thing|game|task)|then can you|of these|of those|that one|this one|those|these|(that|this|the) (story|chapter|code|script|program|function|list|table|answer|email|letter|essay|poem|song|plan|example|article|outline|text|draft))\b",
    "pronoun_reference": r"\b(it|them|they)\b",
    "refers_to_response": r"\b(your (answer|response|reply|code|solution|list|example|suggestion|email|letter|story|poem|text)|the (code|list|answer|letter|email|story|table|script) you)\b",
    "is_question": r"\?\s*$|^\W*(what|why|how|who|where|when|which|can|could|would|will|is|are|do|does|did|should|may)\b",
    "is_request": r"^\W*(please |pls |now,? |ok,? |so,? )?(write|give|create|make|explain|list|show|tell|provide|describe|generate|help|find|summarize|suggest|recommend|design|compose|draft|build|implement|prove|come up|pick|identify|calculate|convert|compare)\b",
}
STRUCTURAL_FEATURES = ("short", "topic_overlap", "no_topic_overlap")

# First matching rule wins. Corrections outrank refinements ("no, and make it shorter" is a correction);
# an explicit request to continue outranks praise ("Great! Tell me more." asks for more).
KIND_PRIORITY = (
    ("correction", "says_wrong OR points_to_mistake OR restates_intent"),
    ("refinement", "asks_length_change OR asks_format_change OR asks_style_change"),
    ("negative_reaction", "negative_words"),
    ("continuation", "asks_to_continue"),
    ("positive_reinforcement", "positive_words"),
    ("acknowledgement", "acknowledges AND n_words <= 6 AND NOT is_question"),
    ("continuation", "(is_question OR is_request) AND (builds_on_it OR refers_to_response OR topic_overlap OR (pronoun_reference AND n_words <= 10))"),
    ("unrelated", "(is_question OR is_request) AND no_topic_overlap AND NOT builds_on_it AND NOT refers_to_response AND NOT (pronoun_reference AND n_words <= 10)"),
    ("other", "TRUE"),
)

# Function words ignored by the topic-overlap feature (content words are >= 4 letters and not here).
STOPWORDS = (
    "about", "above", "after", "many", "again", "also", "been", "before", "being", "both", "could", "does", "doing", "each",
    "from", "have", "having", "here", "into", "just", "like", "make", "more", "most", "much", "only", "other", "over",
    "please", "same", "should", "some", "such", "than", "that", "their", "them", "then", "there", "these", "they",
    "this", "those", "very", "want", "what", "when", "where", "which", "while", "will", "with", "would", "your",
    "yours", "know", "think", "tell", "give", "good", "well", "really", "thing", "things", "can't", "dont", "it's",
    "that's", "thanks", "thank", "okay", "write", "explain", "help", "need",
)  # fmt: skip


@dataclass(frozen=True)
class FollowupClass:
    kind: str
    features: list[str]
    topic_overlap: float


def _classification_sql() -> str:
    """One query over `followup_input`: identifiers come from the fixed rule tables above, every
    pattern and threshold is a bound parameter."""
    lexical = ",\n".join(f"regexp_matches(f, ${name}) AS {name}" for name in LEXICAL_FEATURES)
    names = list(LEXICAL_FEATURES) + list(STRUCTURAL_FEATURES)
    fired = ", ".join(f"CASE WHEN {n} THEN '{n}' END" for n in names)
    kind = "\n".join(f"WHEN {rule} THEN '{k}'" for k, rule in KIND_PRIORITY)
    return f"""
    WITH base AS (
        SELECT interaction_id,
               lower(trim(followup)) AS f,
               list_distinct(list_transform(
                   list_filter(regexp_extract_all(lower(followup), '[a-z][a-z0-9'']+'),
                               lambda w: length(w) >= 4 AND NOT list_contains($stopwords, w)),
                   lambda w: left(regexp_replace(w, '([^s])s$', '\\1'), 5))) AS followup_words,
               list_distinct(list_transform(
                   regexp_extract_all(lower(coalesce(last_user, '') || ' ' || coalesce(response, '')), '[a-z][a-z0-9'']+'),
                   lambda w: left(regexp_replace(w, '([^s])s$', '\\1'), 5))) AS context_words,
               len(regexp_extract_all(followup, '\\S+')) AS n_words
        FROM followup_input
    ), features AS (
        SELECT *,
               {lexical},
               n_words <= 3 AS short,
               CASE WHEN len(followup_words) = 0 THEN 0.0
                    ELSE len(list_intersect(followup_words, context_words)) / len(followup_words) END AS overlap
        FROM base
    ), flagged AS (
        SELECT *, overlap >= $min_overlap AS topic_overlap,
               len(followup_words) > 0 AND overlap < $min_overlap AS no_topic_overlap
        FROM features
    )
    SELECT interaction_id,
           CASE {kind} END AS followup_kind,
           list_filter([{fired}], lambda x: x IS NOT NULL) AS followup_features,
           round(overlap, 4) AS topic_overlap
    FROM flagged
    """


def classify_followups(interactions: pd.DataFrame, min_topic_overlap: float = 0.3) -> pd.DataFrame:
    """`interaction_id, followup_kind, followup_features, topic_overlap` for each row, in input order.

    `interactions` needs `interaction_id`, `followup`, `response` and either `context` (chat messages;
    the last one is x's final user turn) or `prompt` (that turn as text). `topic_overlap` is the share
    of the follow-up's content words that already occur in that turn or in y.
    """
    missing = [c for c in ("interaction_id", "followup", "response") if c not in interactions.columns]
    if missing:
        raise ValueError(f"interactions lack columns {missing}")
    if "context" in interactions.columns:
        last_user = [_last_user_text(messages) for messages in interactions["context"]]
    elif "prompt" in interactions.columns:
        last_user = list(interactions["prompt"])
    else:
        raise ValueError("interactions need a `context` or a `prompt` column")
    frame = pd.DataFrame(
        {
            "interaction_id": interactions["interaction_id"].astype(str).to_numpy(),
            "followup": interactions["followup"].fillna("").astype(str).to_numpy(),
            "response": interactions["response"].fillna("").astype(str).to_numpy(),
            "last_user": pd.Series(last_user, dtype="object").fillna("").astype(str).to_numpy(),
        }
    )
    params = {name: pattern for name, pattern in LEXICAL_FEATURES.items()}
    params["stopwords"] = list(STOPWORDS)
    params["min_overlap"] = min_topic_overlap
    con = duckdb.connect()
    try:
        con.register("followup_input", frame)
        labelled = con.execute(_classification_sql(), params).df()
    finally:
        con.close()
    labelled = frame[["interaction_id"]].merge(labelled, on="interaction_id", how="left")
    labelled["followup_features"] = labelled["followup_features"].map(list)
    return labelled


def classify_followup(followup: str, response: str = "", prompt: str = "") -> FollowupClass:
    """One follow-up (tests, the CLI's single-row use): the same rules as `classify_followups`."""
    row = classify_followups(pd.DataFrame({"interaction_id": ["0"], "followup": [followup], "response": [response], "prompt": [prompt]})).iloc[0]
    return FollowupClass(kind=row["followup_kind"], features=list(row["followup_features"]), topic_overlap=float(row["topic_overlap"]))


def _last_user_text(messages) -> str:
    """The content of the last user message of x (chat messages as dicts, structs or a numpy array)."""
    if messages is None:
        return ""
    for message in reversed(list(messages)):
        if message["role"] == "user":
            return message["content"]
    return ""
