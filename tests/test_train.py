"""The LoRA training loop on the tiny model: adapter written and reloadable, MLflow populated, runnable as a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from dagster_pipes import encode_param
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdpo_platform.config import TrainingConfig
from sdpo_platform.logprobs import response_logprobs
from sdpo_platform.train import TrainRun, batch_indices, learning_rate_at, read_split, train

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "What is the capital of Australia?",
    "Write a haiku about rain.",
    "Explain recursion briefly.",
    "Give me a synonym for happy.",
    "How do I boil an egg?",
    "Translate 'cat' into French.",
    "Name a prime number above 10.",
    "What colour is the sky?",
    "Suggest a name for a dog.",
    "Summarise the water cycle.",
    "What is 2 + 2?",
    "Recommend a book.",
]


def write_toy_targets(path: Path, model_dir: Path, n_train: int = 8, n_validation: int = 4, teacher_offset: float = 0.3) -> Path:
    """Targets where the teacher prefers every token of a fixed formal reply by `teacher_offset` nats.

    teacher_logprobs = the tiny base model's own log-probs + offset, so A = offset exactly before
    training and a student that learns the reply can close the gap (the random tiny model's logits are
    too small to reach an arbitrary target such as −1). Stored student_logprobs are a deliberately
    wrong −10 to show training recomputes them. Validation rows use unseen prompts with the same reply.
    """
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    response = tokenizer("Certainly. Here is a formal answer.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    rows = []
    for i, question in enumerate(PROMPTS[: n_train + n_validation]):
        student = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        teacher = tokenizer.apply_chat_template(
            [{"role": "user", "content": question + "\n\n<hindsight context> Please be formal."}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        with torch.no_grad():
            teacher_lp = (response_logprobs(model, student, response) + teacher_offset).tolist()
        student_lp = [-10.0] * len(response)
        advantages = [t - s for t, s in zip(teacher_lp, student_lp)]
        rows.append({
            "interaction_id": f"i{i:03d}",
            "split": "train" if i < n_train else "validation",
            "model_revision": "tiny",
            "template_hash": "t0",
            "student_prompt_ids": list(student),
            "teacher_prompt_ids": list(teacher),
            "response_ids": response,
            "teacher_logprobs": teacher_lp,
            "student_logprobs": student_lp,
            "advantages": advantages,
            "n_tokens": len(response),
            "mean_advantage": sum(advantages) / len(advantages),
            "mean_abs_advantage": sum(abs(a) for a in advantages) / len(advantages),
        })
    pd.DataFrame(rows).to_parquet(path)
    return path


def make_run(tmp_path: Path, model_dir: Path, **training) -> TrainRun:
    return TrainRun(
        base_model_path=str(model_dir),
        targets_path=str(write_toy_targets(tmp_path / "targets.parquet", model_dir)),
        output_dir=str(tmp_path / "adapter"),
        training=TrainingConfig(**{"steps": 2, "batch_size": 2, **training}),
        mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        mlflow_experiment="sdpo-test",
        mlflow_run_name="tiny",
        target_set="tiny/t0",
    )


def test_short_train_writes_reloadable_adapter_and_logs_to_mlflow(tmp_path, sdpo_home, tiny_model_dir):
    run = make_run(tmp_path, tiny_model_dir, steps=3)
    seen_steps = []
    result = train(run, on_step=lambda step, metrics: seen_steps.append(step))

    assert result.steps == 3 and len(result.losses) == 3 and seen_steps == [1, 2, 3]
    assert result.n_train_interactions == 8
    assert result.loss_first == result.losses[0] and result.loss_last == result.losses[-1]

    # the adapter reloads with peft and changes the model (LoRA starts as the identity)
    adapter = Path(result.adapter_dir)
    assert (adapter / "adapter_config.json").exists() and (adapter / "tokenizer_config.json").exists()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        tuned_logits = PeftModel.from_pretrained(base, adapter)(input_ids=ids).logits
    assert not torch.allclose(base_logits, tuned_logits)

    state = json.loads((adapter / "train_state.json").read_text())
    assert state["losses"] == result.losses and state["target_set"] == "tiny/t0"
    assert state["mlflow_run_id"] == result.mlflow_run_id

    client = mlflow.MlflowClient(run.mlflow_tracking_uri)
    logged = client.get_run(result.mlflow_run_id)
    assert logged.data.params["target_set"] == "tiny/t0"
    assert logged.data.params["training.teacher"] == "frozen"
    assert logged.data.params["n_train_interactions"] == "8"
    history = client.get_metric_history(result.mlflow_run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx(result.losses)
    for name in ("grad_norm", "lr", "mean_abs_advantage", "eos_advantage", "positive_fraction", "tokens_per_s"):
        assert len(client.get_metric_history(result.mlflow_run_id, name)) == 3
    # artifacts of a new experiment live under the data root, not in the working directory
    assert client.get_experiment(logged.info.experiment_id).artifact_location.startswith(sdpo_home.as_uri())


@pytest.mark.parametrize("kl_coef", [0.0, 0.5])
def test_a_step_frees_its_vocabulary_rows_before_the_next_forward(tmp_path, sdpo_home, tiny_model_dir, monkeypatch, kl_coef):
    """The student's [|y|, vocab] float32 log-softmax (with its graph) is the largest activation of a step; kept
    alive into the next step's forward it doubled the peak (on a GPU: ~2.5 GB at batch 8 × 512 × 152k)."""
    import weakref

    import sdpo_platform.train as train_module

    rows_made, alive_at_forward = [], []
    real = train_module.batch_response_log_softmax

    def watched(*args, **kwargs):
        alive_at_forward.append(sum(ref() is not None for ref in rows_made))
        rows = real(*args, **kwargs)
        rows_made.extend(weakref.ref(row) for row in rows)
        return rows

    monkeypatch.setattr(train_module, "batch_response_log_softmax", watched)
    train(make_run(tmp_path, tiny_model_dir, steps=3, kl_coef=kl_coef))
    per_step = 2 if kl_coef else 1  # the reference's rows are computed while the step's student rows live, by design
    assert len(alive_at_forward) == 3 * per_step and alive_at_forward[::per_step] == [0, 0, 0]


