"""The seven assets of the SDPO lineage. Each body calls the library and reports what it did.

Assets hand each other small summaries (paths, ids, counts) through the IO manager; the data itself
lives in the warehouse, in Parquet target sets and in MLflow, all under the data root.
"""


import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import dagster as dg

from assets.metadata import examples_table
from assets.resources import MlflowTracking, SdpoSettings, Warehouse
from sdpo_platform import paths

chat_log_inbox = dg.AssetSpec(
    "chat_log_inbox",
    description="Chat log files (JSONL / JSON / gzip) dropped into the inbox folder by the serving stack.",
    group_name="sources",
    kinds={"file"},
)


@dg.asset(deps=[chat_log_inbox], group_name="data", kinds={"duckdb"})
def raw_interaction_logs(context: dg.AssetExecutionContext, settings: SdpoSettings, warehouse: Warehouse) -> dg.Output[dict]:
    """Inbox files into DuckDB, one row per source record, kept verbatim (bad records included)."""
    from sdpo_platform.ingest import ingest_inbox

    with warehouse.connect() as con:
        result = ingest_inbox(con, settings.inbox_dir())
    return dg.Output(
        asdict(result),
        metadata={
            "files": result.files,
            "files_rejected": result.files_rejected,
            "records_new": result.records_new,
            "records_total": dg.MetadataValue.int(result.records_total),
            "records_by_file": dg.MetadataValue.json(result.by_file),
        },
    )


@dg.asset(group_name="data", kinds={"duckdb", "sql"})
def conversations(raw_interaction_logs: dict, settings: SdpoSettings, warehouse: Warehouse) -> dg.Output[dict]:
    """Normalized, filtered (paper's rules), deduplicated conversations; rejects go to quarantine."""
    from sdpo_platform.cleaning import build_conversations

    with warehouse.connect() as con:
        result = build_conversations(con, settings.platform().cleaning)
    return dg.Output(
        asdict(result),
        metadata={
            "raw_records": result.raw_records,
            "kept": dg.MetadataValue.int(result.kept),
            "quarantined": result.quarantined,
            "kept_fraction": dg.MetadataValue.float(result.kept / max(result.raw_records, 1)),
            "quarantine_by_reason": dg.MetadataValue.json(result.by_reason),
            "languages": dg.MetadataValue.json(result.languages),
            "examples": examples_table(result.examples),
        },
    )


@dg.asset(group_name="data", kinds={"duckdb", "sql"})
def interactions(conversations: dict, settings: SdpoSettings, warehouse: Warehouse) -> dg.Output[dict]:
    """(x, y, o) triples: context, logged response, the user's follow-up; flagged and split."""
    from sdpo_platform.interactions import extract_interactions

    with warehouse.connect() as con:
        result = extract_interactions(con, settings.platform().interactions)
    return dg.Output(
        asdict(result),
        metadata={
            "interactions_total": dg.MetadataValue.int(result.total),
            "informative": result.informative,
            "informative_fraction": dg.MetadataValue.float(result.informative / max(result.total, 1)),
            "train": result.train,
            "validation": result.validation,
            "by_reason": dg.MetadataValue.json(result.by_reason),
            "examples": examples_table(result.examples),
        },
    )


@dg.asset(group_name="training", kinds={"pytorch", "parquet"})
def hindsight_targets(context: dg.AssetExecutionContext, interactions: dict, settings: SdpoSettings, warehouse: Warehouse) -> dg.Output[dict]:
    """Teacher (with follow-up) and student log-probs of each logged response, and their advantages."""
    from sdpo_platform.models import load_model, model_revision, resolve_model
    from sdpo_platform.targets import compute_targets, select_for_scoring, target_set_id, write_targets

    cfg = settings.platform()
    with warehouse.connect() as con:
        frame = con.sql("SELECT * FROM interactions ORDER BY interaction_id").df()
    selected = select_for_scoring(frame, cfg.targets)
    context.log.info(f"scoring {len(selected)} of {len(frame)} interactions with model {cfg.model!r}")
    model, tokenizer = load_model(cfg.model)
    revision = model_revision(cfg.model)

    started, reported = time.monotonic(), [0]

    def progress(done: int, total: int) -> None:  # every ~10%, with rate and ETA
        if done * 10 // total > reported[0] or done == total:
            reported[0] = done * 10 // total
            rate = done / max(time.monotonic() - started, 1e-9)
            context.log.info(f"hindsight targets: {done}/{total} sequences scored, {rate:.1f}/s, ETA {(total - done) / rate:.0f}s")

    targets = compute_targets(model, tokenizer, selected, cfg.targets, revision, progress=progress)
    path = write_targets(targets)
    template = targets["template_hash"].iloc[0]
    summary = {
        "path": str(path),
        "target_set": target_set_id(revision, template),
        "model_revision": revision,
        "base_model_path": resolve_model(cfg.model),
        "eos_token_id": int(tokenizer.eos_token_id),
        "rows": len(targets),
        "tokens": int(targets["n_tokens"].sum()),
        "train_rows": int((targets["split"] == "train").sum()),
        "validation_rows": int((targets["split"] == "validation").sum()),
    }
    ranked = targets.sort_values("mean_abs_advantage", ascending=False)
    return dg.Output(
        summary,
        metadata={
            **{k: v for k, v in summary.items() if k not in ("path", "base_model_path")},
            "path": dg.MetadataValue.path(str(path)),
            "mean_advantage": dg.MetadataValue.float(float(targets["mean_advantage"].mean())),
            "mean_abs_advantage": dg.MetadataValue.float(float(targets["mean_abs_advantage"].mean())),
            "strongest_signal": examples_table(
                ranked.head(3)[["interaction_id", "n_tokens", "mean_advantage", "mean_abs_advantage"]].to_dict("records")
            ),
        },
    )


