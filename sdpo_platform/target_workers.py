"""Scoring a planned target set: the one loop every scorer runs, the asset's call, and the worker command.

`targets.py` says what a set is (its rows, key, plan, shards on disk); this module fills it. Any process
holding the model scores pending shards, claiming each first (`shard_claims`), so the asset and any
number of workers split one set without a shard list:

    python -m sdpo_platform.target_workers SET_DIR [--shards 0 3 7] [--model PATH] [--wait]

`materialize_targets` (the asset) plans the set, logs its folder, scores what it can claim and waits for
shards live workers hold, so it returns only with a complete set.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from sdpo_platform.config import TargetsConfig
from sdpo_platform.paths import atomic_write
from sdpo_platform.progress import ProgressCallback, ScoringProgress
from sdpo_platform.shard_claims import CLAIM_TIMEOUT_S, describe, read_claim, try_claim
from sdpo_platform.target_sets import leftovers
from sdpo_platform.targets import (
    MANIFEST_FILE, _shard, check_scorable, compute_targets, pending_shards, plan_target_set, read_manifest, read_plan, shard_done, snapshot_plan,
)  # fmt: skip

POLL_S, WAIT_LOG_S = 10.0, 60.0  # while others score the rest: look again / say so this often


@dataclass
class TargetSetResult:
    """What one materialization did: the set's folder, its size, and which process scored its shards."""

    path: str
    target_set: str
    model_revision: str
    template_hash: str
    rows: int
    shards: int
    shards_scored: int  # written by this process
    shards_reused: int  # on disk already when planned
    shards_scored_elsewhere: int = 0  # written by other workers while this one ran
    snapshot: str | None = None  # the set as this materialization completed it (`targets.snapshot_plan`)


def checked_model_path(manifest: dict, model_path: str | None = None) -> str:
    """`model_path` (this machine's copy) or the manifest's, if it has the set's revision; else a ValueError."""
    from sdpo_platform.models import model_revision

    path = model_path or manifest["model_path"]
    if model_revision(path) != manifest["model_revision"]:
        hint = "" if model_path or Path(path).exists() else ": it is not there, give this machine's copy with --model PATH"
        raise ValueError(f"{path} does not have the set's model revision {manifest['model_revision']}{hint}")
    return path


def load_scoring_model(manifest: dict, model_path: str | None = None):
    """The set's model (`checked_model_path`) in the set's precision."""
    import torch

    from sdpo_platform.models import load_model

    dtype = manifest.get("dtype")
    return load_model(checked_model_path(manifest, model_path), dtype=getattr(torch, dtype) if dtype else None)


class _Replanned(Exception):
    """The set was re-planned while this process loaded the model: score the new plan's shard instead."""


def score_shard(set_dir: str | Path, shard_index: int, model=None, tokenizer=None, progress: ProgressCallback | None = None) -> bool:
    """Score one planned shard and write it atomically; True only when this call wrote it.

    Independent of any other process: the plan and the inputs are read from the set's folder and
    checked against each other (`read_plan`), so the shard is computed from, and named after, the rows
    of one plan. Without `model` the manifest's model is loaded (`load_scoring_model`), only once the
    shard is claimed: False, without loading anything, when the shard is on disk or another live
    process claims it. A set re-planned while the model loaded is read again, and its shard scored.
    """
    set_dir = Path(set_dir)
    loaded = [(model, tokenizer)] if model is not None and tokenizer is not None else []
    while True:
        manifest, data = read_plan(set_dir)
        shard = _shard(manifest, shard_index)
        if shard_done(set_dir, shard):
            return False

        def get_model() -> tuple:
            if not loaded:
                loaded.append(load_scoring_model(manifest))
                if read_manifest(set_dir).get("inputs_sha256") != manifest["inputs_sha256"]:
                    raise _Replanned  # releases the claim of the old plan's shard
            return loaded[0]

        try:
            return _score_claimed(set_dir, manifest, data, shard, get_model, progress)
        except _Replanned:
            continue


