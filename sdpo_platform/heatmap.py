"""Per-token advantage heatmaps for people to read, like the paper's Figures 7–8.

Each response token is shaded by its advantage A_i: blue where the follow-up made it more likely
(reinforced), red where it made it less likely (penalized), intensity ∝ |A_i|; hovering a token shows
its value. All text from the logs is HTML-escaped; nothing from the data reaches the page unescaped.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BLUE, RED = (37, 99, 235), (220, 38, 38)
# The MLflow run tag naming the interactions a run's page shows (a JSON list): `sdpo forget` finds the pages
# that show a forgotten file's interactions from it, without downloading every page.
SHOWN_TAG = "heatmap_interactions"


@dataclass
class HeatmapRow:
    """One interaction to draw: what the user asked, what came back, what the user said next."""

    title: str
    prompt: str
    followup: str
    tokens: list[str]
    advantages: list[float]
    interaction_id: str | None = None  # for a page logged by a run: what an erasure must find


def intensity_scale(rows: list[HeatmapRow], quantile: float = 0.98) -> float:
    """|A| that maps to full colour: a high quantile over the page, so one outlier does not wash out the rest."""
    values = np.abs(np.concatenate([np.asarray(r.advantages, dtype=float) for r in rows])) if rows else np.zeros(0)
    return float(np.quantile(values, quantile)) if values.size and np.quantile(values, quantile) > 0 else 1.0


def token_span(token: str, advantage: float, scale: float) -> str:
    """One token as a shaded <span> whose tooltip carries the value; whitespace stays visible."""
    red, green, blue = BLUE if advantage >= 0 else RED
    alpha = min(abs(advantage) / scale, 1.0)
    text = html.escape(token).replace("\n", "↵<br>")
    return (
        f'<span class="tok" style="background: rgba({red},{green},{blue},{alpha:.3f})" '
        f'title="A = {advantage:+.4f}">{text}</span>'
    )


def render_html(rows: list[HeatmapRow], heading: str = "Per-token advantages") -> str:
    """A self-contained HTML page with one heatmap per row and a legend."""
    scale = intensity_scale(rows)
    sections = []
    for row in rows:
        values = np.asarray(row.advantages, dtype=float)
        spans = "".join(token_span(t, float(a), scale) for t, a in zip(row.tokens, row.advantages))
        summary = f"mean A {values.mean():+.4f} · mean |A| {np.abs(values).mean():.4f} · {len(values)} tokens" if values.size else "no tokens"
        sections.append(
            "<section>"
            f"<h2>{html.escape(row.title)}</h2>"
            f'<p class="meta">{summary}</p>'
            f'<div class="turn user"><b>User</b><pre>{html.escape(row.prompt)}</pre></div>'
            f'<div class="turn assistant"><b>Response</b><div class="heat">{spans}</div></div>'
            f'<div class="turn followup"><b>Follow-up</b><pre>{html.escape(row.followup)}</pre></div>'
            "</section>"
        )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(heading)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; color: #111; }}
section {{ border-top: 1px solid #ddd; padding: 1rem 0; }}
pre {{ white-space: pre-wrap; margin: .25rem 0; font-family: inherit; }}
.heat {{ font-family: ui-monospace, monospace; line-height: 1.8; white-space: pre-wrap; }}
.tok {{ border-radius: 2px; }}
.meta {{ color: #555; font-size: .9rem; }}
.legend span {{ padding: 0 .4rem; }}
</style></head><body>
<h1>{html.escape(heading)}</h1>
<p class="legend"><span style="background: rgba({",".join(map(str, BLUE))},.8)">reinforced (A &gt; 0)</span>
<span style="background: rgba({",".join(map(str, RED))},.8)">penalized (A &lt; 0)</span>
intensity = |A| (full colour at |A| ≥ {scale:.3f}); hover a token for its value.</p>
{"".join(sections)}
</body></html>
"""


def decode_tokens(tokenizer, token_ids: list[int]) -> list[str]:
    """Each token's text (special tokens such as EOS included), one entry per token, joining to exactly
    the decoded response, so the page shows what was scored.

    Tokens are not decoded alone: byte-level BPE splits one emoji or CJK character over several tokens
    (alone each is U+FFFD), and SentencePiece drops a lone token's leading space. Each token instead
    gets what it adds to the decoded prefix; a token ending inside a character shows "" and the one
    completing it shows the character. A prefix counts once the whole text starts with it, so a prefix
    ending in a U+FFFD that later tokens rewrite is incomplete, and a literal U+FFFD in the text (common in
    scraped logs) stays with its own token. Quadratic in the length, fine for responses.
    """
    ids = [int(t) for t in token_ids]
    texts = [tokenizer.decode(ids[:end], skip_special_tokens=False, clean_up_tokenization_spaces=False) for end in range(1, len(ids) + 1)]
    pieces, shown = [], ""
    for end, text in enumerate(texts, start=1):
        if end < len(ids) and not (texts[-1].startswith(text) and len(text) >= len(shown)):
            pieces.append("")  # a character still incomplete: its bytes carry to the next token
            continue
        pieces.append(text[len(shown) :])
        shown = text
    return pieces