@dg.asset(group_name="training", kinds={"pytorch", "mlflow"})
def distilled_checkpoint(
    context: dg.AssetExecutionContext,
    hindsight_targets: dict,
    settings: SdpoSettings,
    mlflow_tracking: MlflowTracking,
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.Output[dict]:
    """LoRA distillation of teacher into student, run as its own process (Dagster Pipes)."""
    from sdpo_platform.train import TrainRun

    cfg = settings.platform()
    output_dir = paths.models_dir() / "checkpoints" / f"{hindsight_targets['target_set']}-{context.run_id[:8]}"
    output_dir.mkdir(parents=True, exist_ok=True)
    run = TrainRun(
        base_model_path=hindsight_targets["base_model_path"],
        targets_path=hindsight_targets["path"],
        output_dir=str(output_dir),
        training=cfg.training,
        mlflow_tracking_uri=mlflow_tracking.configure(),
        mlflow_experiment=cfg.registry.experiment,
        mlflow_run_name=f"distill-{context.run_id[:8]}",
        target_set=hindsight_targets["target_set"],
    )
    run_file = output_dir / "run.json"
    run_file.write_text(run.model_dump_json(indent=2))
    invocation = pipes_subprocess_client.run(
        context=context,
        command=[sys.executable, "-m", "sdpo_platform.train", str(run_file)],
        env={"SDPO_HOME": str(paths.data_root())},
    )
    reported = invocation.get_materialize_result().metadata or {}
    state = json.loads((output_dir / "train_state.json").read_text())
    state.update(adapter_dir=str(output_dir), loss_first=state["losses"][0], loss_last=state["losses"][-1])
    return dg.Output(
        state,
        metadata={
            **reported,
            "adapter_dir": dg.MetadataValue.path(str(output_dir)),
            "losses": dg.MetadataValue.json([round(x, 5) for x in state["losses"]]),
        },
    )


@dg.asset(group_name="training", kinds={"pytorch", "mlflow"})
def evaluation(hindsight_targets: dict, distilled_checkpoint: dict, warehouse: Warehouse, mlflow_tracking: MlflowTracking) -> dg.Output[dict]:
    """Held-out hindsight gap, base vs checkpoint: how far the student is from the teacher."""
    import mlflow

    from sdpo_platform.evaluate import evaluate_checkpoint, record_evaluation

    result = evaluate_checkpoint(hindsight_targets["base_model_path"], distilled_checkpoint["adapter_dir"], hindsight_targets["path"])
    with warehouse.connect() as con:
        record_evaluation(con, result, hindsight_targets["target_set"], distilled_checkpoint["adapter_dir"], distilled_checkpoint["mlflow_run_id"])
    values = asdict(result)
    mlflow_tracking.configure()
    client = mlflow.MlflowClient()
    for key in ("gap_before", "gap_after", "signed_before", "signed_after"):
        client.log_metric(distilled_checkpoint["mlflow_run_id"], f"eval_{key}", float(values[key]))
    return dg.Output(
        values,
        metadata={
            "gap_before": dg.MetadataValue.float(result.gap_before),
            "gap_after": dg.MetadataValue.float(result.gap_after),
            "gap_change": dg.MetadataValue.float(result.gap_after - result.gap_before),
            "n_validation": result.n_validation,
            "improved": result.improved,
        },
    )


@dg.asset(group_name="registry", kinds={"mlflow"})
def registered_model(
    hindsight_targets: dict, distilled_checkpoint: dict, evaluation: dict, settings: SdpoSettings, mlflow_tracking: MlflowTracking
) -> dg.Output[dict]:
    """An MLflow model version with alias `challenger`; `champion` when the gate passes (or none exists)."""
    from sdpo_platform.registry import log_checkpoint, promote

    cfg = settings.platform()
    mlflow_tracking.configure()
    gate_passed = bool(evaluation["improved"])  # blocking checks upstream already stopped bad data
    tags = {
        "data_partition": "all",
        "target_set": hindsight_targets["target_set"],
        "model_revision": hindsight_targets["model_revision"],
        "gap_before": f"{evaluation['gap_before']:.6f}",
        "gap_after": f"{evaluation['gap_after']:.6f}",
        "validation_status": "improved" if gate_passed else "not_improved",
        "checks": "passed",
    }
    version = log_checkpoint(
        distilled_checkpoint["adapter_dir"],
        hindsight_targets["base_model_path"],
        distilled_checkpoint["mlflow_run_id"],
        cfg.registry.model_name,
        tags,
        {"gap_before": evaluation["gap_before"], "gap_after": evaluation["gap_after"]},
    )
    aliases = promote(version.name, version.version, gate_passed=gate_passed)
    summary = {**asdict(version), "aliases": aliases, "tags": tags, "gate_passed": gate_passed}
    return dg.Output(
        summary,
        metadata={
            "model_name": version.name,
            "version": version.version,
            "model_uri": version.model_uri,
            "aliases": dg.MetadataValue.json(aliases),
            "gate_passed": gate_passed,
        },
    )


lineage_assets = [
    raw_interaction_logs,
    conversations,
    interactions,
    hindsight_targets,
    distilled_checkpoint,
    evaluation,
    registered_model,
]
