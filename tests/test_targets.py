"""Teacher/student targets: identical response ids, A = teacher − student; target sets resume and never lose work."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdpo_platform.config import TargetsConfig
from sdpo_platform.hindsight import encode_interaction, template_hash
from sdpo_platform.logprobs import response_logprobs
from sdpo_platform.target_workers import main as targets_worker, materialize_targets, score_pending, score_shard
from sdpo_platform.selection import select_for_scoring
from sdpo_platform.targets import (
    TARGET_COLUMNS,
    compute_targets,
    encode_interactions,
    pending_shards,
    plan_target_set,
    read_manifest,
    read_targets,
    scoring_key,
    target_set_dir,
    target_set_id,
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
    assert 0 < out["truncated"].sum() < len(out)  # both endings are exercised
    assert set(out["template_hash"]) == {template_hash(cfg.template)} and set(out["model_revision"]) == {"rev123"}
    for _, row in out.iterrows():
        context = interactions.set_index("interaction_id").loc[row.interaction_id]
        enc = encode_interaction(tok, context.context, context.response, context.followup, cfg.template, cfg.max_prompt_tokens, 16)
        assert row.response_ids == enc.response_ids and row.truncated == enc.truncated
        assert (row.response_ids[-1] == tok.eos_token_id) != row.truncated
        assert len(row.response_ids) == 16 if row.truncated else len(row.response_ids) < 16
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


def test_the_neutral_branch_sees_the_conversation_the_long_followup_left(tiny):
    """A long real follow-up drops the oldest exchange from student and teacher; the neutral baseline's
    prompt must drop it too, or teacher − neutral measures the lost context as well as the follow-up."""
    model, tok = tiny
    context = [{"role": "user", "content": "First question about apples. " * 8},
               {"role": "assistant", "content": "A long first answer about apples. " * 8},
               {"role": "user", "content": "Second question: and pears?"}]
    rows = pd.DataFrame([{"interaction_id": "a", "context": context, "response": "Pears are fruit.", "split": "train",
                          "followup": "No, that is wrong, you ignored what I said about pears being different. " * 3}])
    cfg = TargetsConfig(max_prompt_tokens=200, neutral_followup="OK.")
    _, [job] = encode_interactions(tok, rows, cfg)
    assert ["apples" in tok.decode(prompt) for prompt in job.prompts] == [False, False, False]
    out = compute_targets(model, tok, rows, cfg, "rev")
    with torch.inference_mode():
        expected = response_logprobs(model, job.prompts[2], job.response_ids).double().numpy()
    np.testing.assert_allclose(out["neutral_logprobs"][0], expected, atol=1e-4)


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
    assert result.path == str(folder)
    assert result.target_set == target_set_id(result.model_revision, template_hash(cfg.template), scoring_key(cfg, "float32"))
    shards = len(read_manifest(folder)["shards"])
    assert 1 < shards < 5 and (result.shards, result.shards_scored, result.shards_reused, result.rows) == (shards, shards, 0, 5)
    back = read_targets(folder)
    expected = compute_targets(model, tok, interactions, cfg, result.model_revision)
    pd.testing.assert_frame_equal(back, expected, check_exact=False, atol=1e-4)
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no temp files left
    assert back["teacher_topk_ids"].iloc[0][0] == expected["teacher_topk_ids"].iloc[0][0]  # nested lists survive Parquet


def test_killed_run_resumes_without_recomputing_finished_shards(tiny, tiny_model_dir, sdpo_home, tmp_path):
    model, tok = tiny
    interactions = make_interactions(6)
    cfg = TargetsConfig(shard_size=1, top_k=0)  # one interaction per shard

    def crash_after_first_shard(progress):
        if progress.extra.get("shards_done") == 1:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        materialize_targets(interactions, cfg, str(tiny_model_dir), progress=crash_after_first_shard, model=model, tokenizer=tok, show_bar=False)
    folder = target_set_dir(json.loads(next((sdpo_home / "targets").glob("*/manifest.json")).read_text())["model_revision"], cfg)
    first = shard_mtimes(folder)
    assert len(first) == 1 and pending_shards(folder) == [1, 2, 3, 4, 5]
    with pytest.raises(FileNotFoundError):
        read_targets(folder)  # an incomplete set is never read as a smaller one

    resumed = materialize_targets(interactions, cfg, str(tiny_model_dir), model=model, tokenizer=tok, show_bar=False)
    assert (resumed.shards_scored, resumed.shards_reused, resumed.shards_scored_elsewhere) == (5, 1, 0)
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
    assert (again.path, again.shards_scored, again.shards_reused) == (first.path, 0, first.shards)
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
    cfg = TargetsConfig(shard_size=1, top_k=3)
    from sdpo_platform.models import model_revision

    folder = plan_target_set(interactions, cfg, str(tiny_model_dir), model_revision(str(tiny_model_dir)))
    assert pending_shards(folder) == [0, 1, 2, 3, 4]
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
    cfg = TargetsConfig(shard_size=1, top_k=0)
    folder = plan_target_set(plan_a, cfg, str(tiny_model_dir), "rev")
    manifest_a = (folder / "manifest.json").read_text()
    real_write = targets.atomic_write

    def killed_before_the_manifest(path, write):
        if path.name == "manifest.json":
            raise KeyboardInterrupt("killed between inputs.parquet and manifest.json")
        real_write(path, write)

    with monkeypatch.context() as patched:
        patched.setattr(targets, "atomic_write", killed_before_the_manifest)
        with pytest.raises(KeyboardInterrupt):
            plan_target_set(plan_b, cfg, str(tiny_model_dir), "rev")  # B's inputs, A's manifest
    assert (folder / "manifest.json").read_text() == manifest_a
    with pytest.raises(RuntimeError, match="not the file manifest.json was planned with"):
        score_shard(folder, 0, model, tok)
    assert pending_shards(folder) == [0, 1, 2, 3]  # nothing written under A's names

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
    cfg = TargetsConfig(shard_size=1, top_k=0)
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
    assert list(pd.read_parquet(folder / written[0])["interaction_id"]) == ["B1"]


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
    assert len(modes) == 2 + result.shards and set(modes.values()) == {0o640}, modes  # inputs, manifest, shards


def logged_day(day: str, conversations: int, turns: int = 1, split: str = "train") -> pd.DataFrame:
    """Interactions as the warehouse holds them: conversations of a day, with their turns."""
    rows = [
        {
            "interaction_id": f"{day}-c{c}:{t}",
            "conversation_id": f"{day}-c{c}",
            "turn_index": t,
            "partition_date": pd.Timestamp(day),
            "split": split,
            "informative": True,
            "context": [{"role": "user", "content": f"Question {c}.{t} of {day}?"}],
            "response": f"Answer {c}.{t}.",
            "followup": "Shorter please." if (c + t) % 2 else "Thanks!",
        }
        for c in range(conversations)
        for t in range(turns)
    ]
    return pd.DataFrame(rows)


def test_a_new_day_or_new_conversations_keep_the_shards_they_do_not_fall_in(sdpo_home):
    cfg = TargetsConfig(shard_size=64, max_train=10**6)
    day1 = pd.concat([logged_day("2026-01-05", 500), logged_day("2026-01-05", 70, turns=2).assign(
        conversation_id=lambda f: "long-" + f["conversation_id"], interaction_id=lambda f: "long-" + f["interaction_id"])])
    assert len(day1) == 640

    def files(frame) -> list[str]:
        return [s["file"] for s in read_manifest(plan_target_set(select_for_scoring(frame, cfg), cfg, "/m", "rev"))["shards"]]

    before = files(day1)
    after = files(pd.concat([day1, logged_day("2026-01-06", 64)]))  # a new day: its conversations come after
    assert len(before) >= 5 and sum(f in before for f in after) >= len(before) - 1

    undated = day1.drop(columns="partition_date")  # no days: conversations in hash order, new ones fall anywhere
    before = files(undated)
    after = files(pd.concat([undated, logged_day("2026-01-06", 8, turns=8).drop(columns="partition_date")]))
    assert len(before) - sum(f in before for f in after) <= 8  # one shard per new conversation at most
    assert max(s["rows"] for s in read_manifest(sdpo_home / "targets" / next(iter(os.listdir(sdpo_home / "targets"))))["shards"]) <= 4 * 64


def test_a_grown_set_rescores_only_new_shards_and_reads_as_scored_from_scratch(tiny, tiny_model_dir, sdpo_home, tmp_path):
    model, tok = tiny
    cfg = TargetsConfig(shard_size=4, max_train=10**6, max_validation=10**6, top_k=0, max_response_tokens=8)
    day1 = pd.concat([logged_day("2026-01-05", 12, turns=2), logged_day("2026-01-05", 4, split="validation").assign(
        interaction_id=lambda f: "v" + f["interaction_id"], conversation_id=lambda f: "v" + f["conversation_id"])])
    grown = pd.concat([day1, logged_day("2026-01-06", 3, turns=2)])
    first = materialize_targets(select_for_scoring(day1, cfg), cfg, str(tiny_model_dir), model=model, tokenizer=tok, show_bar=False)
    second = materialize_targets(select_for_scoring(grown, cfg), cfg, str(tiny_model_dir), model=model, tokenizer=tok, show_bar=False)

    assert second.path == first.path and first.shards >= 4  # the set grows in place
    assert second.shards_reused >= first.shards - 1 and second.shards_scored == second.shards - second.shards_reused  # at most the last train shard changes
    scratch = materialize_targets(select_for_scoring(grown, cfg), cfg, str(tiny_model_dir), root=tmp_path / "scratch", model=model, tokenizer=tok, show_bar=False)
    pd.testing.assert_frame_equal(read_targets(second.path), read_targets(scratch.path))
    assert len(read_targets(second.path)) == len(grown)


def test_settings_that_change_the_numbers_make_a_new_set_and_leave_the_old_one_alone(tiny_model_dir, sdpo_home):
    rows = make_interactions(4)
    cfg = TargetsConfig(shard_size=2)
    folder = plan_target_set(rows, cfg, str(tiny_model_dir), "rev")
    manifest = (folder / "manifest.json").read_text()
    others = [
        plan_target_set(rows, cfg.model_copy(update={"top_k": 0}), str(tiny_model_dir), "rev"),
        plan_target_set(rows, cfg.model_copy(update={"max_prompt_tokens": 100}), str(tiny_model_dir), "rev"),
        plan_target_set(rows, cfg.model_copy(update={"neutral_followup": "OK."}), str(tiny_model_dir), "rev"),
        plan_target_set(rows, cfg, str(tiny_model_dir), "rev", dtype="bfloat16"),
    ]
    assert len({folder, *others}) == 5 and (folder / "manifest.json").read_text() == manifest
    assert json.loads(manifest)["dtype"] == "float32" and read_manifest(others[-1])["dtype"] == "bfloat16"
    same = [
        plan_target_set(make_interactions(6), cfg, str(tiny_model_dir), "rev"),  # more rows: the same set, grown
        plan_target_set(rows, cfg.model_copy(update={"shard_size": 3, "max_train": 5, "batch_token_budget": 99}), str(tiny_model_dir), "rev"),
    ]
    assert set(same) == {folder}


def planned(tiny_model_dir, n: int = 6, **settings) -> Path:
    """A set of `n` interactions, one per shard (shard_size=1, conversations of one turn)."""
    from sdpo_platform.models import model_revision

    cfg = TargetsConfig(shard_size=1, top_k=0, max_response_tokens=8, **settings)
    return plan_target_set(make_interactions(n), cfg, str(tiny_model_dir), model_revision(str(tiny_model_dir)))


def test_two_workers_without_a_shard_list_split_the_set(tiny, tiny_model_dir, sdpo_home):

    model, tok = tiny
    folder = planned(tiny_model_dir)
    runs = {}

    def worker(name):
        slow = lambda p: time.sleep(0.05)  # noqa: E731 - long enough for both to be at work
        runs[name] = score_pending(folder, lambda: (model, tok), progress=slow)

    threads = [threading.Thread(target=worker, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    a, b = runs["a"].scored, runs["b"].scored
    assert a and b and not set(a) & set(b) and sorted(a + b) == list(range(6))  # disjoint, complete
    assert pending_shards(folder) == [] and list(folder.glob("*.claim")) == []


def test_shards_scored_counts_only_what_this_process_wrote(tiny, tiny_model_dir, sdpo_home):
    model, tok = tiny
    cfg = TargetsConfig(shard_size=1, top_k=0, max_response_tokens=8)
    others = []

    def another_worker_takes_the_rest(progress):
        if progress.extra.get("shards_done") == 1:
            folder = next((sdpo_home / "targets").iterdir())
            for index in pending_shards(folder):
                others.append(score_shard(folder, index, model, tok))

    result = materialize_targets(make_interactions(4), cfg, str(tiny_model_dir), progress=another_worker_takes_the_rest, model=model, tokenizer=tok, show_bar=False)
    assert others == [True] * 3
    assert (result.shards, result.shards_scored, result.shards_scored_elsewhere, result.shards_reused) == (4, 1, 3, 0)


def test_the_asset_waits_for_shards_claimed_by_live_workers_and_takes_over_abandoned_claims(tiny, tiny_model_dir, sdpo_home, tmp_path):

    model, tok = tiny
    folder = planned(tiny_model_dir, n=4)
    files = [s["file"] for s in read_manifest(folder)["shards"]]

    def claim(i, age):
        path = folder / files[i].replace(".parquet", ".claim")
        path.write_text(json.dumps({"host": "gpu-node-7", "pid": 1, "token": f"t{i}", "started": 0}))
        os.utime(path, (time.time() - age, time.time() - age))

    claim(0, age=5)  # a live worker on another node
    claim(1, age=3600)  # a worker that died an hour ago

    run = score_pending(folder, lambda: (model, tok))  # a worker: takes what it can, leaves the live claim
    assert sorted(run.scored) == [1, 2, 3] and run.left == [0]

    node = plan_target_set(make_interactions(4), TargetsConfig.model_validate(read_manifest(folder)["targets_config"]),
                           str(tiny_model_dir), read_manifest(folder)["model_revision"], root=tmp_path / "node")  # fmt: skip
    assert score_shard(node, 0, model, tok)

    def node_finishes():  # the node's worker lands its shard, then drops its claim
        time.sleep(0.5)
        shutil.copy(node / files[0], folder / f".{files[0]}.tmp")
        os.replace(folder / f".{files[0]}.tmp", folder / files[0])
        (folder / files[0].replace(".parquet", ".claim")).unlink()

    logged = []
    finisher = threading.Thread(target=node_finishes)
    finisher.start()
    cfg = TargetsConfig.model_validate(read_manifest(folder)["targets_config"])
    result = materialize_targets(make_interactions(4), cfg, str(tiny_model_dir), model=model, tokenizer=tok, show_bar=False, log=logged.append, poll_s=0.05)
    finisher.join()
    assert (result.shards_scored, result.shards_scored_elsewhere, result.shards_reused) == (0, 1, 3) and pending_shards(folder) == []
    assert any("waiting for 1 shard(s)" in line and "gpu-node-7" in line for line in logged), logged
    assert str(folder) in logged[0]  # the set's folder, for starting workers


def test_a_set_is_scored_in_one_precision(tiny, tiny_model_dir, sdpo_home, monkeypatch):
    import torch

    import sdpo_platform.models

    model, tok = tiny
    folder = planned(tiny_model_dir, n=2, max_prompt_tokens=300)
    with pytest.raises(ValueError, match="scored in float32, this model is bfloat16"):
        score_shard(folder, 0, model.to(torch.bfloat16), tok)
    model.to(torch.float32)
    assert pending_shards(folder) == [0, 1]

    bf16 = planned(tiny_model_dir, n=2, max_prompt_tokens=301)
    from sdpo_platform.models import model_revision

    cfg = TargetsConfig.model_validate(read_manifest(bf16)["targets_config"])
    bf16 = plan_target_set(make_interactions(2), cfg, str(tiny_model_dir), model_revision(str(tiny_model_dir)), dtype="bfloat16")
    loads, real_load = [], sdpo_platform.models.load_model
    monkeypatch.setattr(sdpo_platform.models, "load_model", lambda *a, **k: loads.append(k.get("dtype")) or real_load(*a, **k))
    targets_worker([str(bf16)])  # the worker loads the model in the set's precision
    assert loads == [torch.bfloat16] and pending_shards(bf16) == []


def test_the_worker_refuses_shards_the_plan_lacks_and_scores_a_copy_given_with_model(tiny_model_dir, sdpo_home, tmp_path, capsys):
    from sdpo_platform.models import model_revision

    cfg = TargetsConfig(shard_size=1, top_k=0, max_response_tokens=8)
    folder = plan_target_set(make_interactions(3), cfg, "/mnt/planner/models/tiny", model_revision(str(tiny_model_dir)))
    with pytest.raises(SystemExit) as exit_info:
        targets_worker([str(folder), "--shards", "1", "7"])
    assert exit_info.value.code == 2 and "--shards 7: this plan has shards 0..2" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:
        targets_worker([str(folder)])  # the planner's model path does not exist here
    assert exit_info.value.code == 1 and "--model PATH" in capsys.readouterr().err
    elsewhere = tmp_path / "node_b" / "tiny"
    shutil.copytree(tiny_model_dir, elsewhere)
    targets_worker([str(folder), "--model", str(elsewhere)])
    out = capsys.readouterr().out
    assert pending_shards(folder) == [] and "3 shard(s) scored here" in out
    assert [line.split(":")[0] for line in out.splitlines() if " interactions/s" in line or "ETA" in line] == ["shard 0", "shard 1", "shard 2"]


def test_the_worker_draws_a_progress_bar_on_a_terminal(tiny_model_dir, sdpo_home, monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    folder = planned(tiny_model_dir, n=3)
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    targets_worker([str(folder)])
    assert "interaction/s" in terminal.getvalue() and "3/3" in terminal.getvalue()


def test_rates_and_eta_count_scoring_time_not_the_model_load(tiny, tiny_model_dir, sdpo_home, monkeypatch):
    """A real model takes minutes to load: counted as scoring, the first reports' rate and ETA are off by it."""
    model, tok = tiny
    clock = [0.0]  # seconds the fake model load adds to every monotonic reading
    real_monotonic = time.monotonic
    monkeypatch.setattr(time, "monotonic", lambda: real_monotonic() + clock[0])

    def slow_load():
        clock[0] += 1000.0
        return model, tok

    folder = planned(tiny_model_dir, n=3)
    reports, lines = [], []
    score_pending(folder, slow_load, progress=reports.append, log=lines.append, shard_lines=True)
    assert reports and all(r.elapsed_s < 100 for r in reports)  # the 1000 s load is not in the rate or the ETA
    assert all(float(line.split(" in ")[1].split("s;")[0]) < 100 for line in lines if line.startswith("shard "))