def rows_from_targets(targets, tokenizer, interaction_text: dict[str, tuple[str, str]], title_prefix: str = "") -> list[HeatmapRow]:
    """HeatmapRows from target rows; `interaction_text[id] = (last user message, follow-up)`."""
    rows = []
    columns = ("interaction_id", "response_ids", "advantages", "truncated")
    for interaction_id, response_ids, advantages, truncated in zip(*(targets[c] for c in columns)):
        prompt, followup = interaction_text.get(interaction_id, ("", ""))
        title = f"{title_prefix}{interaction_id}" + (CUT_NOTE if truncated else "")
        rows.append(HeatmapRow(title, prompt, followup, decode_tokens(tokenizer, response_ids), list(advantages), interaction_id))
    return rows


CUT_NOTE = " (response cut at the length limit: its first tokens, no EOS, as training scores it)"


def extremes(targets, n: int = 3) -> tuple[object, int]:
    """(the `n` most and `n` least informative interactions, most informative first; how many lead as the
    most). Informative as the platform judges it (`informativeness`, the follow-up's kind and the model's
    signal), not by mean |A|, which alone tells a relevant follow-up from an unrelated one no better than
    chance; equal scores are ordered by mean |A|. With `2n` rows or fewer, the better half leads."""
    ranked = targets.sort_values(["informativeness", "mean_abs_advantage", "interaction_id"], ascending=[False, False, True])
    if len(ranked) <= 2 * n:
        return ranked, (len(ranked) + 1) // 2
    return ranked.iloc[list(range(n)) + list(range(len(ranked) - n, len(ranked)))], n


def strongest_tokens(row: HeatmapRow, k: int = 3) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """The `k` most reinforced (largest A > 0) and `k` most penalized (smallest A < 0) tokens of a row:
    what the follow-up changed most, for a one-line preview where the page cannot be shown."""
    pairs = [(t, float(a)) for t, a in zip(row.tokens, row.advantages) if t.strip()]
    reinforced = sorted((p for p in pairs if p[1] > 0), key=lambda p: -p[1])[:k]
    penalized = sorted((p for p in pairs if p[1] < 0), key=lambda p: p[1])[:k]
    return reinforced, penalized


def extremes_rows(targets, interactions, tokenizer, n: int = 3) -> list[HeatmapRow]:
    """HeatmapRows of `extremes`, titled most/least informative with their score; `interactions` supplies
    the text (context, followup) and the informativeness."""
    scores = interactions[["interaction_id", "informativeness"]].drop_duplicates("interaction_id")
    chosen, leading = extremes(targets.merge(scores, on="interaction_id", how="left", validate="one_to_one"), n)
    wanted = set(chosen["interaction_id"])
    text = {
        i: (list(c)[-1]["content"], f)
        for i, c, f in zip(interactions["interaction_id"], interactions["context"], interactions["followup"])
        if i in wanted
    }
    rows = rows_from_targets(chosen, tokenizer, text)
    for position, (row, score) in enumerate(zip(rows, chosen["informativeness"])):
        row.title = f"{'most' if position < leading else 'least'} informative ({score:.2f}) · {row.title}"
    return rows


@dataclass
class PublishedHeatmap:
    """Where one run's extremes page went: a file beside the set and an MLflow run's artifact."""

    path: Path
    mlflow_run_id: str
    rows: list[HeatmapRow]


def publish_extremes(
    result, targets, interactions, tokenizer, experiment: str, tracking_uri: str | None = None, run_label: str | None = None
) -> PublishedHeatmap:
    """Write this run's extremes page under the set's `heatmaps/` and log it, with the set's summary, to an
    MLflow run `targets-<set>`.

    One page per run (`heatmaps/extremes-<run_label>.html`, the label defaulting to the time), not one per
    set: a set grows in place, so each run's most and least informative interactions differ and an
    earlier run's page must stay what that run showed.
    """
    import time

    import mlflow

    from sdpo_platform.registry import configure_mlflow

    label = run_label or time.strftime("%Y%m%dT%H%M%S")
    heatmap = Path(result.path) / "heatmaps" / f"extremes-{label}.html"
    heatmap.parent.mkdir(parents=True, exist_ok=True)
    rows = extremes_rows(targets, interactions, tokenizer)
    heatmap.write_text(render_html(rows, heading=f"Hindsight targets {result.target_set} ({label})"), encoding="utf-8")
    configure_mlflow(tracking_uri, experiment)
    with mlflow.start_run(run_name=f"targets-{result.target_set}") as run:
        mlflow.set_tags({"target_set": result.target_set, "model_revision": result.model_revision,
                         "template_hash": result.template_hash, "run_label": label,
                         SHOWN_TAG: json.dumps([row.interaction_id for row in rows])})
        mlflow.log_metrics({
            "rows": result.rows,
            "shards_scored": result.shards_scored,
            "mean_abs_advantage": float(targets["mean_abs_advantage"].mean()),
        })
        mlflow.log_artifact(str(heatmap), artifact_path="heatmaps")
    return PublishedHeatmap(heatmap, run.info.run_id, rows)