@dataclass
class ScoringRun:
    """What `score_pending` saw: shards it wrote, shards others wrote meanwhile, and those still missing."""

    scored: list[int] = field(default_factory=list)
    elsewhere: list[int] = field(default_factory=list)
    reused: int = 0  # on disk at the start
    left: list[int] = field(default_factory=list)  # claimed by others when it stopped (never when waiting)
    manifest: dict = field(default_factory=dict)  # the plan it scored


def score_pending(
    set_dir: str | Path,
    load: Callable[[], tuple],
    only: list[int] | None = None,
    wait: bool = False,
    progress: ProgressCallback | None = None,
    show_bar: bool = False,
    log: Callable[[str], None] | None = None,
    shard_lines: bool = False,
    poll_s: float = POLL_S,
    claim_timeout_s: float = CLAIM_TIMEOUT_S,
) -> ScoringRun:
    """Claim and score the set's missing shards (or those of `only`) until none is left to claim.

    Shards claimed by live others are skipped; with `wait` this polls until they are on disk, taking
    over claims that go stale, so the set is complete on return. `load()` gives `(model, tokenizer)` and
    is called at the first claim won. `progress` gets a `ScoringProgress` over the pending interactions
    (others' shards count once seen) after every batch, and with `extra["shards_done"]` after every
    shard written here; `show_bar` draws a tqdm bar on stderr when it is a terminal; `log` gets the
    waits and, with `shard_lines`, a line per shard.
    """
    from tqdm.auto import tqdm

    set_dir, log = Path(set_dir), log or (lambda message: None)
    manifest, data = read_plan(set_dir)
    chosen = [s for s in manifest["shards"] if only is None or s["index"] in only]
    pending = [s for s in chosen if not shard_done(set_dir, s)]
    run, total = ScoringRun(reused=len(chosen) - len(pending), manifest=manifest), sum(s["rows"] for s in pending)
    loaded: list[tuple] = []  # the model, once a claim is won: nothing is loaded when others do it all
    seen: set[int] = set()

    load_window = [0.0, 0.0]  # when the model loaded: rates and ETAs count scoring time, not the load

    def get_model() -> tuple:
        if not loaded:
            load_window[0] = time.monotonic()
            loaded.append(load())
            load_window[1] = time.monotonic()
        return loaded[0]

    def scoring_s(since: float) -> float:
        now = time.monotonic()
        return now - since - max(0.0, min(now, load_window[1]) - max(since, load_window[0]))

    started, done_rows, tokens, last_wait_log = time.monotonic(), 0, 0, -WAIT_LOG_S
    bar = tqdm(total=total, unit="interaction", desc="hindsight targets", disable=None if show_bar else True, file=sys.stderr)
    try:
        while True:
            others_done = [s for s in pending if s["index"] not in seen and shard_done(set_dir, s)]
            for s in others_done:  # count shards others finished, once
                seen.add(s["index"])
                run.elsewhere.append(s["index"])
                done_rows += s["rows"]
                bar.update(s["rows"])
            if others_done and progress is not None:  # the log keeps up with the set, not only with this process
                progress(ScoringProgress(done_rows, total, tokens, scoring_s(started), {"shards_elsewhere": len(run.elsewhere)}))
            todo = [s for s in pending if s["index"] not in seen]
            if not todo:
                break
            wrote = False
            for s in todo:
                if shard_done(set_dir, s):
                    continue
                shard_started, last = time.monotonic(), []

                def report(p: ScoringProgress) -> None:
                    overall = ScoringProgress(done_rows + p.interactions_done, total, tokens + p.tokens_done, scoring_s(started))
                    bar.update(overall.interactions_done - bar.n)
                    bar.set_postfix(tokens_per_s=f"{overall.tokens_per_s:.0f}")
                    last[:] = [overall]
                    if progress is not None:
                        progress(overall)

                if not _score_claimed(set_dir, manifest, data, s, get_model, report, claim_timeout_s):
                    continue
                wrote = True
                seen.add(s["index"])
                run.scored.append(s["index"])
                done_rows += s["rows"]
                tokens = last[-1].tokens_done if last else tokens
                bar.update(done_rows - bar.n)
                elapsed = scoring_s(started)
                if shard_lines:
                    eta = (total - done_rows) * elapsed / max(done_rows, 1)
                    log(
                        f"shard {s['index']}: scored {s['rows']} interactions in {scoring_s(shard_started):.1f}s; "
                        f"{done_rows}/{total} interactions, {tokens / max(elapsed, 1e-9):.0f} tokens/s, ETA {eta:.0f}s"
                    )
                if progress is not None:
                    extra = {"shards_done": len(run.scored), "shards_total": len(pending), "shard": s["index"]}
                    progress(ScoringProgress(done_rows, total, tokens, elapsed, extra))
            if wrote:
                continue
            left = [s for s in todo if not shard_done(set_dir, s)]
            if left and not wait:
                run.left = [s["index"] for s in left]
                break
            if left and time.monotonic() - last_wait_log >= WAIT_LOG_S:
                holders = [describe(h) for s in left[:3] if (h := read_claim(_claim_path(set_dir, s)))]
                log(f"waiting for {len(left)} shard(s) that other workers are scoring: {', '.join(holders)}{' ...' if len(left) > 3 else ''}")
                last_wait_log = time.monotonic()
            if left:
                time.sleep(poll_s)
    finally:
        bar.close()
    return run


