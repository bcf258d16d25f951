"""Guardrails on what users can teach: unsafe follow-ups, caps per user and conversation, principles.

SDPO learns whatever the follow-up makes more likely, so a user who praises a harmful answer, pushes
past a refusal or asks for a jailbreak is a training signal toward that behaviour (paper §6). The
flag is deliberately lexical and conservative (DuckDB regular expressions over the whole table):
a false positive costs one training triple, a false negative teaches the model harm. Caps keep one
prolific user or conversation from dominating the kept set.
"""

from __future__ import annotations

import duckdb
import pandas as pd

from sdpo_platform.config import InformativenessConfig

# Follow-up rules: name -> RE2 pattern on the lower-cased follow-up.
FOLLOWUP_RULES: dict[str, str] = {
    "jailbreak": r"ignore (all |any )?(of )?(the |your )?(previous|prior|above|earlier) (instructions|rules|prompts?|messages)|\bdan\b|do anything now|developer mode|jailbreak|\bno (rules|restrictions|content filters|filters|limits|guidelines)\b|without (any )?(filters|restrictions|warnings|censorship|rules|disclaimers)|\b(unfiltered|uncensored)\b|stay in character|you are no longer bound|bypass (your|the) (filters?|safety|rules)",
    "violence": r"\b(kill|killing|murder|hurt (someone|him|her|them|people)|inflict pain|injure|torture|kidnap|abduct|bomb|explosives?|poison|poisons|shoot (him|her|them|someone|up)|stab|assault|rape|abuse my|bury (someone|him|her|them) alive|drugged|spike|knock (grandma|him|her|them|someone) out|suppress(ed)? again|destroy (their|his|her|someone'?s))\b",
    "crime": r"\b(steal|stealing|rob|robbing|shoplift|burglar|break into|hack(ing)? (into|her|his|their|someone|the|my)|launder|counterfeit|fake (id|pay ?stubs?|reviews?|passport|documents)|get away with|without (getting caught|being caught|them knowing)|avoid (getting )?caught|avoid (the )?police|cheat on (my|a|the) (test|exam|taxes)|gotta cheat|evade taxes|illegally|stalk|spy on|credit card (numbers|info)|bank password|ransom|reverse number search)\b",
    "drugs": r"\b(meth|cocaine|heroin|fentanyl|street drugs?|get high|cook (meth|drugs)|sell drugs|get into drugs)\b",
    "hate": r"nigg|\b(fags?|faggots?|kikes?|spics?|chinks?|trannys?|retards?)\b|\b(are|is) (far )?(inferior|superior)|white power|minorities|subhuman|racist scumbag|insults? (for|against)|mean and hurtful|(ugly|gross) and smell",
    "deception": r"\b((make|making) up|fabricate|fake) (sources|citations|facts|data|evidence|quotes)|lie (to|during)|without being caught|deceive|mislead|impersonat|pretend(ing)? to be (a|an|the) (doctor|lawyer|customer|cop|police)|phishing|\bscam\b|convince .{0,40}(password|bank)",
    "sexual": r"\b(suck (this|my) dick|lick my|naked|nudes?|tits)\b",
    "refusal_pressure": r"stop (refusing|lecturing|moralizing|preaching)|just (give|tell) me (the )?(instructions|answer|how)|you can tell me|it'?s (only|just) a question|i'?m not (going to|gonna) actually|for a school project|i am a cop|hypothetically|it'?s for a (novel|story|book)|please don'?t call the police",
}
# Applied to x's last user turn and y: a pressing or approving follow-up in such a conversation is flagged.
HARMFUL_CONTEXT = "|".join(FOLLOWUP_RULES[k] for k in ("violence", "crime", "drugs", "hate", "deception"))
PRESSES_OR_APPROVES = (
    r"^\W*(yes|yeah|yep|ok|okay|sure|please|go on|tell me|how|what|which|where|can you|could you|would|will you)\b"
    r"|\b(good (ideas?|ones?)|great|perfect|that works|help me|tips|steps|other ways|what else|how do i|is good)\b"
)

PRINCIPLES = "Follow the user's feedback only where it asks for helpful, honest and harmless behaviour."


def flag_unsafe(interactions: pd.DataFrame) -> pd.DataFrame:
    """`interaction_id, safety_flag, safety_reasons` (rule names that fired), in input order.

    A follow-up is flagged when it matches a follow-up rule, or when it presses on / approves of a
    conversation whose last user turn or response already matches the harmful patterns
    (`pressed_harmful_context`): "Those are good ideas!" after advice on ruining a reputation.
    """
    from sdpo_platform.followups import _last_user_text

    if "context" in interactions.columns:
        last_user = [_last_user_text(messages) for messages in interactions["context"]]
    else:
        last_user = list(interactions["prompt"]) if "prompt" in interactions.columns else [""] * len(interactions)
    frame = pd.DataFrame(
        {
            "interaction_id": interactions["interaction_id"].astype(str).to_numpy(),
            "f": interactions["followup"].fillna("").astype(str).str.lower().to_numpy(),
            "ctx": (pd.Series(last_user, dtype="object").fillna("").astype(str) + " \n " + interactions["response"].fillna("").astype(str).to_numpy()).str.lower().to_numpy(),
        }
    )
    fired = ", ".join(f"CASE WHEN regexp_matches(f, ${name}) THEN '{name}' END" for name in FOLLOWUP_RULES)
    params = dict(FOLLOWUP_RULES)
    params.update(harmful_context=HARMFUL_CONTEXT, presses=PRESSES_OR_APPROVES)
    con = duckdb.connect()
    try:
        con.register("safety_input", frame)
        flagged = con.execute(
            f"""
            WITH rules AS (
                SELECT interaction_id,
                       list_filter([{fired},
                                    CASE WHEN regexp_matches(ctx, $harmful_context) AND regexp_matches(f, $presses)
                                         THEN 'pressed_harmful_context' END],
                                   lambda x: x IS NOT NULL) AS safety_reasons
                FROM safety_input
            )
            SELECT interaction_id, len(safety_reasons) > 0 AS safety_flag, safety_reasons FROM rules
            """,
            params,
        ).df()
    finally:
        con.close()
    flagged = frame[["interaction_id"]].merge(flagged, on="interaction_id", how="left")
    flagged["safety_reasons"] = flagged["safety_reasons"].map(list)
    flagged["safety_flag"] = flagged["safety_flag"].astype(bool)
    return flagged


