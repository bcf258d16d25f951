"""Heatmaps: sign picks the colour, |A| the intensity, values on hover, log text escaped."""

from __future__ import annotations

import re

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