def test_frozen_advantage_is_recomputed_against_the_current_student(tmp_path, sdpo_home, tiny_model_dir):
    """Stored student_logprobs (−10) are ignored: at step 1 A = teacher − current (= base) log-prob = 0.3."""
    run = make_run(tmp_path, tiny_model_dir, steps=1)
    metrics = {}
    train(run, on_step=lambda step, m: metrics.update(m))
    assert metrics["mean_advantage"] == pytest.approx(0.3, abs=1e-4)
    assert metrics["eos_advantage"] == pytest.approx(0.3, abs=1e-4)
    assert metrics["positive_fraction"] == 1.0


def test_responses_cut_at_the_limit_report_no_eos_advantage(tmp_path, sdpo_home, tiny_model_dir):
    """A cut response's last token is mid-answer: it must not be read as the follow-up's view on stopping."""
    run = make_run(tmp_path, tiny_model_dir, steps=1)
    frame = pd.read_parquet(run.targets_path).assign(truncated=True)
    frame.to_parquet(run.targets_path, index=False)
    metrics = {}
    train(run, on_step=lambda step, m: metrics.update(m))
    assert metrics["mean_advantage"] == pytest.approx(0.3, abs=1e-4) and "eos_advantage" not in metrics


def test_neutral_followup_baseline_measures_the_teacher_against_the_neutral_followup(tmp_path, sdpo_home, tiny_model_dir):
    """teacher = base + 0.3, neutral = base − 0.2: at step 1 A = teacher − neutral = 0.5 (plain frozen A would be 0.3)."""
    run = make_run(tmp_path, tiny_model_dir, steps=1, baseline="neutral_followup")
    frame = pd.read_parquet(run.targets_path)
    base = frame.teacher_logprobs.map(lambda t: [v - 0.3 for v in t])
    frame["student_logprobs"] = base
    frame["neutral_logprobs"] = base.map(lambda b: [v - 0.2 for v in b])
    frame.to_parquet(run.targets_path)
    metrics = {}
    train(run, on_step=lambda step, m: metrics.update(m))
    assert metrics["mean_advantage"] == pytest.approx(0.5, abs=1e-4)