def test_score_shard_claims_before_it_loads_the_model(tiny_model_dir, sdpo_home, monkeypatch):
    """A shard a live worker holds costs a second process nothing: no model load (minutes, GPU memory)."""
    import sdpo_platform.target_workers as workers
    from sdpo_platform.shard_claims import try_claim

    folder = planned(tiny_model_dir, n=2)
    loads = []
    monkeypatch.setattr(workers, "load_scoring_model", lambda *a, **k: loads.append(1) or pytest.fail("loaded the model"))
    shard = read_manifest(folder)["shards"][0]
    with try_claim(folder / shard["file"].replace(".parquet", ".claim")):
        assert not score_shard(folder, 0)
    assert loads == []


def test_the_targets_check_wants_eos_last_unless_the_response_was_cut(tiny, tmp_path):
    """A cut response has no EOS by design; a complete one without EOS is an encoding bug and stops the run."""
    from sdpo_platform.checks import check_targets

    model, tok = tiny
    targets = compute_targets(model, tok, make_interactions(), TargetsConfig(max_response_tokens=16, top_k=0), "rev")
    assert targets["truncated"].any() and check_targets(targets, tok.eos_token_id).passed
    complete = targets.index[~targets["truncated"]][0]
    targets.at[complete, "truncated"] = True  # a cut response may end anywhere
    assert check_targets(targets, tok.eos_token_id).passed
    targets.at[complete, "truncated"] = False
    targets.at[complete, "response_ids"] = targets.at[complete, "response_ids"][:-1] + [tok.eos_token_id + 1]
    report = check_targets(targets, tok.eos_token_id)
    assert not report.passed and "eos_last_unless_truncated" in report.description
    (eos,) = report.failures  # the failure names its row, for the person who must find it
    assert eos["unexpected_ids"] == [targets.at[complete, "interaction_id"]]
    targets.at[complete, "response_ids"] = targets.at[complete, "response_ids"][:-1] + [tok.eos_token_id]
    nan_row = targets.index[1]
    targets.at[nan_row, "teacher_logprobs"] = [float("nan")] + list(targets.at[nan_row, "teacher_logprobs"])[1:]
    (nan,) = check_targets(targets, tok.eos_token_id).failures  # `finite` only: a NaN is not also a positive log-prob
    assert "'finite'" in nan["expectation"] and nan["unexpected_ids"] == [targets.at[nan_row, "interaction_id"]]

    one_split = check_targets(targets.assign(split="train"), tok.eos_token_id)
    (missing,) = [f for f in one_split.failures if "split" in f["expectation"]]
    assert missing["partial_missing_list"] == ["validation"]  # said in the check's metadata (was observed_value: None)

    legacy = tmp_path / "legacy.parquet"  # sets encoded before the flag gave every response an EOS
    targets.drop(columns=["truncated"]).to_parquet(legacy, index=False)
    assert read_targets(legacy)["truncated"].tolist() == [False] * len(targets)


