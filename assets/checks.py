"""One blocking Great Expectations check per asset: a failure stops everything downstream in the run."""


import dagster as dg

from assets import lineage
from assets.metadata import check_result
from assets.resources import SdpoSettings, Warehouse
from sdpo_platform import checks
from sdpo_platform.gating import record_check


@dg.asset_check(asset=lineage.raw_interaction_logs, blocking=True)
def raw_records_valid(warehouse: Warehouse) -> dg.AssetCheckResult:
    """Every record has an id, a source file and a line; ids are unique; the table is not empty."""
    with warehouse.connect() as con:
        return check_result(checks.check_raw_records(con))


def _gated(con, stage: str, partition: str, report) -> dg.AssetCheckResult:
    """Record the partition's verdict for later runs (cross-run gating), then report it."""
    record_check(con, stage, partition, report.passed, report.description)
    return check_result(report)


@dg.asset_check(asset=lineage.conversations, blocking=True)
def conversations_reconcile(context: dg.AssetCheckExecutionContext, settings: SdpoSettings, warehouse: Warehouse) -> dg.AssetCheckResult:
    """raw = kept + quarantined in the partition, readable records keep at least one conversation, and every kept
    conversation satisfies the cleaning filters."""
    day = context.partition_key
    with warehouse.connect() as con:
        return _gated(con, "conversations", day, checks.check_conversations(con, settings.platform().cleaning, [day]))


@dg.asset_check(asset=lineage.conversations, blocking=True)
def conversations_pii_redacted(context: dg.AssetCheckExecutionContext, warehouse: Warehouse) -> dg.AssetCheckResult:
    """No e-mail, phone, card, IP, key or credential pattern survives in the partition's cleaned text."""
    day = context.partition_key
    with warehouse.connect() as con:
        return _gated(con, "conversations_pii", day, checks.check_pii(con, [day]))


@dg.asset_check(asset=lineage.interactions, blocking=True)
def interactions_well_formed(context: dg.AssetCheckExecutionContext, warehouse: Warehouse) -> dg.AssetCheckResult:
    """Triples count equals assistant turns followed by a user turn; x starts and ends with a user turn."""
    day = context.partition_key
    with warehouse.connect() as con:
        return _gated(con, "interactions", day, checks.check_interactions(con, [day]))


@dg.asset_check(asset=lineage.interactions, blocking=True)
def interactions_judged(context: dg.AssetCheckExecutionContext, settings: SdpoSettings, warehouse: Warehouse) -> dg.AssetCheckResult:
    """Every triple judged, scores in [0, 1], kept fraction inside the configured bounds, no user above the cap."""
    from sdpo_platform.assessments import check_judged

    day = context.partition_key
    with warehouse.connect() as con:
        return _gated(con, "interactions_judged", day, check_judged(con, day, settings.platform()))


@dg.asset_check(asset=lineage.hindsight_targets, blocking=True)
def targets_finite_and_aligned(hindsight_targets: dict) -> dg.AssetCheckResult:
    """Finite log-probs, one per response token under both prompts, EOS last unless the response was cut,
    both splits present."""
    from sdpo_platform.targets import read_targets

    frame = read_targets(hindsight_targets["path"])
    return check_result(checks.check_targets(frame, hindsight_targets["eos_token_id"]))


@dg.asset_check(asset=lineage.distilled_checkpoint, blocking=True)
def checkpoint_trained(distilled_checkpoint: dict, settings: SdpoSettings) -> dg.AssetCheckResult:
    """All configured steps ran with finite losses and the adapter was saved."""
    state = distilled_checkpoint
    return check_result(checks.check_checkpoint(state["losses"], settings.platform().training.steps, state["adapter_dir"]))


@dg.asset_check(asset=lineage.evaluation, blocking=True)
def evaluation_finite(evaluation: dict) -> dg.AssetCheckResult:
    """Gaps are finite and measured on at least one held-out interaction."""
    values = {k: evaluation[k] for k in ("gap_before", "gap_after", "signed_before", "signed_after")}
    return check_result(checks.check_evaluation(values, evaluation["n_validation"]))


@dg.asset_check(asset=lineage.registered_model, blocking=True)
def registered_model_tagged(registered_model: dict) -> dg.AssetCheckResult:
    """The version carries alias `challenger` and the lineage tags a reviewer needs."""
    return check_result(
        checks.check_registration(
            registered_model["version"],
            registered_model["aliases"],
            registered_model["tags"],
            ["data_partition", "target_set", "model_revision", "validation_status"],
        )
    )


@dg.asset_check(asset=lineage.registered_model, blocking=True)
def registered_model_reloads_exactly(registered_model: dict) -> dg.AssetCheckResult:
    """The registered version, loaded offline from the registry, gives the checkpoint's logits (measured by the
    asset before it moved any alias: a version that fails here was never made champion)."""
    from sdpo_platform.registry import ROUNDTRIP_TOLERANCE, reloads_exactly

    diff = registered_model["max_logit_diff"]
    return dg.AssetCheckResult(
        passed=reloads_exactly(diff),
        severity=dg.AssetCheckSeverity.ERROR,
        description=f"max |logit difference| registry vs checkpoint = {diff:.2e} (tolerance {ROUNDTRIP_TOLERANCE:g})",
        metadata={"max_logit_diff": dg.MetadataValue.float(diff), "model_uri": registered_model["model_uri"]},
    )


lineage_checks = [
    raw_records_valid,
    conversations_reconcile,
    conversations_pii_redacted,
    interactions_well_formed,
    interactions_judged,
    targets_finite_and_aligned,
    checkpoint_trained,
    evaluation_finite,
    registered_model_tagged,
    registered_model_reloads_exactly,
]
