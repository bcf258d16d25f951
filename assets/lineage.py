"""The seven assets of the SDPO lineage. Each body calls the library and reports what it did.

Assets hand each other small summaries (paths, ids, counts) through the IO manager; the data itself
lives in the warehouse, in Parquet target sets and in MLflow, all under the data root.
"""


import json
import sys
from dataclasses import asdict

import dagster as dg

from assets.metadata import examples_table, heatmap_preview, histogram_chart
from assets.partitions import daily_partitions
from assets.schedules import ROUND_TAG
from assets.resources import MlflowTracking, SdpoSettings, Warehouse
from sdpo_platform import paths
from sdpo_platform.assessments import hindsight_template
from sdpo_platform.gating import blocked_partitions
from sdpo_platform.progress import stage_logger

chat_log_inbox = dg.AssetSpec(
    "chat_log_inbox",
    description="Chat log files (JSONL / JSON / gzip) dropped into the inbox folder by the serving stack.",
    group_name="sources",
    kinds={"file"},
)


@dg.asset(deps=[chat_log_inbox], partitions_def=daily_partitions, group_name="data", kinds={"duckdb"})
def raw_interaction_logs(context: dg.AssetExecutionContext, settings: SdpoSettings, warehouse: Warehouse) -> dg.Output[dict]:
    """Inbox files into DuckDB, one row per source record, kept verbatim (bad records included).

    Ingestion is idempotent and whole-file: any partition's run ingests every new or changed inbox
    file, and reports the records that fall on its own day (conversation time, else file arrival).
    """
    from sdpo_platform.ingest import ingest_inbox

    day = context.partition_key
    with warehouse.connect() as con:
        result = ingest_inbox(con, settings.inbox_dir(), cfg=settings.platform().ingest,
                              progress=stage_logger(context.log.info, "ingest"))
        in_partition = con.execute("SELECT count(*) FROM raw_records WHERE partition_date = ?::DATE", [day]).fetchall()[0][0]
    for error in result.errors:
        context.log.warning(error)
    summary = {**asdict(result), "partition": day, "partition_records": int(in_partition)}
    return dg.Output(
        summary,
        metadata={
            "partition_records": dg.MetadataValue.int(int(in_partition)),
            "files": result.files,
            "files_rejected": result.files_rejected,
            "records_new": result.records_new,
            "records_total": result.records_total,
            "partitions_touched": dg.MetadataValue.json(result.partitions),
            "records_by_file": dg.MetadataValue.json(result.by_file),
            "errors": dg.MetadataValue.json(result.errors),
        },
    )


@dg.asset(partitions_def=daily_partitions, group_name="data", kinds={"duckdb", "sql"})
def conversations(context: dg.AssetExecutionContext, raw_interaction_logs: dict, settings: SdpoSettings, warehouse: Warehouse) -> dg.Output[dict]:
    """Normalized, PII-redacted, filtered (paper's rules), deduplicated conversations; rejects go to quarantine."""
    from sdpo_platform.cleaning import build_conversations, language_mix, length_histogram

    day = context.partition_key
    with warehouse.connect() as con:
        result = build_conversations(con, settings.platform().cleaning, partitions=[day],
                                     progress=stage_logger(context.log.info, "conversations"))
        histogram = length_histogram(con, [day])
        languages = language_mix(con, [day])
    return dg.Output(
        asdict(result),
        metadata={
            "raw_records": result.raw_records,
            "kept": dg.MetadataValue.int(result.kept),  # conversations (a ShareGPT conversation may span records)
            "records_kept": dg.MetadataValue.int(result.records_kept),  # raw_records = records_kept + quarantined
            "quarantined": result.quarantined,
            "kept_fraction": dg.MetadataValue.float(result.records_kept / max(result.raw_records, 1)),
            "quarantine_by_reason": dg.MetadataValue.json(result.by_reason),
            "language_mix": dg.MetadataValue.json(languages),
            "length_histogram": histogram_chart(histogram, "characters per kept conversation"),
            "examples": examples_table(result.examples),
        },
    )