def materialize_targets(
    interactions: pd.DataFrame,
    cfg: TargetsConfig,
    model_spec: str,
    root: Path | None = None,
    progress: ProgressCallback | None = None,
    model=None,
    tokenizer=None,
    show_bar: bool = True,
    dtype: str | None = None,
    log: Callable[[str], None] | None = None,
    poll_s: float = POLL_S,
    claim_timeout_s: float = CLAIM_TIMEOUT_S,
    snapshot_label: str | None = None,
) -> TargetSetResult:
    """Plan the set of `model_spec`'s current revision, score the shards still missing, return when complete.

    Workers (`python -m sdpo_platform.target_workers SET_DIR`) may score shards of the same set meanwhile: each
    shard is claimed before it is scored, and shards other workers hold are waited for (`score_pending`).
    `dtype` is the precision the set is scored in: else `cfg.dtype` unless 'auto', else `model`'s when given,
    else what `load_model` picks here (bf16 on CUDA, float32 on CPU). The model is loaded only when this process wins a shard. `log`
    gets the set's folder once planned (for starting workers) and the waits. With `snapshot_label` the
    plan is pinned as `snapshots/<label>.json` when planned and again as completed (`result.snapshot`),
    for readers that must see exactly these rows while other runs grow (and prune) the set.
    """
    import torch

    from sdpo_platform.models import load_model, model_revision, release_device_memory, resolve_model

    revision, model_path = model_revision(model_spec, root), resolve_model(model_spec, root)
    dtype = dtype or cfg.pinned_dtype() or (_dtype_name(model) if model is not None else "bfloat16" if torch.cuda.is_available() else "float32")
    set_dir = plan_target_set(interactions, cfg, model_path, revision, root, dtype=dtype)
    manifest = read_manifest(set_dir)
    log = log or (lambda message: None)
    log(f"target set {set_dir}: {len(manifest['shards'])} shard(s), {len(pending_shards(set_dir))} to score ({dtype})")
    if snapshot_label:  # pinned from the start: a prune while this runs keeps the shards it writes
        snapshot_plan(set_dir, snapshot_label, manifest, complete=False)

    def load():
        return (model, tokenizer) if model is not None and tokenizer is not None else load_model(model_spec, root, dtype=getattr(torch, dtype))

    run = score_pending(set_dir, load, wait=True, progress=progress, show_bar=show_bar, log=log, poll_s=poll_s, claim_timeout_s=claim_timeout_s)
    release_device_memory()  # the model this call loaded is gone: its GPU memory goes back for training
    found = leftovers(set_dir, registered=lambda: None)  # no registry lookup here: expired snapshots count as kept
    if found.removable or found.young:
        log(f"{len(found.removable) + found.young} file(s) in {set_dir} belong to earlier plans or stopped workers: "
            "`sdpo targets prune` removes them once no reader needs them (docs/SCALE_OUT.md)")
    return TargetSetResult(
        path=str(set_dir),
        target_set=set_dir.name,
        model_revision=revision,
        template_hash=manifest["template_hash"],
        rows=manifest["rows"],
        shards=len(manifest["shards"]),
        shards_scored=len(run.scored),
        shards_reused=run.reused,
        shards_scored_elsewhere=len(run.elsewhere),
        snapshot=str(snapshot_plan(set_dir, snapshot_label, run.manifest)) if snapshot_label else None,
    )