def test_another_scoring_engine_version_keys_a_new_set_and_may_not_add_shards_to_an_old_one(tiny, tiny_model_dir, sdpo_home, monkeypatch):
    """Shards of an engine that computed other numbers (the tail mass before version 2) must be neither reused
    nor mixed with new ones: the version is part of the set's key."""
    import sdpo_platform.targets as targets_module

    model, tok = tiny
    folder = planned(tiny_model_dir, n=2)
    assert score_shard(folder, 0, model, tok)
    cfg = TargetsConfig()
    before = targets_module.scoring_key(cfg, "float32")
    monkeypatch.setattr(targets_module, "SCORING_VERSION", targets_module.SCORING_VERSION + 1)
    assert targets_module.scoring_key(cfg, "float32") != before
    with pytest.raises(ValueError, match="scoring"):
        score_shard(folder, 1, model, tok)
    assert pending_shards(folder) == [1]


def test_a_worker_running_another_encoding_refuses_the_set_and_old_shards_read_as_ending_in_eos(tiny, tiny_model_dir, sdpo_home, monkeypatch):
    """Scale-out machines may run different versions: a shard encoded otherwise must not join the set under its id."""
    import sdpo_platform.targets as targets_module

    model, tok = tiny
    folder = planned(tiny_model_dir, n=2)
    assert score_shard(folder, 0, model, tok)
    monkeypatch.setattr(targets_module, "PROMPT_ENCODING_VERSION", targets_module.PROMPT_ENCODING_VERSION + 1)
    with pytest.raises(ValueError, match="re-plan"):
        score_shard(folder, 1, model, tok)
    assert pending_shards(folder) == [1]  # nothing written
    monkeypatch.undo()
    assert score_shard(folder, 1, model, tok)

    first = folder / read_manifest(folder)["shards"][0]["file"]  # as an older version wrote it: no `truncated`
    pd.read_parquet(first).drop(columns=["truncated"]).to_parquet(first, index=False)
    frame = read_targets(folder)
    assert frame["truncated"].dtype == bool and not frame["truncated"].iloc[0]