@dg.asset(partitions_def=daily_partitions, group_name="data", kinds={"duckdb", "sql", "pytorch"})
def interactions(context: dg.AssetExecutionContext, conversations: dict, settings: SdpoSettings, warehouse: Warehouse) -> dg.Output[dict]:
    """(x, y, o) triples, each judged: follow-up kind, model-based informativeness, safety, caps, keep."""
    from sdpo_platform.assessments import assess_partition
    from sdpo_platform.interactions import extract_interactions
    from sdpo_platform.models import load_model, release_device_memory

    cfg, day = settings.platform(), context.partition_key
    with warehouse.connect() as con:
        result = extract_interactions(con, cfg.interactions, partitions=[day],
                                      progress=stage_logger(context.log.info, "interactions"))
    model = tokenizer = None
    if cfg.informativeness.use_model and result.total:
        model, tokenizer = load_model(cfg.model)
        context.log.info(f"scoring the informativeness signal of {result.total} triples with {cfg.model!r}")
    with warehouse.connect() as con:
        assessed, excluded = assess_partition(
            con, day, cfg, model, tokenizer, progress=stage_logger(context.log.info, "informativeness")
        )
    del model
    release_device_memory()  # the run's later steps (training runs as its own process) get the GPU memory back
    kept = assessed.sort_values("informativeness", ascending=False)
    return dg.Output(
        {**asdict(result), "kept": excluded["n_kept"]},
        metadata={
            "interactions_total": dg.MetadataValue.int(result.total),
            "kept": dg.MetadataValue.int(excluded["n_kept"]),
            "kept_fraction": dg.MetadataValue.float(excluded["kept_fraction"]),
            "excluded_by_reason": dg.MetadataValue.json(excluded["excluded_by_reason"]),
            "safety_rules_fired": dg.MetadataValue.json(excluded["safety_rules_fired"]),
            "kept_by_kind": dg.MetadataValue.json(excluded["kept_by_kind"]),
            "extracted_train": result.train,  # every triple, before the judge (`kept` is after it)
            "extracted_validation": result.validation,
            "most_informative": examples_table(
                kept.head(3)[["interaction_id", "followup_kind", "informativeness", "keep"]].to_dict("records")
            ),
            "examples": examples_table(result.examples),
        },
    )