def _claim_path(set_dir: Path, shard: dict) -> Path:
    return set_dir / shard["file"].replace(".parquet", ".claim")


def _dtype_name(model) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def _score_claimed(set_dir: Path, manifest: dict, data: bytes, shard: dict, get_model, progress, claim_timeout_s: float = CLAIM_TIMEOUT_S) -> bool:
    """Claim, score and write one shard of a checked plan (`read_plan`); False when it is done or claimed elsewhere.

    `get_model()` gives `(model, tokenizer)`, which must have the set's precision: shards of one set never mix them.
    """
    check_scorable(manifest)
    claim = try_claim(_claim_path(set_dir, shard), claim_timeout_s)
    if claim is None:
        return False
    with claim:
        if shard_done(set_dir, shard):
            return False
        model, tokenizer = get_model()
        if not claim.held():  # taken over while the model loaded, or in a race of takeovers (`try_claim`)
            return False
        if manifest.get("dtype", _dtype_name(model)) != _dtype_name(model):
            raise ValueError(f"the set is scored in {manifest['dtype']}, this model is {_dtype_name(model)}: load it in {manifest['dtype']}")
        inputs = pd.read_parquet(io.BytesIO(data), filters=[("shard", "==", shard["index"])])
        inputs["context"] = [json.loads(c) for c in inputs["context_json"]]
        cfg = TargetsConfig.model_validate(manifest["targets_config"])
        frame = compute_targets(model, tokenizer, inputs, cfg, manifest["model_revision"], progress=progress)
        atomic_write(set_dir / shard["file"], lambda tmp: frame.to_parquet(tmp, index=False))
    return True


def main(argv: list[str] | None = None) -> None:
    """Worker: claim and score pending shards of a planned target set (all, or those of --shards)."""
    from tqdm.auto import tqdm

    parser = argparse.ArgumentParser(prog="python -m sdpo_platform.target_workers", description=main.__doc__)
    parser.add_argument("set_dir", help="the set's folder (the asset logs it: 'target set <folder>: ...')")
    parser.add_argument("--shards", type=int, nargs="*", help="shard indices (default: every pending one)")
    parser.add_argument("--model", help="this machine's copy of the set's model (default: the manifest's model_path)")
    parser.add_argument("--wait", action="store_true", help="also wait for shards other workers hold, until the set is complete")
    args = parser.parse_args(argv)
    set_dir = Path(args.set_dir)
    if not (set_dir / MANIFEST_FILE).exists():
        parser.error(f"{set_dir} has no {MANIFEST_FILE}: not a planned target set")
    manifest = read_manifest(set_dir)
    if args.shards:
        unknown = sorted(set(args.shards) - {s["index"] for s in manifest["shards"]})
        if unknown:
            parser.error(f"--shards {' '.join(map(str, unknown))}: this plan has shards 0..{len(manifest['shards']) - 1} (re-planned since?)")
    pending = [i for i in pending_shards(set_dir) if not args.shards or i in args.shards]
    if pending:
        try:  # the weights are checked before any claim is made
            checked_model_path(manifest, args.model)
        except ValueError as error:
            parser.exit(1, f"error: {error}\n")
    interactive = sys.stderr.isatty()
    log = (lambda message: tqdm.write(message, file=sys.stderr)) if interactive else (lambda message: print(message, flush=True))
    run = score_pending(
        set_dir, lambda: load_scoring_model(manifest, args.model), only=args.shards or None, wait=args.wait,
        show_bar=interactive, log=log, shard_lines=not interactive,
    )  # fmt: skip
    print(
        f"{set_dir.name}: {len(run.scored)} shard(s) scored here, {len(run.elsewhere)} by other workers, {run.reused} already done"
        + (f"; {len(run.left)} still being scored by others ({' '.join(map(str, run.left))})" if run.left else "")
    )


if __name__ == "__main__":
    main()