def test_a_shard_left_empty_or_cut_is_not_done_and_is_scored_again(tiny, tiny_model_dir, sdpo_home, monkeypatch):
    """A power loss can leave a renamed shard empty (unless data and folder reach the disk before the rename
    is trusted); a copy can be cut. Either must count as pending, never as finished forever."""
    from sdpo_platform import paths

    model, tok = tiny
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(paths.os, "fsync", lambda fd: synced.append(os.path.isdir(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    folder = planned(tiny_model_dir, n=3)
    synced.clear()
    run = score_pending(folder, lambda: (model, tok))
    assert sorted(run.scored) == [0, 1, 2] and pending_shards(folder) == []
    assert synced.count(False) >= 3 and synced.count(True) >= 3  # each shard: its data, then its folder entry
    whole = read_targets(folder)

    shards = read_manifest(folder)["shards"]
    (folder / shards[0]["file"]).write_bytes(b"")
    cut = folder / shards[2]["file"]
    cut.write_bytes(cut.read_bytes()[:-100])
    assert pending_shards(folder) == [0, 2]
    with pytest.raises(FileNotFoundError, match="damaged"):
        read_targets(folder)
    again = score_pending(folder, lambda: (model, tok))
    assert sorted(again.scored) == [0, 2] and again.reused == 1
    pd.testing.assert_frame_equal(read_targets(folder), whole)


def test_a_worker_whose_claim_was_taken_over_leaves_the_shard(tiny, tiny_model_dir, sdpo_home, monkeypatch):
    """Two takeovers of one stale claim can leave a claimant holding a `Claim` whose file is another's; it
    must find out before it scores (a deterministic stand-in for that race: the file changes hands as the
    claim is returned)."""
    import sdpo_platform.target_workers as workers
    from sdpo_platform.shard_claims import try_claim

    model, tok = tiny
    folder = planned(tiny_model_dir, n=1)

    def claim_then_lose(path, *args):
        claim = try_claim(path, *args)
        Path(path).write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "theirs", "started": 0}))
        return claim

    monkeypatch.setattr(workers, "try_claim", claim_then_lose)
    monkeypatch.setattr(workers, "compute_targets", lambda *a, **k: pytest.fail("scored a shard it does not hold"))
    assert score_shard(folder, 0, model, tok) is False and pending_shards(folder) == [0]
    assert json.loads(next(folder.glob("**/*.claim")).read_text())["token"] == "theirs"  # the holder's claim stays


