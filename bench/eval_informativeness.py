"""Measure the follow-up taxonomy, the safety guardrail and the informativeness signals on the labelled set.

    HF_HUB_OFFLINE=1 python bench/eval_informativeness.py [--model default] [--limit 120] [--signals followup_pmi|all|none]

1. Taxonomy: precision / recall / F1 per kind on every labelled follow-up (rules only, instant).
2. Guardrail: precision / recall of `safety_flag` against the `unsafe` labels, and flag rates on every
   HH-RLHF red-team triple vs the MT-Bench and ShareGPT follow-ups (false-positive proxy).
3. ROC AUC relevant-vs-unrelated of each model signal, of the kind prior and of the combined
   `informativeness`, on a deterministic subsample of `--limit` relevant/unrelated rows (half each, by
   md5 of the id), so the default run fits the 10-minute CPU budget; `--limit 0` scores all 357 such
   rows. `--signals all` adds the five hindsight-advantage variants (about 6 long sequences per row
   instead of 2 short ones). Scores are cached under /tmp (by model revision and token ids): reruns only pay for new sequences.
Prints one JSON document; docs/INFORMATIVENESS.md quotes it.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import pickle
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdpo_platform.config import DEFAULT_HINDSIGHT_TEMPLATE, InformativenessConfig  # noqa: E402
from sdpo_platform.followups import FOLLOWUP_KINDS, classify_followups  # noqa: E402
from sdpo_platform.informativeness import ALL_SIGNALS, calibrate, combine, model_signals  # noqa: E402
from sdpo_platform.safety import flag_unsafe  # noqa: E402

EVAL_SET = ROOT / "data" / "followup_eval" / "followups.jsonl"
HH_RED_TEAM = ROOT.parent / "shared" / "data" / "hh_rlhf" / "harmless-base-test.jsonl.gz"


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUC (ties count half): P(score of a positive > score of a negative)."""
    ranks = pd.Series(scores).rank(method="average").to_numpy()
    positives = labels.astype(bool)
    n_pos, n_neg = positives.sum(), (~positives).sum()
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def taxonomy_report(frame: pd.DataFrame, predicted: pd.Series) -> dict:
    rows = {}
    for kind in FOLLOWUP_KINDS:
        tp = int(((predicted == kind) & (frame["kind"] == kind)).sum())
        n_pred, n_true = int((predicted == kind).sum()), int((frame["kind"] == kind).sum())
        precision = tp / n_pred if n_pred else float("nan")
        recall = tp / n_true if n_true else float("nan")
        f1 = 2 * precision * recall / (precision + recall) if n_pred and n_true and (precision + recall) else 0.0
        rows[kind] = {"n": n_true, "predicted": n_pred, "precision": round(precision, 3), "recall": round(recall, 3), "f1": round(f1, 3)}
    return {"accuracy": round(float((predicted == frame["kind"]).mean()), 3), "per_kind": rows}


def hh_red_team_triples() -> pd.DataFrame:
    """Every (first human turn, first assistant turn, second human turn) of the harmless-base test split."""
    rows = []
    with gzip.open(HH_RED_TEAM, "rt") as handle:
        for line_no, line in enumerate(handle):
            parts = re.split(r"\n\n(Human|Assistant): ", json.loads(line)["chosen"])
            turns = [(parts[k], parts[k + 1].strip()) for k in range(1, len(parts) - 1, 2)]
            if len(turns) >= 3 and [t[0] for t in turns[:3]] == ["Human", "Assistant", "Human"]:
                rows.append({"interaction_id": f"hh-{line_no}", "prompt": turns[0][1], "response": turns[1][1], "followup": turns[2][1]})
    return pd.DataFrame(rows)


def safety_report(frame: pd.DataFrame) -> dict:
    flags = flag_unsafe(frame)["safety_flag"].to_numpy()
    truth = frame["unsafe"].to_numpy(dtype=bool)
    tp = int((flags & truth).sum())
    red_team = hh_red_team_triples()
    red_flags = flag_unsafe(red_team)["safety_flag"]
    benign = frame[frame["source"].isin(["mt_bench", "sharegpt", "written_control"]) & ~frame["unsafe"]]
    return {
        "labelled": {"n_unsafe": int(truth.sum()), "flagged": int(flags.sum()), "precision": round(tp / max(flags.sum(), 1), 3), "recall": round(tp / max(truth.sum(), 1), 3)},
        "labelled_by_source_flag_rate": {s: round(float(flags[(frame["source"] == s).to_numpy()].mean()), 3) for s in sorted(frame["source"].unique())},
        "hh_red_team_all_triples": {"n": int(len(red_team)), "flag_rate": round(float(red_flags.mean()), 3)},
        "benign_false_positive_rate": round(float(flag_unsafe(benign)["safety_flag"].mean()), 3),
    }


