"""Teacher/student targets: identical response ids, A = teacher − student; target sets resume and never lose work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdpo_platform.config import TargetsConfig
from sdpo_platform.hindsight import encode_interaction, template_hash
from sdpo_platform.logprobs import response_logprobs
from sdpo_platform.targets import (
    TARGET_COLUMNS,
    compute_targets,
    main as targets_worker,
    materialize_targets,
    pending_shards,
    plan_target_set,
    read_targets,
    score_shard,
    select_for_scoring,
    target_set_dir,
)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def make_interactions(n: int = 6) -> pd.DataFrame:
    rows = []
    for i in range(n):
        context = [{"role": "user", "content": f"Question number {i}: explain topic {'x' * i}."}]
        if i % 2:
            context = [
                {"role": "user", "content": "Hello there, first turn."},
                {"role": "assistant", "content": "Hi! How can I help?"},
            ] + context
        rows.append(
            {
                "interaction_id": f"conv{i}:{len(context)}",
                "context": context,
                "response": "Sure. " + "Here is a detail. " * (i + 1),
                "followup": "Too long, be brief." if i % 3 else "Thanks!",
                "split": "validation" if i == 0 else "train",
            }
        )
    return pd.DataFrame(rows)


def test_targets_score_identical_response_ids_and_advantage_is_the_gap(tiny):
    model, tok = tiny
    interactions = make_interactions()
    cfg = TargetsConfig(max_response_tokens=16)
    out = compute_targets(model, tok, interactions, cfg, model_revision="rev123")

    assert list(out.columns) == list(TARGET_COLUMNS)
    assert list(out["interaction_id"]) == list(interactions["interaction_id"])
    assert set(out["template_hash"]) == {template_hash(cfg.template)} and set(out["model_revision"]) == {"rev123"}
    for _, row in out.iterrows():
        context = interactions.set_index("interaction_id").loc[row.interaction_id]
        enc = encode_interaction(tok, context.context, context.response, context.followup, cfg.template, cfg.max_prompt_tokens, 16)
        assert row.response_ids == enc.response_ids and row.response_ids[-1] == tok.eos_token_id
        assert len(row.response_ids) <= 16
        assert row.teacher_prompt_ids == enc.teacher_prompt_ids and row.student_prompt_ids == enc.student_prompt_ids
        assert row.n_tokens == len(row.response_ids) == len(row.teacher_logprobs) == len(row.student_logprobs)
        teacher, student, adv = map(np.asarray, (row.teacher_logprobs, row.student_logprobs, row.advantages))
        np.testing.assert_array_equal(adv, teacher - student)
        assert not np.allclose(teacher, student)  # the hindsight block really changes the teacher's view
        assert row.mean_advantage == pytest.approx(adv.mean())
        assert row.mean_abs_advantage == pytest.approx(np.abs(adv).mean())
        assert row.sum_advantage == pytest.approx(adv.sum())
        assert (row.min_advantage, row.max_advantage) == (pytest.approx(adv.min()), pytest.approx(adv.max()))
        assert row.neutral_logprobs is None
        assert np.asarray(row.teacher_topk_ids).shape == (row.n_tokens, cfg.top_k) == (row.n_tokens, 20)
        assert max(row.teacher_logprobs[i] - row.teacher_topk_logprobs[i][0] for i in range(row.n_tokens)) <= 1e-6
        assert all(0 <= m <= 1 for m in row.teacher_tail_mass)


def test_batched_scoring_equals_one_at_a_time(tiny):
    model, tok = tiny
    interactions = make_interactions(8)
    calls = []
    cfg = TargetsConfig(batch_token_budget=40)  # several groups, passes of different sizes
    out = compute_targets(model, tok, interactions, cfg, "rev", progress=calls.append)

    assert len(calls) > 2 and (calls[-1].interactions_done, calls[-1].interactions_total) == (8, 8)
    done = [c.interactions_done for c in calls]
    assert done == sorted(done) and max(b - a for a, b in zip([0] + done, done)) > 1  # something was really batched
    for _, row in out.iterrows():
        teacher = response_logprobs(model, row.teacher_prompt_ids, row.response_ids).detach().numpy()
        student = response_logprobs(model, row.student_prompt_ids, row.response_ids).detach().numpy()
        np.testing.assert_allclose(row.teacher_logprobs, teacher, atol=1e-4)
        np.testing.assert_allclose(row.student_logprobs, student, atol=1e-4)


def test_neutral_followup_scores_the_teacher_with_the_neutral_message(tiny):
    model, tok = tiny
    interactions = make_interactions(2)
    cfg = TargetsConfig(neutral_followup="OK.")
    out = compute_targets(model, tok, interactions, cfg, "rev")
    neutral_run = compute_targets(model, tok, interactions.assign(followup="OK."), TargetsConfig(), "rev")
    for got, expected in zip(out["neutral_logprobs"], neutral_run["teacher_logprobs"]):
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_scoring_leaves_the_model_mode_alone(tiny):
    model, tok = tiny
    model.train()
    try:
        compute_targets(model, tok, make_interactions(1), TargetsConfig(), "rev")
        assert model.training
    finally:
        model.eval()


def test_select_for_scoring_is_capped_informative_and_order_free():
    df = pd.DataFrame(
        {
            "interaction_id": [f"c{i}:1" for i in range(40)],
            "split": ["validation" if i % 4 == 0 else "train" for i in range(40)],
            "informative": [i % 5 != 0 for i in range(40)],
            "context": [[{"role": "user", "content": str(i)}] for i in range(40)],
        }
    )
    cfg = TargetsConfig(max_train=7, max_validation=3)
    chosen = select_for_scoring(df, cfg)
    again = select_for_scoring(df.sample(frac=1.0, random_state=1), cfg)

    assert chosen["informative"].all()
    assert (chosen["split"] == "train").sum() == 7 and (chosen["split"] == "validation").sum() == 3
    assert list(chosen["interaction_id"]) == list(again["interaction_id"])
    assert set(chosen.columns) == set(df.columns)
    row = chosen.iloc[0]
    assert row.context == [{"role": "user", "content": row.interaction_id[1:-2]}]  # rows travel intact

    turns = pd.DataFrame(  # 5 conversations of 6 turns each, everything chosen: turns stay together, in order
        {
            "interaction_id": [f"conv{c}:{t}" for t in (9, 1, 11, 3, 5, 7) for c in range(5)],
            "conversation_id": [f"conv{c}" for _ in range(6) for c in range(5)],
            "turn_index": [t for t in (9, 1, 11, 3, 5, 7) for _ in range(5)],
            "split": "train",
            "informative": True,
        }
    )
    grouped = select_for_scoring(turns, TargetsConfig(max_train=100))
    runs = grouped["conversation_id"].ne(grouped["conversation_id"].shift()).sum()
    assert len(grouped) == 30 and runs == 5
    assert all(list(g["turn_index"]) == [1, 3, 5, 7, 9, 11] for _, g in grouped.groupby("conversation_id"))



def test_selection_follows_content_not_ids():
    """The same logs read from two places get other ids (ids hash the source path) but the same choice."""
    def frame(prefix: str) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "interaction_id": [f"{prefix}{i:03d}:1" for i in range(60)],
                "conversation_id": [f"{prefix}{i:03d}" for i in range(60)],
                "turn_index": 1,
                "split": "train",
                "informative": True,
                "context": [[{"role": "user", "content": f"question {i}"}] for i in range(60)],
                "response": [f"answer {i}" for i in range(60)],
                "followup": [f"follow-up {i}" for i in range(60)],
            }
        )

    cfg = TargetsConfig(max_train=10)
    here = select_for_scoring(frame("here/"), cfg)
    there = select_for_scoring(frame("elsewhere/"), cfg)
    assert len(here) == 10
    assert sorted(here["response"]) == sorted(there["response"])
    assert sorted(here["interaction_id"].str.slice(5)) == sorted(there["interaction_id"].str.slice(10))


def shard_mtimes(folder) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob("shard-*.parquet"))}


def test_materialized_set_reads_back_as_computed_and_is_keyed_by_revision_and_template(tiny, tiny_model_dir, sdpo_home):
    model, tok = tiny
    interactions = make_interactions(5)
    cfg = TargetsConfig(shard_size=2, max_response_tokens=16)
    result = materialize_targets(interactions, cfg, str(tiny_model_dir), model=model, tokenizer=tok, show_bar=False)

    folder = sdpo_home / "targets" / result.target_set
    assert result.path == str(folder) and result.target_set == f"{result.model_revision}-{template_hash(cfg.template)}"
    assert (result.shards, result.shards_scored, result.shards_reused, result.rows) == (3, 3, 0, 5)
    back = read_targets(folder)
    expected = compute_targets(model, tok, interactions, cfg, result.model_revision)
    pd.testing.assert_frame_equal(back, expected, check_exact=False, atol=1e-4)
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no temp files left
    assert back["teacher_topk_ids"].iloc[0][0] == expected["teacher_topk_ids"].iloc[0][0]  # nested lists survive Parquet


def test_killed_run_resumes_without_recomputing_finished_shards(tiny, tiny_model_dir, sdpo_home, tmp_path):
    model, tok = tiny
    interactions = make_interactions(6)
    cfg = TargetsConfig(shard_size=2, top_k=0)

    def crash_after_first_shard(progress):
        if progress.extra.get("shards_done") == 1:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        materialize_targets(interactions, cfg, str(tiny_model_dir), progress=crash_after_first_shard, model=model, tokenizer=tok, show_bar=False)
    folder = target_set_dir(json.loads(next((sdpo_home / "targets").glob("*/manifest.json")).read_text())["model_revision"], cfg.template)
    first = shard_mtimes(folder)
    assert len(first) == 1 and pending_shards(folder) == [1, 2]
    with pytest.raises(FileNotFoundError):
        read_targets(folder)  # an incomplete set is never read as a smaller one

    resumed = materialize_targets(interactions, cfg, str(tiny_model_dir), model=model, tokenizer=tok, show_bar=False)
    assert (resumed.shards_scored, resumed.shards_reused) == (2, 1)
    after = shard_mtimes(folder)
    assert {k: after[k] for k in first} == first  # shard 0 untouched

    uninterrupted = materialize_targets(interactions, cfg, str(tiny_model_dir), root=tmp_path / "other_root", model=model, tokenizer=tok, show_bar=False)
    pd.testing.assert_frame_equal(read_targets(folder), read_targets(uninterrupted.path))


def test_rematerializing_is_a_no_op_and_new_template_or_revision_make_new_sets(tiny, tiny_model_dir, sdpo_home, tmp_path, monkeypatch):
    model, tok = tiny
    interactions = make_interactions(4)
    cfg = TargetsConfig(shard_size=3)
    first = materialize_targets(interactions, cfg, str(tiny_model_dir), model=model, tokenizer=tok, show_bar=False)
    folder = sdpo_home / "targets" / first.target_set
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    import sdpo_platform.models

    with monkeypatch.context() as patched:
        patched.setattr(sdpo_platform.models, "load_model", lambda *a, **k: pytest.fail("a complete set must not load the model"))
        again = materialize_targets(interactions, cfg, str(tiny_model_dir), show_bar=False)
    assert (again.path, again.shards_scored, again.shards_reused) == (first.path, 0, 2)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps  # nothing rewritten, manifest included

    other_template = cfg.model_copy(update={"template": "{last_user}\n\n[HINDSIGHT CONTEXT] Future User Message: {followup}"})
    by_template = materialize_targets(interactions, other_template, str(tiny_model_dir), model=model, tokenizer=tok, show_bar=False)
    new_weights = tmp_path / "champion_v2"
    shutil.copytree(tiny_model_dir, new_weights)
    config = json.loads((new_weights / "config.json").read_text())
    (new_weights / "config.json").write_text(json.dumps({**config, "sdpo_note": "retrained"}))
    by_revision = materialize_targets(interactions, cfg, str(new_weights), model=model, tokenizer=tok, show_bar=False)

    assert by_template.model_revision == first.model_revision and by_template.template_hash != first.template_hash
    assert by_revision.model_revision != first.model_revision and by_revision.template_hash == first.template_hash
    assert {p.name for p in (sdpo_home / "targets").iterdir()} == {first.target_set, by_template.target_set, by_revision.target_set}
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps  # the old set is left as it was


def test_an_independent_worker_scores_a_planned_shard(tiny, tiny_model_dir, sdpo_home):
    model, tok = tiny
    interactions = make_interactions(5)
    cfg = TargetsConfig(shard_size=2, top_k=3)
    from sdpo_platform.models import model_revision

    folder = plan_target_set(interactions, cfg, str(tiny_model_dir), model_revision(str(tiny_model_dir)))
    assert pending_shards(folder) == [0, 1, 2]
    assert score_shard(folder, 1)  # loads the manifest's model itself
    assert not score_shard(folder, 1)  # already there: no work
    targets_worker([str(folder)])  # the command-line worker takes the rest
    assert pending_shards(folder) == []
    expected = compute_targets(model, tok, interactions, cfg, model_revision(str(tiny_model_dir)))
    pd.testing.assert_frame_equal(read_targets(folder), expected, check_exact=False, atol=1e-4)


def lettered(tag: str, n: int = 4) -> pd.DataFrame:
    return make_interactions(n).assign(interaction_id=[f"{tag}{i}" for i in range(n)], response=[f"{tag} answer {i}." for i in range(n)])


def test_a_plan_killed_between_inputs_and_manifest_is_refused_by_workers_and_repaired_by_the_next_plan(tiny, tiny_model_dir, sdpo_home, monkeypatch):
    import sdpo_platform.targets as targets

    model, tok = tiny
    plan_a, plan_b = lettered("A"), lettered("B")
    cfg = TargetsConfig(shard_size=2, top_k=0)
    folder = plan_target_set(plan_a, cfg, str(tiny_model_dir), "rev")
    manifest_a = (folder / "manifest.json").read_text()
    real_write = targets._atomic_write

    def killed_before_the_manifest(path, write):
        if path.name == "manifest.json":
            raise KeyboardInterrupt("killed between inputs.parquet and manifest.json")
        real_write(path, write)

    with monkeypatch.context() as patched:
        patched.setattr(targets, "_atomic_write", killed_before_the_manifest)
        with pytest.raises(KeyboardInterrupt):
            plan_target_set(plan_b, cfg, str(tiny_model_dir), "rev")  # B's inputs, A's manifest
    assert (folder / "manifest.json").read_text() == manifest_a
    with pytest.raises(RuntimeError, match="not the file manifest.json was planned with"):
        score_shard(folder, 0, model, tok)
    assert pending_shards(folder) == [0, 1]  # nothing written under A's names

    manifest_mtime = (folder / "manifest.json").stat().st_mtime_ns
    plan_target_set(plan_a, cfg, str(tiny_model_dir), "rev")  # the manifest is A's already, the inputs are not
    assert (folder / "manifest.json").stat().st_mtime_ns == manifest_mtime
    for index in pending_shards(folder):
        score_shard(folder, index, model, tok)
    assert list(read_targets(folder)["interaction_id"]) == list(plan_a["interaction_id"])


def test_a_worker_scores_the_plan_it_read_when_the_set_is_replanned_while_its_model_loads(tiny, tiny_model_dir, sdpo_home, monkeypatch):
    import sdpo_platform.models

    model, tok = tiny
    plan_a, plan_b = lettered("A"), lettered("B")
    cfg = TargetsConfig(shard_size=2, top_k=0)
    from sdpo_platform.models import model_revision

    revision = model_revision(str(tiny_model_dir))
    folder = plan_target_set(plan_a, cfg, str(tiny_model_dir), revision)

    def load_while_replanned(*args, **kwargs):
        plan_target_set(plan_b, cfg, str(tiny_model_dir), revision)
        return model, tok

    monkeypatch.setattr(sdpo_platform.models, "load_model", load_while_replanned)
    assert score_shard(folder, 1)  # read A's manifest, then the set became B
    manifest_b = json.loads((folder / "manifest.json").read_text())
    written = [p.name for p in folder.glob("shard-*.parquet")]
    assert written == [manifest_b["shards"][1]["file"]]  # named for the plan its rows came from
    assert list(pd.read_parquet(folder / written[0])["interaction_id"]) == ["B2", "B3"]


def test_target_set_files_get_the_mode_a_normal_open_gives(tiny, tiny_model_dir, sdpo_home):
    import os
    import stat

    model, tok = tiny
    previous = os.umask(0o027)
    try:
        result = materialize_targets(make_interactions(3), TargetsConfig(shard_size=2, top_k=0), str(tiny_model_dir), model=model, tokenizer=tok, show_bar=False)
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in sorted(Path(result.path).iterdir())}
    assert len(modes) == 4 and set(modes.values()) == {0o640}, modes  # inputs, manifest, two shards