@dg.asset(deps=[interactions], group_name="training", kinds={"pytorch", "parquet"})
def hindsight_targets(
    context: dg.AssetExecutionContext, settings: SdpoSettings, warehouse: Warehouse, mlflow_tracking: MlflowTracking
) -> dg.Output[dict]:
    """Teacher (with follow-up) and student log-probs of each logged response, and their advantages.

    Resumable: shards already scored for this model revision and template are reused, so a rerun of a
    complete set costs nothing. A heatmap of the most and least informative interactions is attached.
    """
    from transformers import AutoTokenizer

    from sdpo_platform.heatmap import publish_extremes
    from sdpo_platform.models import resolve_model
    from sdpo_platform.progress import progress_logger
    from sdpo_platform.registry import round_model
    from sdpo_platform.rounds import round_inputs
    from sdpo_platform.target_workers import materialize_targets
    from sdpo_platform.selection import select_from_warehouse
    from sdpo_platform.targets import read_targets

    cfg = settings.platform()
    mlflow_tracking.configure()
    model_spec, teacher = round_model(cfg.registry.model_name, cfg.model, cfg.registry.next_round_from)
    with warehouse.connect() as con:
        blocked = blocked_partitions(con)  # days whose blocking checks failed in an earlier run
        selected, available = select_from_warehouse(con, cfg.targets, blocked)  # kept (judged) rows only, capped per split
        inputs = round_inputs(con, cfg)  # what this round reads: `registered_model` tags its run with it
    if blocked:
        context.log.warning(f"excluding interactions of {len(blocked)} blocked partition(s): {', '.join(blocked)}")
    context.log.info(f"scoring {len(selected)} of {available} interactions with {teacher} (the round's base and teacher)")
    targets_cfg = cfg.targets.model_copy(update={"template": hindsight_template(cfg)})  # principles preamble, if on
    result = materialize_targets(selected, targets_cfg, model_spec, progress=progress_logger(context.log.info), show_bar=False,
                                 log=context.log.info,  # logs the set's folder first: workers may join (docs/SCALE_OUT.md)
                                 snapshot_label=context.run_id)  # downstream reads these rows, whatever later runs add
    context.log.info(f"target set {result.target_set}: {result.shards_scored} shard(s) scored here, "
                     f"{result.shards_scored_elsewhere} by other workers, {result.shards_reused} reused")
    targets = read_targets(result.snapshot)
    base_model_path = resolve_model(model_spec)
    tokenizer = AutoTokenizer.from_pretrained(base_model_path)

    heatmap = publish_extremes(result, targets, selected, tokenizer, cfg.registry.experiment, mlflow_tracking.tracking_uri,
                               run_label=context.run_id[:8])

    summary = {
        "path": result.snapshot,  # this run's rows; `set_dir` is the set they belong to
        "set_dir": result.path,
        "target_set": result.target_set,
        "model_revision": result.model_revision,
        "teacher": teacher,
        "round_inputs": inputs.digest,
        "base_model_path": base_model_path,
        "eos_token_id": int(tokenizer.eos_token_id),
        "partitions": sorted({str(day)[:10] for day in selected["partition_date"]}),
        "blocked_partitions": blocked,
        "rows": len(targets),
        "tokens": int(targets["n_tokens"].sum()),
        "truncated_rows": int(targets["truncated"].sum()),  # responses cut at max_response_tokens (no EOS learned)
        "train_rows": int((targets["split"] == "train").sum()),
        "validation_rows": int((targets["split"] == "validation").sum()),
    }
    ranked = targets.sort_values("mean_abs_advantage", ascending=False)
    half = max(1, min(3, len(ranked) // 2))  # the two tables never show the same row
    columns = ["interaction_id", "n_tokens", "mean_advantage", "mean_abs_advantage"]
    return dg.Output(
        summary,
        metadata={
            **{k: v for k, v in summary.items() if k not in ("path", "set_dir", "base_model_path")},
            "targets_snapshot": dg.MetadataValue.path(result.snapshot),  # the rows trained on (`path` is the IO manager's)
            "set_dir": dg.MetadataValue.path(result.path),
            "shards": result.shards,
            "shards_scored": result.shards_scored,
            "shards_scored_elsewhere": result.shards_scored_elsewhere,
            "shards_reused": result.shards_reused,
            "mean_advantage": dg.MetadataValue.float(float(targets["mean_advantage"].mean())),
            "mean_abs_advantage": dg.MetadataValue.float(float(targets["mean_abs_advantage"].mean())),
            "strongest_signal": examples_table(ranked.head(half)[columns].to_dict("records")),
            "weakest_signal": examples_table(ranked.tail(len(ranked) - half).tail(half)[columns].to_dict("records")),
            "heatmap": dg.MetadataValue.path(str(heatmap.path)),
            "heatmap_preview": heatmap_preview(heatmap.rows),
            "heatmap_mlflow_run": heatmap.mlflow_run_id,
        },
    )


@dg.asset(group_name="training", kinds={"pytorch", "mlflow"})
def distilled_checkpoint(
    context: dg.AssetExecutionContext,
    hindsight_targets: dict,
    settings: SdpoSettings,
    warehouse: Warehouse,
    mlflow_tracking: MlflowTracking,
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.Output[dict]:
    """LoRA distillation of teacher into student, run as its own process (Dagster Pipes)."""
    from sdpo_platform.resume import output_folder
    from sdpo_platform.train import TrainRun

    cfg = settings.platform()
    folder = lambda run_id: paths.models_dir() / "checkpoints" / f"{hindsight_targets['target_set']}-{run_id[:8]}"  # noqa: E731
    earlier = [folder(r) for r in (context.run.parent_run_id, context.run.root_run_id) if r]  # a re-execution resumes a killed try
    output_dir = output_folder(folder(context.run_id), earlier)
    if output_dir != folder(context.run_id):
        context.log.info(f"resuming the training that an earlier try left in {output_dir}")
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
        interaction_weights=_weights(warehouse, hindsight_targets["path"]) if cfg.training.weighting == "informativeness" else None,
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
def evaluation(
    hindsight_targets: dict, distilled_checkpoint: dict, settings: SdpoSettings, warehouse: Warehouse, mlflow_tracking: MlflowTracking
) -> dg.Output[dict]:
    """Held-out hindsight gap, base vs checkpoint (and vs the champion, when rounds start from the base
    model): how far the student is from the teacher, as mean |teacher − student| log-prob per response token
    (nats) over the validation split."""
    import mlflow

    from sdpo_platform.evaluate import evaluate_checkpoint, record_evaluation
    from sdpo_platform.registry import champion_to_beat

    cfg = settings.platform()
    mlflow_tracking.configure()
    champion_path = champion_to_beat(cfg.registry.model_name, cfg.registry.next_round_from)
    result = evaluate_checkpoint(hindsight_targets["base_model_path"], distilled_checkpoint["adapter_dir"], hindsight_targets["path"],
                                 champion_path, device=cfg.training.device)
    with warehouse.connect() as con:
        record_evaluation(con, result, hindsight_targets["target_set"], distilled_checkpoint["adapter_dir"], distilled_checkpoint["mlflow_run_id"])
    values = asdict(result)
    client = mlflow.MlflowClient()
    for key in ("gap_before", "gap_after", "signed_before", "signed_after", "gap_champion"):
        if values[key] is not None:
            client.log_metric(distilled_checkpoint["mlflow_run_id"], f"eval_{key}", float(values[key]))
    return dg.Output(
        values,
        metadata={
            "gap_before": dg.MetadataValue.float(result.gap_before),
            "gap_after": dg.MetadataValue.float(result.gap_after),
            "gap_change": dg.MetadataValue.float(result.gap_after - result.gap_before),
            "n_validation": result.n_validation,
            "gap_unit": "mean |teacher − student| log-prob per response token (nats), validation split",
            **({"gap_champion": dg.MetadataValue.float(result.gap_champion)} if result.gap_champion is not None else {}),
            "improved": result.improved,
        },
    )


@dg.asset(group_name="registry", kinds={"mlflow"})
def registered_model(
    context: dg.AssetExecutionContext, hindsight_targets: dict, distilled_checkpoint: dict, evaluation: dict,
    settings: SdpoSettings, mlflow_tracking: MlflowTracking,
) -> dg.Output[dict]:
    """An MLflow model version with alias `challenger`; `champion` when the gate passes (or none exists)."""
    from sdpo_platform.registry import log_checkpoint, promote, record_reload, reloads_exactly

    cfg = settings.platform()
    mlflow_tracking.configure()
    gate_passed = bool(evaluation["improved"])  # blocking checks upstream already stopped bad data
    tags = {
        "data_partition": ",".join(hindsight_targets["partitions"]),  # the days the targets were drawn from
        "target_set": hindsight_targets["target_set"],
        "targets_snapshot": hindsight_targets["path"],  # the exact rows trained and evaluated on
        "model_revision": hindsight_targets["model_revision"],
        "teacher": hindsight_targets.get("teacher", "base"),  # the round's base: the previous champion or the base model
        "gap_before": f"{evaluation['gap_before']:.6f}",
        "gap_after": f"{evaluation['gap_after']:.6f}",
        **({"gap_champion": f"{evaluation['gap_champion']:.6f}"} if evaluation.get("gap_champion") is not None else {}),
        "validation_status": "improved" if gate_passed else "not_improved",
    }
    version = log_checkpoint(
        distilled_checkpoint["adapter_dir"],
        hindsight_targets["base_model_path"],
        distilled_checkpoint["mlflow_run_id"],
        cfg.registry.model_name,
        tags,
        {"gap_before": evaluation["gap_before"], "gap_after": evaluation["gap_after"]},
        max_new_tokens=cfg.registry.serve_max_new_tokens,
    )
    # before any alias moves: a version that does not reload as its checkpoint never becomes champion
    reload_diff = record_reload(version.name, version.version, distilled_checkpoint["adapter_dir"], hindsight_targets["base_model_path"])
    aliases = promote(version.name, version.version, gate_passed=gate_passed, reloads=reloads_exactly(reload_diff))
    summary = {**asdict(version), "aliases": aliases, "tags": tags, "gate_passed": gate_passed, "max_logit_diff": reload_diff}
    if "round_inputs" in hindsight_targets:  # the round is done: `nightly_retrain` skips another on the same inputs
        context.instance.add_run_tags(context.run_id, {ROUND_TAG: hindsight_targets["round_inputs"]})
    return dg.Output(
        summary,
        metadata={
            "model_name": version.name,
            "version": version.version,
            "model_uri": version.model_uri,
            "aliases": dg.MetadataValue.json(aliases),
            "gate_passed": gate_passed,
            "tags": dg.MetadataValue.json(tags),  # what it was trained and judged on, as the registry holds it
        },
    )


def _weights(warehouse: Warehouse, targets_path: str) -> dict[str, float]:
    """The informativeness of the rows the round trained on (its targets snapshot), the loss weights."""
    from sdpo_platform.assessments import informativeness_weights
    from sdpo_platform.targets import read_targets

    ids = list(read_targets(targets_path, columns=["interaction_id"])["interaction_id"])
    with warehouse.connect() as con:
        return informativeness_weights(con, ids)


lineage_assets = [
    raw_interaction_logs,
    conversations,
    interactions,
    hindsight_targets,
    distilled_checkpoint,
    evaluation,
    registered_model,
]
