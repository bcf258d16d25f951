"""SDPO training of a LoRA adapter on hindsight targets: one explicit loop, runnable as its own process.

    python -m sdpo_platform.train RUN.json

RUN.json is a `TrainRun`. Launched by Dagster Pipes, the process streams per-step logs and reports the
checkpoint as an asset materialization; launched by hand, it prints per-step lines and a final JSON line.
Nothing here imports Dagster: only the small `dagster_pipes` protocol package.

Advantage in teacher mode 'frozen' (the default): A_i = teacher_logprob_i (stored in the targets)
− log π_θ(y_i | x, y_<i) of the *current* student, detached. The stored student log-probs are not used:
a fixed stored A would push every token's log-prob up (or down) without bound, while recomputing it
against the current student makes A shrink to 0 as the student reaches the teacher, which is the
paper's advantage (teacher minus the model being trained). At step 1 the two coincide, because LoRA
starts as the identity. In mode 'live' the teacher is also the current weights (adapter included),
scored under no_grad on the hindsight prompt, as in the paper.

`training.kl_coef` > 0 adds β · KL(π_θ ‖ π_ref) to the sdpo loss (`loss.reference_kl`), π_ref being the
same model with its adapter disabled: one more forward per step, without grad.

Baseline 'neutral_followup' (frozen only) keeps only what the follow-up says beyond the template: the
target becomes stored_student + (teacher − neutral), so at step 1 A = teacher − neutral (the design's
definition) and, like the plain frozen target, A still shrinks to 0 as the student reaches it.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import mlflow
import numpy as np
import pandas as pd
import torch
from peft import LoraConfig, get_peft_model
from pydantic import BaseModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sdpo_platform import paths
from sdpo_platform.config import TrainingConfig
from sdpo_platform.logprobs import (batch_response_log_softmax, batch_response_logprobs, batch_response_logprobs_at,
                                    sampled_logprobs)
from sdpo_platform.loss import advantage_diagnostics, reference_kl, sdpo_loss, topk_consistent, topk_forward_kl
from sdpo_platform.registry import configure_mlflow
from sdpo_platform.resume import RESUME_FILE, clear_point, load_point, restore, save_point
from sdpo_platform.targets import read_targets


class TrainRun(BaseModel):
    """Everything one training process needs; serialised to RUN.json by whoever launches it."""

    base_model_path: str
    targets_path: str
    output_dir: str
    training: TrainingConfig = TrainingConfig()
    mlflow_tracking_uri: str | None = None  # None: the data root's SQLite file
    mlflow_experiment: str = "sdpo"
    mlflow_run_name: str | None = None
    target_set: str = ""  # lineage: which hindsight targets (model revision, partition) this run used
    interaction_weights: dict[str, float] | None = None  # interaction_id → weight, for training.weighting='informativeness'


@dataclass
class TrainResult:
    steps: int
    loss_first: float
    loss_last: float
    losses: list[float]
    adapter_dir: str
    mlflow_run_id: str
    n_train_interactions: int


def read_split(targets_path: str | Path, split: str) -> pd.DataFrame:
    """One split ('train' | 'validation') of a target set, in an order set by content (seeded batches depend
    on it): interaction ids derive from the log file's path, so ordering by them would give the same logs
    other batches, and another model, under another data root."""
    frame = read_targets(targets_path)
    missing = [c for c in ("interaction_id", "split", "student_prompt_ids", "response_ids") if c not in frame]
    if missing:
        raise ValueError(f"the targets {targets_path} lack column(s) {missing}")
    rows = frame[frame.split == split].copy()
    rows["content_key"] = [
        hashlib.sha256(json.dumps([list(map(int, prompt)), list(map(int, response))]).encode()).hexdigest()
        for prompt, response in zip(rows.student_prompt_ids, rows.response_ids)
    ]
    return rows.sort_values(["content_key", "interaction_id"]).drop(columns="content_key").reset_index(drop=True)


def batch_indices(n_rows: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Seeded epochs: each epoch is a fresh permutation cut into batches (the last may be smaller)."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n_rows)
        for start in range(0, n_rows, batch_size):
            yield order[start : start + batch_size]


def learning_rate_at(step: int, cfg: TrainingConfig) -> float:
    """Linear warm-up over warmup_fraction of the steps, then cosine decay towards 0 (step is 0-based)."""
    warmup = math.ceil(cfg.warmup_fraction * cfg.steps)
    if step < warmup:
        return cfg.learning_rate * (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))


def frozen_teacher_logprobs(batch: pd.DataFrame, baseline: str, device) -> list[torch.Tensor]:
    """The stored teacher; under neutral_followup, the scoring-time student shifted by teacher − neutral."""
    def tensor(values) -> torch.Tensor:
        return torch.tensor(list(values), dtype=torch.float32, device=device)

    if baseline == "neutral_followup":
        return [tensor(s) + tensor(t) - tensor(n) for s, t, n in zip(batch.student_logprobs, batch.teacher_logprobs, batch.neutral_logprobs)]
    return [tensor(t) for t in batch.teacher_logprobs]


def reference_log_softmax(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> list[torch.Tensor]:
    """The reference of `training.kl_coef`: the round's base, i.e. this model with its LoRA adapter disabled,
    in eval mode and without grad."""
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        reference = batch_response_log_softmax(model, prompts, responses, pad_id)
    model.train()
    return reference


def live_teacher_logprobs(model, batch: pd.DataFrame, pad_id: int) -> list[torch.Tensor]:
    """The current weights on the hindsight prompt, in eval mode (no LoRA dropout) and without grad."""
    model.eval()
    with torch.no_grad():
        teacher = batch_response_logprobs(model, list(batch.teacher_prompt_ids), list(batch.response_ids), pad_id)
    model.train()
    return teacher


def check_train_rows(rows: pd.DataFrame, cfg: TrainingConfig, vocab_size: int) -> None:
    """Refuse, before the model loads and the MLflow run starts, train rows the loss would misread: a missing
    column, a log-prob list of another length than the response (it would broadcast), a non-finite
    teacher log-prob (it would train NaN weights), an unknown `truncated`, a malformed top-k."""
    needed = ["interaction_id", "student_prompt_ids", "response_ids", "truncated"]
    needed += ["teacher_prompt_ids"] if cfg.teacher == "live" else ["teacher_logprobs"]
    needed += ["student_logprobs", "neutral_logprobs"] if cfg.baseline == "neutral_followup" else []
    needed += ["teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_mass"] if cfg.loss == "topk_kl" else []
    missing = [c for c in needed if c not in rows]
    if missing:
        raise ValueError(f"the targets lack column(s) {missing} that training.{cfg.loss} with teacher {cfg.teacher!r} reads")
    per_token = [c for c in ("teacher_logprobs", "student_logprobs", "neutral_logprobs") if c in needed]
    for row in rows.itertuples():
        n, where = len(row.response_ids), f"train row {row.interaction_id}"
        if n == 0:
            raise ValueError(f"{where}: empty response")
        for column in per_token:
            values = np.asarray(getattr(row, column), dtype=float)
            if values.shape != (n,) or not np.isfinite(values).all():
                raise ValueError(f"{where}: {column} must hold one finite log-prob per response token ({n}), has {values.size}"
                                 + ("" if values.shape != (n,) else " with a non-finite one"))
        if row.truncated is None or pd.isna(row.truncated):
            raise ValueError(f"{where}: truncated is missing (whether the response was cut before its EOS)")
        if cfg.loss == "topk_kl" and not topk_consistent(row.teacher_topk_ids, row.teacher_topk_logprobs, row.teacher_tail_mass, n, vocab_size):
            raise ValueError(f"{where}: its top-k must hold {n} rows of k ids below {vocab_size}, k log-probs ≤ 0 and a tail mass in [0, 1]")


def start_mlflow_run(run: TrainRun, resume_run_id: str | None = None):
    """Tracking URI from the run (else the data root), the experiment made as the registry makes it: a new
    one keeps its artifacts under the data root with a local store, and where a tracking server says.
    `resume_run_id`: the killed run this one goes on with."""
    configure_mlflow(run.mlflow_tracking_uri, run.mlflow_experiment)
    if resume_run_id is not None:
        return mlflow.start_run(run_id=resume_run_id)
    return mlflow.start_run(run_name=run.mlflow_run_name)


def step_loss(model, batch: pd.DataFrame, cfg: TrainingConfig, run: TrainRun, pad_id: int) -> tuple[torch.Tensor, dict]:
    """One batch's loss and its diagnostics. The student's log-probs carry the gradient; the advantage (or the
    teacher's top-k) never does. Its own function so that every activation but the loss's graph is freed on
    return: the [|y|, vocab] rows, the step's largest, are gone before the next step's forward."""
    prompts, responses = list(batch.student_prompt_ids), list(batch.response_ids)
    ends_with_eos = [not cut for cut in batch.truncated]  # a response cut at the limit has no EOS
    device = torch.device(cfg.device)
    weights = None
    if cfg.weighting == "informativeness":
        weights = torch.tensor([run.interaction_weights[i] for i in batch.interaction_id], device=device)
    if cfg.loss == "topk_kl":
        topk_ids = [torch.tensor(np.asarray(ids, dtype=np.int64)) for ids in batch.teacher_topk_ids]
        student, student_topk, student_tail = batch_response_logprobs_at(model, prompts, responses, topk_ids, pad_id)
        teacher_topk = [torch.tensor(np.asarray(lp, dtype=np.float32), device=device) for lp in batch.teacher_topk_logprobs]
        tails = [torch.tensor(np.asarray(m, dtype=np.float32), device=device) for m in batch.teacher_tail_mass]
        loss, diagnostics = topk_forward_kl(student_topk, student_tail, teacher_topk, tails, skip=cfg.skip_tokens, weights=weights)
        teacher = frozen_teacher_logprobs(batch, cfg.baseline, device)
        diagnostics |= advantage_diagnostics([t - s.detach() for t, s in zip(teacher, student)], cfg.skip_tokens, ends_with_eos)
    else:
        student_rows = batch_response_log_softmax(model, prompts, responses, pad_id)  # autograd keeps them anyway
        student = sampled_logprobs(student_rows, responses)
        if cfg.teacher == "live":
            teacher = live_teacher_logprobs(model, batch, pad_id)
        else:
            teacher = frozen_teacher_logprobs(batch, cfg.baseline, device)
        advantages = [t - s.detach() for t, s in zip(teacher, student)]
        centring = "sequence_mean" if cfg.baseline == "sequence_mean" else "none"
        loss, diagnostics = sdpo_loss(student, advantages, skip=cfg.skip_tokens, baseline=centring, weights=weights,
                                      ends_with_eos=ends_with_eos)
        if cfg.kl_coef > 0:
            penalty, diagnostics["reference_kl"] = reference_kl(
                student_rows, reference_log_softmax(model, prompts, responses, pad_id), skip=cfg.skip_tokens, weights=weights)
            diagnostics["sdpo_loss"] = loss.item()
            loss = loss + cfg.kl_coef * penalty

    return loss, diagnostics


def train(run: TrainRun, on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train a LoRA adapter with the SDPO loss (or the top-k forward KL, `training.loss`); `on_step(step,
    metrics)` sees every step's logged metrics."""
    cfg = run.training
    torch.manual_seed(cfg.seed)

    # data: the train split of the targets
    rows = read_split(run.targets_path, "train")
    if rows.empty:
        raise ValueError(f"no train rows in {run.targets_path}")
    if cfg.baseline == "neutral_followup":
        if cfg.teacher == "live":
            raise ValueError("baseline 'neutral_followup' needs the frozen teacher (neutral prompts are not stored)")
        if "neutral_logprobs" not in rows or rows.neutral_logprobs.isna().any():
            raise ValueError("targets lack neutral_logprobs: score them with targets.neutral_followup set")
    if cfg.loss == "topk_kl":
        if cfg.kl_coef > 0:
            raise ValueError("training.kl_coef adds its penalty to the sdpo loss; topk_kl is already a KL to the stored teacher: set kl_coef 0")
        if cfg.teacher == "live" or cfg.baseline != "none":
            raise ValueError("training.loss 'topk_kl' matches the stored (frozen) teacher's distribution: it needs teacher 'frozen' and baseline 'none'")
        if "teacher_topk_ids" not in rows or rows.teacher_topk_ids.isna().any():
            raise ValueError("training.loss 'topk_kl' needs the teacher's top-k in the targets: score them with targets.top_k > 0")
    if cfg.weighting == "informativeness":
        missing = [i for i in rows.interaction_id if i not in (run.interaction_weights or {})]
        if missing:
            raise ValueError(f"training.weighting='informativeness' but {len(missing)} train rows have no weight, e.g. {missing[:3]}")
    check_train_rows(rows, cfg, AutoConfig.from_pretrained(run.base_model_path).vocab_size)
    batches = batch_indices(len(rows), cfg.batch_size, cfg.seed)

    # model: float32 base + LoRA adapter (the only trainable weights)
    tokenizer = AutoTokenizer.from_pretrained(run.base_model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    base = AutoModelForCausalLM.from_pretrained(run.base_model_path, dtype=torch.float32).to(cfg.device)
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules,
    )
    model = get_peft_model(base, lora)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate)

    # resume: a run killed after a resume point goes on from it (`resume.py`), in the same MLflow run
    point, abandoned_run = load_point(run.output_dir, run)
    losses: list[float] = []
    if point is not None:
        restore(point, model, optimizer)
        losses = point["losses"]
        for _ in range(point["step"]):
            next(batches)  # the batches the killed run drew
        print(f"resuming after step {point['step']}/{cfg.steps} from {Path(run.output_dir) / RESUME_FILE}", flush=True)
    with start_mlflow_run(run, resume_run_id=point["mlflow_run_id"] if point else None) as mlflow_run:
        if abandoned_run is not None:  # a killed run with other settings: nothing will resume it
            mlflow.MlflowClient().set_terminated(abandoned_run, "KILLED")
        if point is None:
            mlflow.log_params({f"training.{key}": value for key, value in cfg.model_dump().items()})
            mlflow.log_params({
                "target_set": run.target_set,
                "targets_path": run.targets_path,
                "base_model_path": run.base_model_path,
                "output_dir": run.output_dir,
                "n_train_interactions": len(rows),
                "trainable_parameters": sum(p.numel() for p in trainable),
            })

        for step in range(len(losses) + 1, cfg.steps + 1):
            started = time.perf_counter()
            lr = learning_rate_at(step - 1, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = rows.iloc[next(batches)]
            prompts, responses = list(batch.student_prompt_ids), list(batch.response_ids)
            with torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=cfg.autocast_bf16):
                loss, diagnostics = step_loss(model, batch, cfg, run, pad_id)  # backward below, outside autocast

            # backward, clip, step
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            optimizer.step()

            # log
            seconds = time.perf_counter() - started
            forward_tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses))
            metrics = {
                "loss": loss.item(),
                **diagnostics,
                "grad_norm": grad_norm.item(),
                "lr": lr,
                "step_seconds": seconds,
                "tokens_per_s": forward_tokens / seconds,
            }
            losses.append(metrics["loss"])
            mlflow.log_metrics(metrics, step=step)
            print(
                f"step {step}/{cfg.steps} loss {metrics['loss']:.4f} mean|A| {metrics['mean_abs_advantage']:.3f} "
                f"grad_norm {metrics['grad_norm']:.3f} lr {lr:.2e} {metrics['tokens_per_s']:.0f} tok/s",
                flush=True,
            )
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                save_point(run.output_dir, run, step, losses, model, optimizer, mlflow_run.info.run_id)
            if on_step is not None:
                on_step(step, metrics)

        # checkpoint: adapter + tokenizer + the state that explains it
        output_dir = Path(run.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        mlflow_run_id = mlflow_run.info.run_id
        state = {
            "config": cfg.model_dump(),
            "steps": cfg.steps,
            "losses": losses,
            "target_set": run.target_set,
            "base_model_path": run.base_model_path,
            "targets_path": run.targets_path,
            "n_train_interactions": len(rows),
            "mlflow_run_id": mlflow_run_id,
        }
        paths.atomic_write(output_dir / "train_state.json", lambda tmp: Path(tmp).write_text(json.dumps(state, indent=2)))  # never half-read
        clear_point(output_dir)
        mlflow.set_tag("adapter_dir", str(output_dir))

    return TrainResult(
        steps=cfg.steps,
        loss_first=losses[0],
        loss_last=losses[-1],
        losses=losses,
        adapter_dir=str(output_dir),
        mlflow_run_id=mlflow_run_id,
        n_train_interactions=len(rows),
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of the training process: Dagster Pipes when launched by it, plain stdout otherwise."""
    from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m sdpo_platform.train RUN.json")
    run = TrainRun.model_validate_json(Path(args[0]).read_text())

    if PipesEnvVarParamsLoader().is_dagster_pipes_process():
        with open_dagster_pipes() as pipes:
            def report(step: int, metrics: dict) -> None:
                pipes.log.info(f"step {step}/{run.training.steps} loss {metrics['loss']:.4f} tokens/s {metrics['tokens_per_s']:.0f}")

            result = train(run, on_step=report)
            pipes.report_asset_materialization(metadata={
                "steps": result.steps,
                "loss_first": result.loss_first,
                "loss_last": result.loss_last,
                "mlflow_run_id": result.mlflow_run_id,
                "adapter_dir": result.adapter_dir,
                "n_train_interactions": result.n_train_interactions,
                "target_set": run.target_set,
            })
    else:
        result = train(run)
        print(json.dumps(asdict(result)), flush=True)


if __name__ == "__main__":
    main()
