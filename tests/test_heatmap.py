"""Heatmaps: sign picks the colour, |A| the intensity, values on hover, log text escaped."""

from __future__ import annotations

import re

import pytest

from sdpo_platform.heatmap import BLUE, RED, HeatmapRow, decode_tokens, intensity_scale, render_html, token_span


def test_sign_picks_colour_and_magnitude_picks_intensity():
    strong_plus, weak_minus = token_span("yes", 2.0, scale=1.0), token_span("no", -0.25, scale=1.0)
    assert f"rgba({BLUE[0]},{BLUE[1]},{BLUE[2]},1.000)" in strong_plus  # clipped at full colour
    assert f"rgba({RED[0]},{RED[1]},{RED[2]},0.250)" in weak_minus
    assert 'title="A = +2.0000"' in strong_plus and 'title="A = -0.2500"' in weak_minus


def test_page_escapes_everything_from_the_logs():
    row = HeatmapRow(
        title="<b>id</b>",
        prompt="<script>alert(1)</script>",
        followup='"quoted" & <i>',
        tokens=["<img src=x onerror=alert(1)>", "\n", "ok"],
        advantages=[0.5, -0.1, 0.0],
    )
    page = render_html([row])
    assert "<script>alert" not in page and "<img src" not in page and "<i>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&quot;quoted&quot; &amp; &lt;i&gt;" in page
    assert len(re.findall(r'class="tok"', page)) == 3 and "↵<br>" in page  # newlines stay visible


def test_scale_ignores_a_single_outlier():
    rows = [HeatmapRow("r", "p", "f", ["t"] * 101, [0.1] * 100 + [50.0])]
    assert intensity_scale(rows) < 1.0
    assert intensity_scale([HeatmapRow("z", "p", "f", ["t"], [0.0])]) == 1.0  # all-zero rows do not divide by 0


SPLIT_CHARACTERS = "Party 🎉👍🏽 日本語 naïve"  # emoji, a skin-tone modifier, CJK, a Latin-1 letter: all multi-byte