def test_neutral_followup_baseline_requires_neutral_scores(tmp_path, sdpo_home, tiny_model_dir):
    run = make_run(tmp_path, tiny_model_dir, baseline="neutral_followup")  # toy targets have no neutral_logprobs
    with pytest.raises(ValueError, match="neutral_logprobs"):
        train(run)


def test_live_teacher_with_identical_prompts_has_zero_advantage(tmp_path, sdpo_home, tiny_model_dir):
    """Live mode scores the teacher with the current weights; with o removed the teacher is the student."""
    run = make_run(tmp_path, tiny_model_dir, steps=2, teacher="live")
    frame = pd.read_parquet(run.targets_path)
    frame["teacher_prompt_ids"] = frame["student_prompt_ids"]
    frame.to_parquet(run.targets_path)
    result = train(run)
    assert result.losses == pytest.approx([0.0, 0.0], abs=1e-5)


def test_batches_cover_every_row_once_per_epoch_and_are_seeded():
    first = batch_indices(5, 2, seed=3)
    epoch = [list(next(first)) for _ in range(3)]
    assert sorted(i for batch in epoch for i in batch) == [0, 1, 2, 3, 4]
    again = batch_indices(5, 2, seed=3)
    assert [list(next(again)) for _ in range(3)] == epoch


def test_learning_rate_warms_up_then_decays():
    cfg = TrainingConfig(learning_rate=1.0, steps=20, warmup_fraction=0.1)  # 2 warm-up steps
    rates = [learning_rate_at(step, cfg) for step in range(20)]
    assert rates[0] == pytest.approx(1 / 3) and rates[1] == pytest.approx(2 / 3) and rates[2] == pytest.approx(1.0)
    assert all(later < earlier for earlier, later in zip(rates[2:], rates[3:]))
    assert rates[-1] > 0