def subsample(frame: pd.DataFrame, limit: int) -> pd.DataFrame:
    candidates = frame[frame["relevance"].isin(["relevant", "unrelated"])].copy()
    if limit <= 0 or limit >= len(candidates):
        return candidates
    candidates["_order"] = [hashlib.md5(i.encode()).hexdigest() for i in candidates["interaction_id"]]
    # Half relevant, half unrelated, so the AUC is not dominated by one side.
    halves = [g.sort_values("_order").head(limit // 2) for _, g in candidates.groupby("relevance")]
    return pd.concat(halves).drop(columns="_order")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--limit", type=int, default=120, help="relevant+unrelated rows scored by the model (0 = all)")
    parser.add_argument("--signals", default="followup_pmi", help="comma-separated signals, or 'all', or 'none' (taxonomy and safety only)")
    parser.add_argument("--template", default=DEFAULT_HINDSIGHT_TEMPLATE, help="hindsight template for the hindsight signals")
    parser.add_argument("--cache", help="pickle of scored sequences, reused for the same model revision only "
                        "(default /tmp/sdpo_informativeness_scores-<model revision>.pkl)")
    args = parser.parse_args(argv)

    cfg = InformativenessConfig()
    frame = pd.read_json(EVAL_SET, lines=True, dtype={"id": str})
    frame["interaction_id"] = frame["id"]
    report: dict = {"eval_set": {"n": int(len(frame)), "by_source": frame["source"].value_counts().to_dict(), "by_relevance": frame["relevance"].value_counts().to_dict()}}
    kinds = classify_followups(frame, cfg.min_topic_overlap)
    report["taxonomy"] = taxonomy_report(frame, kinds["followup_kind"])
    report["safety"] = safety_report(frame)

    relevant = (frame["relevance"] == "relevant").to_numpy()
    both = frame["relevance"].isin(["relevant", "unrelated"]).to_numpy()
    prior = combine(kinds["followup_kind"], None, cfg)
    report["auc_all_rows"] = {"kind_prior": round(roc_auc(relevant[both], prior[both]), 3), "n": int(both.sum())}

    signals = () if args.signals == "none" else (ALL_SIGNALS if args.signals == "all" else tuple(args.signals.split(",")))
    if signals:
        from sdpo_platform.models import load_model, model_revision

        sample = subsample(frame, args.limit)
        revision = model_revision(args.model)  # scores are the model's: another model's are never reused
        cache_path = Path(args.cache or f"/tmp/sdpo_informativeness_scores-{revision}.pkl")
        stored = pickle.loads(cache_path.read_bytes()) if cache_path.exists() else {}
        cache = stored.get("scores", {}) if isinstance(stored, dict) and stored.get("model_revision") == revision else {}
        cached_before = len(cache)
        model, tokenizer = load_model(args.model, device="cpu")
        started = time.perf_counter()
        scores = model_signals(model, tokenizer, sample, cfg, args.template, signals, cache)
        seconds = time.perf_counter() - started
        cache_path.write_bytes(pickle.dumps({"model_revision": revision, "scores": cache}))
        labels = (sample["relevance"] == "relevant").to_numpy()
        sample_kinds = kinds.set_index("interaction_id").loc[sample["interaction_id"], "followup_kind"].reset_index(drop=True)
        aucs = {name: round(roc_auc(labels, scores[name].to_numpy()), 3) for name in signals}
        aucs["kind_prior"] = round(roc_auc(labels, combine(sample_kinds, None, cfg)), 3)
        if cfg.signal in signals:
            combined = combine(sample_kinds, calibrate(scores[cfg.signal], cfg), cfg)
            aucs["informativeness"] = round(roc_auc(labels, combined), 3)
            kept = combined >= cfg.keep_threshold
            report["keep_policy_on_sample"] = {
                "threshold": cfg.keep_threshold,
                "kept_relevant": round(float(kept[labels].mean()), 3),
                "kept_unrelated": round(float(kept[~labels].mean()), 3),
            }
            report["signal_by_relevance"] = scores.assign(relevance=sample["relevance"].to_numpy()).groupby("relevance")[cfg.signal].describe().round(3).to_dict("index")
        report["model_auc"] = {
            "model": args.model,
            "model_revision": revision,
            "template": args.template,
            "n_relevant": int(labels.sum()),
            "n_unrelated": int((~labels).sum()),
            "seconds_scoring": round(seconds, 1),
            "sequences_newly_scored": len(cache) - cached_before,
            "auc": aucs,
        }
    print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