def test_the_progress_log_counts_the_shards_other_workers_write(tiny, tiny_model_dir, sdpo_home):
    """With workers beside the asset, its Dagster log must still reach the set's total (a line for the shards
    others wrote), not stop at what it scored itself."""
    from sdpo_platform.progress import progress_logger
    from sdpo_platform.shard_claims import try_claim

    model, tok = tiny
    folder = planned(tiny_model_dir, n=3)
    assert score_shard(folder, 2, model, tok)  # what "another worker" will write, made ahead and put aside
    third = folder / read_manifest(folder)["shards"][2]["file"]
    aside = third.rename(folder.parent / "aside.parquet")
    claim = try_claim(folder / third.name.replace(".parquet", ".claim"))  # the other worker holds shard 2

    def other_worker():
        while pending_shards(folder) != [2]:
            time.sleep(0.01)
        aside.rename(third)
        claim.release()

    thread = threading.Thread(target=other_worker)
    thread.start()
    lines = []
    run = score_pending(folder, lambda: (model, tok), wait=True, progress=progress_logger(lines.append), poll_s=0.01)
    thread.join()
    assert sorted(run.scored) == [0, 1] and run.elsewhere == [2]
    assert lines[-1].startswith("hindsight targets: 3/3 interactions")


def test_the_targets_check_wants_a_well_formed_top_k_where_one_was_stored(tiny):
    """The top-k loss reads k ids and log-probs and a tail mass per response token; a malformed row must stop the run."""
    from sdpo_platform.checks import check_targets

    model, tok = tiny
    targets = compute_targets(model, tok, make_interactions(), TargetsConfig(max_response_tokens=16, top_k=5), "rev")
    assert check_targets(targets, tok.eos_token_id).passed
    for column, damage in [("teacher_tail_mass", lambda m: [1.5] + list(m[1:])),
                           ("teacher_topk_ids", lambda ids: list(ids[:-1])),  # one token short
                           ("teacher_topk_logprobs", lambda lp: [[float("nan")] * 5] + list(lp[1:]))]:
        damaged = targets.copy()
        damaged.at[0, column] = damage(damaged.at[0, column])
        report = check_targets(damaged, tok.eos_token_id)
        assert not report.passed and "topk_consistent" in report.description, column