def _subprocess_env(sdpo_home: Path) -> dict:
    env = {**os.environ, "SDPO_HOME": str(sdpo_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("DAGSTER_PIPES_CONTEXT", None)
    env.pop("DAGSTER_PIPES_MESSAGES", None)
    return env


def test_train_runs_as_its_own_process(tmp_path, sdpo_home, tiny_model_dir):
    run = make_run(tmp_path, tiny_model_dir, steps=1)
    run_file = tmp_path / "run.json"
    run_file.write_text(run.model_dump_json())
    done = subprocess.run([sys.executable, "-m", "sdpo_platform.train", str(run_file)], env=_subprocess_env(sdpo_home), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("step 1/1 loss")
    result = json.loads(lines[-1])
    assert result["steps"] == 1 and Path(result["adapter_dir"], "adapter_model.safetensors").exists()


def test_train_process_speaks_dagster_pipes(tmp_path, sdpo_home, tiny_model_dir):
    """Launched with Pipes parameters (as Dagster would), it streams logs and reports one materialization."""
    run = make_run(tmp_path, tiny_model_dir, steps=2)
    run_file = tmp_path / "run.json"
    run_file.write_text(run.model_dump_json())
    context_file, messages_file = tmp_path / "pipes_context.json", tmp_path / "pipes_messages.jsonl"
    context_file.write_text(json.dumps({
        "asset_keys": ["distilled_checkpoint"], "code_version_by_asset_key": None, "provenance_by_asset_key": None,
        "partition_key": None, "partition_key_range": None, "partition_time_window": None,
        "run_id": "test-run", "job_name": None, "retry_number": 0, "extras": {},
    }))
    env = _subprocess_env(sdpo_home)
    env["DAGSTER_PIPES_CONTEXT"] = encode_param({"path": str(context_file)})
    env["DAGSTER_PIPES_MESSAGES"] = encode_param({"path": str(messages_file)})
    done = subprocess.run([sys.executable, "-m", "sdpo_platform.train", str(run_file)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    messages = [json.loads(line) for line in messages_file.read_text().splitlines()]
    methods = [m["method"] for m in messages]
    assert methods[0] == "opened" and methods[-1] == "closed"
    assert sum(1 for m in messages if m["method"] == "log" and m["params"]["message"].startswith("step ")) == 2
    (materialization,) = [m for m in messages if m["method"] == "report_asset_materialization"]
    metadata = {key: value["raw_value"] for key, value in materialization["params"]["metadata"].items()}
    assert metadata["steps"] == 2 and metadata["adapter_dir"] == run.output_dir
    assert len(metadata["mlflow_run_id"]) > 0


def test_informativeness_weighting_needs_and_uses_weights(tmp_path, sdpo_home, tiny_model_dir):
    run = make_run(tmp_path, tiny_model_dir, steps=1, weighting="informativeness")
    with pytest.raises(ValueError, match="no weight"):
        train(run)
    ids = list(read_split(run.targets_path, "train").interaction_id)
    weighted = train(run.model_copy(update={"interaction_weights": {i: 1.0 for i in ids}, "output_dir": str(tmp_path / "w1")}))
    plain = train(run.model_copy(update={"training": run.training.model_copy(update={"weighting": "none"}), "output_dir": str(tmp_path / "w0")}))
    assert weighted.loss_first == pytest.approx(plain.loss_first)  # equal weights = the plain mean


def add_teacher_topk(run: TrainRun) -> None:
    """A sharp teacher far from the tiny random model (nearly uniform over 49k tokens): 0.6 on each
    response token, 0.05 on each of 7 fixed others, 0.05 of tail mass."""
    import math

    frame = pd.read_parquet(run.targets_path)
    others = list(range(100, 107))
    frame["teacher_topk_ids"] = [[[int(t)] + others for t in response] for response in frame.response_ids]
    frame["teacher_topk_logprobs"] = [[[math.log(0.6)] + [math.log(0.05)] * 7 for _ in response] for response in frame.response_ids]
    frame["teacher_tail_mass"] = [[0.05] * len(response) for response in frame.response_ids]
    frame.to_parquet(run.targets_path)


def test_topk_kl_training_moves_the_student_towards_the_teachers_distribution(tmp_path, sdpo_home, tiny_model_dir):
    run = make_run(tmp_path, tiny_model_dir, steps=6, batch_size=8, loss="topk_kl", learning_rate=2e-2, skip_tokens=0)
    add_teacher_topk(run)
    seen = []
    result = train(run, on_step=lambda step, metrics: seen.append(metrics))
    assert all(later < earlier for earlier, later in zip(result.losses, result.losses[1:]))  # the same 8 rows every step: the KL falls
    assert seen[-1]["student_topk_mass"] > seen[0]["student_topk_mass"]  # more of the student's mass on the teacher's support
    assert seen[0]["kl_per_token"] == pytest.approx(result.losses[0], rel=1e-4)  # every response has the same length
    assert all("mean_abs_advantage" in m and "student_topk_mass" in m for m in seen)
    logged = mlflow.MlflowClient(run.mlflow_tracking_uri).get_run(result.mlflow_run_id)
    assert logged.data.params["training.loss"] == "topk_kl" and "kl_per_token" in logged.data.metrics


@pytest.mark.parametrize(("setting", "says"), [({"teacher": "live"}, "frozen"), ({"baseline": "sequence_mean"}, "baseline 'none'"), ({}, "targets.top_k > 0")])
def test_topk_kl_needs_the_stored_frozen_teacher(tmp_path, sdpo_home, tiny_model_dir, setting, says):
    run = make_run(tmp_path, tiny_model_dir, loss="topk_kl", **setting)  # the toy targets carry no top-k
    with pytest.raises(ValueError, match=says):
        train(run)


def test_the_same_logs_train_the_same_way_whatever_their_ids(tmp_path, sdpo_home, tiny_model_dir):
    """Interaction ids hash the log file's path: under another data root the same rows get other ids, and
    batches drawn by id order would differ. The order is by content, so the losses are the same."""
    run = make_run(tmp_path, tiny_model_dir, steps=3, batch_size=3)
    moved = tmp_path / "moved.parquet"
    frame = pd.read_parquet(run.targets_path)
    frame["interaction_id"] = [f"{(7 * i) % 13:02d}-elsewhere" for i in range(len(frame))]  # other ids, other id order
    frame.to_parquet(moved)
    assert list(read_split(run.targets_path, "train").student_prompt_ids.map(list)) == list(read_split(moved, "train").student_prompt_ids.map(list))
    first = train(run)
    second = train(run.model_copy(update={"targets_path": str(moved), "output_dir": str(tmp_path / "moved_adapter")}))
    assert second.losses == pytest.approx(first.losses, abs=1e-6)


@pytest.mark.parametrize(("knob", "value"), [("steps", 0), ("batch_size", 0), ("skip_tokens", -1), ("learning_rate", 0.0),
                                             ("grad_clip", 0.0), ("lora_r", 0), ("lora_dropout", 1.0), ("warmup_fraction", 1.5)])
def test_training_settings_out_of_range_are_refused(knob, value):
    """skip_tokens -1 would train on the last token only; steps 0 would write an untrained adapter and then fail."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=knob):
        TrainingConfig(**{knob: value})


@pytest.mark.parametrize(("damage", "says"), [
    (lambda f: f.assign(teacher_logprobs=[[-1.0]] * len(f)), "one finite log-prob per response token"),  # would broadcast
    (lambda f: f.assign(teacher_logprobs=[[float("nan")] * len(r) for r in f.response_ids]), "non-finite"),
    (lambda f: f.drop(columns="response_ids"), "lack column"),
    (lambda f: f.assign(truncated=None), "truncated is missing"),
])
def test_train_rows_the_loss_would_misread_are_refused_before_the_model_loads(tmp_path, sdpo_home, tiny_model_dir, monkeypatch, damage, says):
    run = make_run(tmp_path, tiny_model_dir)
    frame = pd.read_parquet(run.targets_path).assign(truncated=False)
    damage(frame).to_parquet(run.targets_path)
    monkeypatch.setattr("sdpo_platform.train.AutoModelForCausalLM.from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(ValueError, match=says):
        train(run)
    assert not (tmp_path / "mlflow.db").exists() or not mlflow.MlflowClient(run.mlflow_tracking_uri).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(run.mlflow_tracking_uri).search_experiments()])  # no FAILED run left


def test_training_leaves_a_tracking_servers_artifact_store_to_the_server(monkeypatch):
    """On a remote tracking server a new experiment must not point its artifacts at the trainer's own disk."""
    from mlflow import MlflowClient

    from sdpo_platform.train import start_mlflow_run

    created = {}
    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", lambda self, name: None)
    monkeypatch.setattr(MlflowClient, "create_experiment", lambda self, name, artifact_location=None, **k: created.update(
        name=name, artifact_location=artifact_location) or "7")
    monkeypatch.setattr(mlflow, "set_experiment", lambda **k: None)
    monkeypatch.setattr(mlflow, "start_run", lambda **k: "started")
    monkeypatch.setattr("sdpo_platform.registry.check_reachable", lambda uri: None)  # no server here
    previous = mlflow.get_tracking_uri()
    try:
        run = TrainRun(base_model_path="b", targets_path="t", output_dir="o", mlflow_tracking_uri="http://tracking.example:5000",
                       mlflow_experiment="custom")
        assert start_mlflow_run(run) == "started"
    finally:
        mlflow.set_tracking_uri(previous)
    assert created == {"name": "custom", "artifact_location": None}


def test_the_reference_kl_penalty_keeps_the_adapter_closer_to_the_base(tmp_path, sdpo_home, tiny_model_dir):
    """`training.kl_coef` (DESIGN: "no KL to a reference model, available as an option, default 0"): at step 1
    LoRA is the identity, so the penalty is 0 and the loss is the sdpo loss; after training, the penalised
    adapter is measurably closer to the base than the unpenalised one (KL measured here with full forwards)."""
    rows = pd.read_parquet(write_toy_targets(tmp_path / "probe.parquet", tiny_model_dir))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()

    def drift(adapter_dir) -> float:
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir).eval()
        total = []
        with torch.no_grad():
            for prompt, response in zip(rows.student_prompt_ids, rows.response_ids):
                ids = torch.tensor([list(prompt) + list(response)])
                start = len(prompt) - 1
                p = torch.log_softmax(tuned(ids).logits[0, start:-1], -1)
                q = torch.log_softmax(base(ids).logits[0, start:-1], -1)
                total.append((p.exp() * (p - q)).sum(-1).mean())
        return float(torch.stack(total).mean())

    drifts, firsts = {}, {}
    for coef in (0.0, 20.0):
        folder = tmp_path / f"kl{coef}"
        folder.mkdir()
        seen = []
        result = train(make_run(folder, tiny_model_dir, steps=8, batch_size=4, learning_rate=2e-2, warmup_fraction=0.0, kl_coef=coef),
                       on_step=lambda step, metrics: seen.append(metrics))
        drifts[coef], firsts[coef] = drift(result.adapter_dir), result.losses[0]
        if coef:
            assert seen[0]["reference_kl"] == pytest.approx(0.0, abs=1e-6) and seen[0]["sdpo_loss"] == pytest.approx(result.losses[0], abs=1e-6)
            assert seen[-1]["reference_kl"] > 0
    assert firsts[20.0] == pytest.approx(firsts[0.0], abs=1e-6)
    assert drifts[20.0] < 0.5 * drifts[0.0]


def test_the_reference_kl_is_for_the_sdpo_loss(tmp_path, sdpo_home, tiny_model_dir):
    with pytest.raises(ValueError, match="kl_coef"):
        train(make_run(tmp_path, tiny_model_dir, loss="topk_kl", kl_coef=0.1))


def _adapter_weights(adapter_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))


def test_a_killed_run_resumes_from_its_last_point_and_ends_as_an_uninterrupted_one(tmp_path, sdpo_home, tiny_model_dir):
    """Killed after step 5 with points every 2 steps, the same run started again goes on after step 4: same
    adapter bit for bit, same losses, one MLflow run that ends FINISHED, and no resume point left behind."""
    (tmp_path / "whole").mkdir()
    (tmp_path / "killed").mkdir()
    settings = dict(steps=8, batch_size=3, learning_rate=2e-2, warmup_fraction=0.0, save_every=2, lora_dropout=0.1)
    whole = train(make_run(tmp_path / "whole", tiny_model_dir, **settings))

    run = make_run(tmp_path / "killed", tiny_model_dir, **settings)

    def kill_after_step_5(step, metrics):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(run, on_step=kill_after_step_5)
    assert (Path(run.output_dir) / "resume.pt").exists() and not (Path(run.output_dir) / "train_state.json").exists()
    steps = []
    resumed = train(run, on_step=lambda step, metrics: steps.append(step))

    assert steps == [5, 6, 7, 8] and resumed.losses == whole.losses
    expected, got = _adapter_weights(whole.adapter_dir), _adapter_weights(resumed.adapter_dir)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    client = mlflow.MlflowClient(run.mlflow_tracking_uri)
    assert client.get_run(resumed.mlflow_run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_experiment_by_name("sdpo-test").experiment_id])) == 1
    assert {m.step for m in client.get_metric_history(resumed.mlflow_run_id, "loss")} == set(range(1, 9))
    assert not (Path(run.output_dir) / "resume.pt").exists()


def test_a_resume_point_of_other_settings_is_not_resumed(tmp_path, sdpo_home, tiny_model_dir):
    run = make_run(tmp_path, tiny_model_dir, steps=4, batch_size=2, save_every=2)

    def kill(step, metrics):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(run, on_step=kill)
    abandoned = torch.load(Path(run.output_dir) / "resume.pt", weights_only=False)["mlflow_run_id"]
    other = run.model_copy(update={"training": run.training.model_copy(update={"learning_rate": 1e-3})})
    steps = []
    result = train(other, on_step=lambda step, metrics: steps.append(step))
    assert steps == [1, 2, 3, 4] and result.mlflow_run_id != abandoned
    assert mlflow.MlflowClient(run.mlflow_tracking_uri).get_run(abandoned).info.status == "KILLED"


def test_a_run_killed_with_sigkill_resumes_in_its_mlflow_run(tmp_path, sdpo_home, tiny_model_dir):
    """kill -9 leaves no handler to run: the point on disk (written atomically) and an MLflow run stuck in
    RUNNING are all there is, and the next start goes on from them."""
    run = make_run(tmp_path, tiny_model_dir, steps=6, batch_size=2, save_every=2)
    run_file = tmp_path / "run.json"
    run_file.write_text(run.model_dump_json())
    killer = tmp_path / "killer.py"
    killer.write_text(
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from sdpo_platform.train import TrainRun, train\n"
        "run = TrainRun.model_validate_json(Path(sys.argv[1]).read_text())\n"
        "train(run, on_step=lambda step, m: step == 3 and os.kill(os.getpid(), signal.SIGKILL))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, str(killer), str(run_file)], env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    stuck = torch.load(Path(run.output_dir) / "resume.pt", weights_only=False)["mlflow_run_id"]
    client = mlflow.MlflowClient(run.mlflow_tracking_uri)
    assert client.get_run(stuck).info.status == "RUNNING"
    finished = subprocess.run([sys.executable, "-m", "sdpo_platform.train", str(run_file)], env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "resuming after step 2/6" in finished.stdout and "step 3/6" in finished.stdout and "step 2/6 loss" not in finished.stdout
    assert json.loads(finished.stdout.strip().splitlines()[-1])["mlflow_run_id"] == stuck
    assert client.get_run(stuck).info.status == "FINISHED"


def test_a_reexecution_trains_in_the_folder_its_killed_try_left(tmp_path):
    from sdpo_platform.resume import RESUME_FILE, output_folder

    fresh, parent, root = tmp_path / "c", tmp_path / "b", tmp_path / "a"
    for folder in (parent, root):
        folder.mkdir()
    assert output_folder(fresh, [parent, root]) == fresh  # nothing to resume: a folder of its own
    (root / RESUME_FILE).write_bytes(b"x")
    assert output_folder(fresh, [parent, root]) == root
    (parent / RESUME_FILE).write_bytes(b"x")
    assert output_folder(fresh, [parent, root]) == parent  # the latest try first


def test_bf16_autocast_trains_float32_weights_on_bf16_products(tmp_path, sdpo_home, tiny_model_dir, monkeypatch):
    """`training.autocast_bf16` runs the forwards' matrix products in bfloat16 (GPU tensor cores) while the
    weights and the loss's log-softmax stay float32: the losses follow the float32 run's to bf16 rounding."""
    import sdpo_platform.train as train_module

    dtypes = []
    real = train_module.batch_response_log_softmax

    def watched(*args, **kwargs):
        rows = real(*args, **kwargs)
        dtypes.append({row.dtype for row in rows})
        return rows

    monkeypatch.setattr(train_module, "batch_response_log_softmax", watched)
    (tmp_path / "exact").mkdir(), (tmp_path / "fast").mkdir()
    exact = train(make_run(tmp_path / "exact", tiny_model_dir, steps=3))
    fast = train(make_run(tmp_path / "fast", tiny_model_dir, steps=3, autocast_bf16=True))
    assert dtypes == [{torch.float32}] * 6  # the log-softmax stays float32 either way
    assert fast.losses != exact.losses  # the products did run in bf16
    assert max(abs(a - b) for a, b in zip(fast.losses, exact.losses)) < 0.05 * max(abs(x) for x in exact.losses) + 1e-3
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), fast.adapter_dir)
    assert {p.dtype for p in adapter.parameters()} == {torch.float32}