def test_tokens_of_split_characters_join_to_the_text(tiny_model_dir):
    """Byte-level BPE spreads a character over tokens; decoded alone each would be U+FFFD."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer(SPLIT_CHARACTERS, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    tokens = decode_tokens(tokenizer, ids)
    assert len(tokens) == len(ids) and tokens[-1] == tokenizer.eos_token
    assert "".join(tokens) == SPLIT_CHARACTERS + tokenizer.eos_token
    assert "" in tokens  # a token ending inside a character shows nothing; the one completing it shows it
    page = render_html([HeatmapRow("r", "p", "f", tokens, [0.1] * len(tokens))])
    assert "\ufffd" not in page and "🎉" in page and "語" in page


def test_sentencepiece_tokens_keep_their_leading_space():
    """A SentencePiece-style tokenizer (▁ for space, byte fallback) decodes a lone '▁na' as 'na'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = [("<unk>", 0.0), ("</s>", 0.0), *((f"<0x{b:02X}>", -10.0) for b in range(256)), ("▁Party", -1.0), ("▁na", -1.0), ("ve", -1.0), ("▁", -2.0)]
    backend = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")
    ids = tokenizer(SPLIT_CHARACTERS, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert decode_tokens(tokenizer, ids) == [
        "Party", " ", "", "", "", "🎉", "", "", "", "👍", "", "", "", "🏽", " ", "", "", "日", "", "", "本", "", "", "語",
        " na", "", "ï", "ve", "</s>",
    ]


def test_each_run_publishes_its_own_page_and_keeps_earlier_ones(tiny_model_dir, sdpo_home):
    """A set grows in place, so one page per set would rewrite what an earlier run showed."""
    import pandas as pd
    from mlflow import MlflowClient
    from transformers import AutoTokenizer

    from sdpo_platform.heatmap import publish_extremes, strongest_tokens
    from sdpo_platform.target_workers import TargetSetResult

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer("Sure, here it is", add_special_tokens=False)["input_ids"]
    set_dir = sdpo_home / "targets" / "set-a"
    result = TargetSetResult(str(set_dir), "set-a", "rev", "tmpl", rows=8, shards=1, shards_scored=1, shards_reused=0)

    def frames(n):
        advantages = [[0.1 * (i + 1) * (-1) ** j for j in range(len(ids))] for i in range(n)]
        targets = pd.DataFrame({
            "interaction_id": [f"i{i}" for i in range(n)], "response_ids": [ids] * n, "advantages": advantages,
            "mean_abs_advantage": [sum(map(abs, a)) / len(a) for a in advantages], "truncated": False,
        })
        interactions = pd.DataFrame({
            "interaction_id": targets["interaction_id"],
            "context": [[{"role": "user", "content": f"question {i}"}] for i in range(n)],
            "followup": [f"too long {i}" for i in range(n)],
            "informativeness": 0.5,  # all alike: mean |A| orders them
        })
        return targets, interactions

    first = publish_extremes(result, *frames(8), tokenizer, "heatmaps-test", run_label="run1")
    first_page = first.path.read_text()
    second = publish_extremes(result, *frames(12), tokenizer, "heatmaps-test", run_label="run2")
    assert first.path != second.path and first.path.read_text() == first_page  # the earlier run's page is kept
    assert first.path.parent == set_dir / "heatmaps" and "i11" in second.path.read_text() and "i11" not in first_page
    assert [r.title.split(" · ")[1] for r in second.rows] == ["i11", "i10", "i9", "i2", "i1", "i0"]
    logged = MlflowClient().list_artifacts(second.mlflow_run_id, "heatmaps")
    assert [a.path for a in logged] == ["heatmaps/extremes-run2.html"]

    reinforced, penalized = strongest_tokens(second.rows[0], k=2)
    assert [a for _, a in reinforced] == pytest.approx([1.2, 1.2]) and [a for _, a in penalized] == pytest.approx([-1.2, -1.2])


def test_extremes_are_ranked_by_the_platforms_informativeness_and_small_runs_split_in_half():
    """Mean |A| alone tells a relevant follow-up from an unrelated one no better than chance, so the page's
    "most informative" is the platform's judgement; mean |A| only orders equal scores."""
    import pandas as pd

    from sdpo_platform.heatmap import extremes_rows

    class Characters:  # a tokenizer whose ids are characters
        def decode(self, ids, **_):
            return "".join(map(chr, ids))

    def rows(scores, mean_abs):
        n = len(scores)
        targets = pd.DataFrame({"interaction_id": [f"i{i}" for i in range(n)], "response_ids": [[104, 105]] * n,
                                "advantages": [[a, -a] for a in mean_abs], "mean_abs_advantage": mean_abs, "truncated": False})
        interactions = pd.DataFrame({"interaction_id": targets["interaction_id"], "informativeness": scores,
                                     "context": [[{"role": "user", "content": "q"}]] * n, "followup": "f"})
        return [r.title for r in extremes_rows(targets, interactions, Characters())]

    # i0: an unrelated follow-up with the largest |A|; i3: a clear refinement with the smallest
    assert rows([0.2, 0.6, 0.6, 0.95, 0.4, 0.1, 0.7, 0.3], [0.9, 0.2, 0.3, 0.05, 0.5, 0.6, 0.1, 0.4]) == [
        "most informative (0.95) · i3", "most informative (0.70) · i6", "most informative (0.60) · i2",
        "least informative (0.30) · i7", "least informative (0.20) · i0", "least informative (0.10) · i5"]
    assert rows([0.9, 0.1, 0.5], [0.1, 0.2, 0.3]) == [
        "most informative (0.90) · i0", "most informative (0.50) · i2", "least informative (0.10) · i1"]
    assert rows([0.9, 0.1], [0.1, 0.2]) == ["most informative (0.90) · i0", "least informative (0.10) · i1"]


def test_a_literal_replacement_character_stays_with_its_own_token(tiny_model_dir):
    """Scraped logs carry U+FFFD as text; it must not be taken for a character split over tokens (which would
    move it onto the next token, EOS included)."""
    from transformers import AutoTokenizer

    from sdpo_platform.heatmap import decode_tokens

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for text in ["My name is Jos\ufffd", "He said \ufffd hi", "\ufffd\ufffd then 😀"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        pieces = decode_tokens(tokenizer, ids)
        assert len(pieces) == len(ids) and "".join(pieces) == text + tokenizer.eos_token
        assert pieces[-1] == tokenizer.eos_token
        assert pieces[:-1] == decode_tokens(tokenizer, ids[:-1])  # the same pieces whatever follows