def test_the_configured_dtype_scores_a_set_of_its_own_in_that_precision(tiny_model_dir, sdpo_home):
    """`targets.dtype` pins the precision whatever the device picks: a float32 set and a bfloat16 set of the same rows
    live side by side, and the bf16 one differs by rounding only (what training in float32 then reads as noise)."""

    rows = select_for_scoring(logged_day("2026-01-05", 4), TargetsConfig(top_k=0, max_response_tokens=8))
    sets = {dtype: materialize_targets(rows, TargetsConfig(top_k=0, max_response_tokens=8, dtype=dtype), str(tiny_model_dir),
                                       show_bar=False)
            for dtype in ("float32", "bfloat16")}
    assert sets["float32"].path != sets["bfloat16"].path
    assert {read_manifest(Path(s.path))["dtype"] for s in sets.values()} == {"float32", "bfloat16"}
    exact, rounded = (read_targets(sets[d].path).set_index("interaction_id").sort_index() for d in ("float32", "bfloat16"))
    differences = np.concatenate([np.asarray(a) - np.asarray(b) for a, b in zip(exact.teacher_logprobs, rounded.teacher_logprobs)])
    assert 0 < np.abs(differences).max() < 0.5
    with pytest.raises(ValueError, match="Input should be 'auto', 'float32' or 'bfloat16'"):
        TargetsConfig(dtype="float16")