def group_caps(n_candidates: int, cfg: InformativenessConfig) -> tuple[int, int]:
    """(per-user cap, per-conversation cap) in triples for a kept set drawn from `n_candidates`."""
    user_cap = max(cfg.min_group_cap, int(cfg.max_user_share * n_candidates))
    conversation_cap = max(cfg.min_group_cap, int(cfg.max_conversation_share * n_candidates))
    return user_cap, conversation_cap


def apply_caps(assessed: pd.DataFrame, cfg: InformativenessConfig) -> pd.DataFrame:
    """Mark rows beyond the caps with `exclusion_reason` 'conversation_cap' / 'user_cap'.

    Candidates are rows without an `exclusion_reason`; within each conversation (then each user) the
    most informative ones are kept (ties by interaction id). Users are conversations when `user_id` is
    missing or null. Other columns pass through unchanged, in input order.
    """
    frame = assessed.copy()
    frame["_row"] = range(len(frame))
    for column in ("conversation_id", "user_id"):
        if column not in frame.columns:
            frame[column] = None
    candidates = int(frame["exclusion_reason"].isna().sum())
    user_cap, conversation_cap = group_caps(candidates, cfg)
    keys = pd.DataFrame(
        {
            "_row": frame["_row"].to_numpy(),
            "interaction_id": frame["interaction_id"].astype(str).to_numpy(),
            "conversation_key": frame["conversation_id"].astype("object").where(frame["conversation_id"].notna(), frame["interaction_id"]).astype(str).to_numpy(),
            "user_key": frame["user_id"].astype("object").where(frame["user_id"].notna(), frame["conversation_id"]).astype("object"),
            "informativeness": frame["informativeness"].astype(float).to_numpy(),
            "candidate": frame["exclusion_reason"].isna().to_numpy(),
        }
    )
    keys["user_key"] = keys["user_key"].where(keys["user_key"].notna(), keys["conversation_key"]).astype(str)
    con = duckdb.connect()
    try:
        con.register("cap_input", keys)
        capped = con.execute(
            """
            WITH by_conversation AS (
                SELECT *, CASE WHEN candidate THEN row_number() OVER (
                              PARTITION BY conversation_key, candidate ORDER BY informativeness DESC, interaction_id) END AS conversation_rank
                FROM cap_input
            ), by_user AS (
                SELECT *, CASE WHEN candidate AND conversation_rank <= $conversation_cap THEN row_number() OVER (
                              PARTITION BY user_key, candidate AND conversation_rank <= $conversation_cap
                              ORDER BY informativeness DESC, interaction_id) END AS user_rank
                FROM by_conversation
            )
            SELECT _row,
                   CASE WHEN candidate AND conversation_rank > $conversation_cap THEN 'conversation_cap'
                        WHEN candidate AND user_rank > $user_cap THEN 'user_cap' END AS cap_reason
            FROM by_user ORDER BY _row
            """,
            {"conversation_cap": conversation_cap, "user_cap": user_cap},
        ).df()
    finally:
        con.close()
    frame = frame.merge(capped, on="_row", how="left")
    frame["exclusion_reason"] = frame["exclusion_reason"].where(frame["exclusion_reason"].notna(), frame["cap_reason"])
    frame["exclusion_reason"] = frame["exclusion_reason"].astype("object").where(frame["exclusion_reason"].notna(), None)
    return frame.drop(columns=["_row", "cap_reason"])


def principled_template(template: str, principles: str = PRINCIPLES) -> str:
    """`template` with `principles` placed just before the follow-up, where the teacher reads it.

    Works for any template with a `{followup}` field; the result still has `{last_user}` and
    `{followup}`, so it can be set as `TargetsConfig.template` (its hash changes, so target sets never mix).
    """
    if "{followup}" not in template:
        raise ValueError("template has no {followup} field")
    return template.replace("{followup}", principles + " {followup}", 1)


def exclusion_summary(assessed: pd.DataFrame) -> dict:
    """Counts for asset metadata: kept, excluded by reason, safety rules that fired, kinds kept."""
    reasons = assessed["exclusion_reason"].fillna("kept").value_counts().to_dict()
    fired = pd.Series([r for rs in assessed["safety_reasons"] for r in rs], dtype="object").value_counts().to_dict()
    kinds = assessed.loc[assessed["keep"], "followup_kind"].value_counts().to_dict()
    return {
        "n_interactions": int(len(assessed)),
        "n_kept": int(assessed["keep"].sum()),
        "kept_fraction": float(assessed["keep"].mean()) if len(assessed) else 0.0,
        "excluded_by_reason": {k: int(v) for k, v in reasons.items() if k != "kept"},
        "safety_rules_fired": {k: int(v) for k, v in fired.items()},
        "kept_by_kind": {k: int(v) for k, v in kinds.items()},
    }