def test_choosing_in_the_warehouse_picks_what_the_frame_path_picks(sdpo_home):
    """The training asset chooses in the warehouse and reads only the chosen rows; the choice and its order must be
    the frame path's exactly (same shards, same target sets reused), blocked days and unjudged triples included."""
    from sdpo_platform.assessments import SCHEMA as ASSESSMENTS_SCHEMA, informativeness_weights, kept_count, kept_interactions
    from sdpo_platform.gating import SCHEMA as GATING_SCHEMA, blocked_partitions
    from sdpo_platform.selection import select_from_warehouse
    from sdpo_platform.warehouse import connect

    with connect() as con:
        con.execute(ASSESSMENTS_SCHEMA).fetchall()
        con.execute(GATING_SCHEMA).fetchall()
        for n in range(40):
            for turn in (1, 3):
                interaction = f"conv{n}:{turn}"
                con.execute(
                    "INSERT INTO interactions VALUES (?, ?, ?, [{'role': 'user', 'content': ?}, {'role': 'assistant', 'content': 'é ✓'}],"
                    " ?, ?, true, '', ?, ?::DATE)",
                    [interaction, f"conv{n}", turn, f"Question {n} «{turn}»?", f"Answer {n * turn}.", f"Shorter {n % 7}, please.",
                     "validation" if n % 4 == 0 else "train", f"2026-01-{5 + n % 3:02d}"],
                ).fetchall()
                if n % 9 != 5:  # some triples were never judged: never kept
                    con.execute("INSERT INTO interaction_assessments VALUES (?, NULL, 'refinement', [], 0.5, false, [], NULL, ?, ?, NULL)",
                                [interaction, (n % 10) / 10, n % 5 != 1]).fetchall()
        con.execute("INSERT INTO interactions VALUES ('undated:1', 'undated', 1, [{'role': 'user', 'content': 'Hi?'}], 'Hello.',"
                    " 'Shorter, please.', true, '', 'train', NULL)").fetchall()  # a triple stored without a day
        con.execute("INSERT INTO interaction_assessments VALUES ('undated:1', NULL, 'refinement', [], 0.5, false, [], NULL, 0.9, true, NULL)").fetchall()
        assert kept_count(con, []) - kept_count(con, ["2026-01-07"]) == 14  # that day's kept triples: the undated one stays in
        con.execute("INSERT INTO partition_checks VALUES ('interactions', '2026-01-07', false, 'bad', now())").fetchall()
        blocked = blocked_partitions(con)
        cfg = TargetsConfig(max_train=12, max_validation=3)
        from_frame = select_for_scoring(kept_interactions(con, blocked), cfg)
        in_warehouse, available = select_from_warehouse(con, cfg, blocked)
        kept = kept_count(con, blocked)  # counted in SQL (the demo's summary): what the frame's flag sums to
        assert kept == int(kept_interactions(con, blocked)["informative"].sum())
        weights = informativeness_weights(con, list(in_warehouse.interaction_id))  # the round's rows only
        assert set(weights) == set(in_warehouse.interaction_id)

    assert blocked == ["2026-01-07"] and available == 55  # 27 conversations × 2 turns outside the blocked day, and the undated one
    assert len(in_warehouse) == 15 and in_warehouse["informative"].all()
    pd.testing.assert_frame_equal(in_warehouse.reset_index(drop=True), from_frame.reset_index(drop=True))
