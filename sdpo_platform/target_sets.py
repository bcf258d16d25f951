"""Target sets on disk: what each holds, and removing what no plan needs any more (`sdpo targets`).

Sets never delete their own files while scoring: a set that grows is re-planned, and the shards of the
old plan that the new one does not keep stay in the folder, as do temp files and claims of killed
workers. They are safe to remove only once nothing reads the old plan, so removal is a separate,
explicit step with a grace period:

- shard files neither the current manifest nor a kept snapshot names, once the manifest is older than
  the grace period (a reader that read the previous manifest has long finished);
- snapshots (`targets.snapshot_plan`: the rows one run's training and evaluation read) older than the
  retention (`KEEP_SNAPSHOTS_S`, 30 days by default), and then their shards; never the set's newest
  complete snapshot (what its latest run reads, however old) nor one a registered model version names
  (`registered`: `registry.registered_snapshots`, asked only when an expired snapshot is found; when
  the registry cannot be read, every snapshot is kept, and so is every replaced shard of the set);
- temp files (`.*.tmp`, `.*.stale`) older than the grace period (writers rename theirs within seconds);
- claims whose holder is gone (`shard_claims.is_stale`): the next claimant would take them over anyway.

A snapshot that cannot be read keeps every shard of its set (it may pin any of them) and is reported.
Whole sets (an old champion's) are listed, never removed here: they record what a registered round
was trained on.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from sdpo_platform.paths import targets_dir
from sdpo_platform.shard_claims import is_stale, read_claim
from sdpo_platform.targets import MANIFEST_FILE, SNAPSHOTS_DIR, read_manifest, shard_done

GRACE_S = 3600.0  # leftovers younger than this are left alone: a reader or writer may still use them
KEEP_SNAPSHOTS_S = 30 * 86400.0  # a run's snapshot, and the shards it pins, are kept this long

# The snapshots registered model versions name, or None when the registry cannot be read (keep them all).
RegisteredSnapshots = Callable[[], "set[str] | None"]


@dataclass
class Leftovers:
    """What `prune_set` may remove now, how many more files it will once older, and what stopped it."""

    removable: list[Path]
    young: int
    problems: list[str]


@dataclass
class SetSummary:
    """One set folder at a glance; `leftover_*` is what `prune_set` would remove now."""

    target_set: str
    model_revision: str
    dtype: str
    rows: int
    shards: int
    shards_scored: int
    size_bytes: int
    leftover_files: int
    leftover_bytes: int
    last_written: str
    problems: list[str] = field(default_factory=list)


@dataclass
class PruneReport:
    """What `prune_set` removed (or would remove, on a dry run)."""

    target_set: str
    removed: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    kept_young: int = 0  # leftovers inside the grace period, left for a later prune
    problems: list[str] = field(default_factory=list)


def set_dirs(root: Path | None = None) -> list[Path]:
    """Planned sets under the data root, oldest manifest first."""
    found = [d for d in targets_dir(root).iterdir() if (d / MANIFEST_FILE).is_file()]
    return sorted(found, key=lambda d: ((d / MANIFEST_FILE).stat().st_mtime, d.name))


def snapshot_key(path: str | Path) -> tuple[str, str]:
    """A snapshot by (set, file) name, so a data root reached by another path still matches its tags."""
    path = Path(path)
    return path.parent.parent.name, path.name


def leftovers(
    set_dir: str | Path,
    grace_s: float = GRACE_S,
    now: float | None = None,
    keep_snapshots_s: float = KEEP_SNAPSHOTS_S,
    registered: RegisteredSnapshots = set,
) -> Leftovers:
    """Files of the set that no current plan, kept snapshot or live process needs (see the module docstring).

    Heatmaps, the plan, the current shards and kept snapshots are never leftovers.
    """
    set_dir, now = Path(set_dir), now if now is not None else time.time()
    needed = {s["file"] for s in read_manifest(set_dir)["shards"]}
    expired, problems = _expired_snapshots(set_dir, now, keep_snapshots_s, registered, needed)
    removable, young = list(expired), 0
    replanned_long_ago = now - (set_dir / MANIFEST_FILE).stat().st_mtime > grace_s
    snapshot_dir = set_dir / SNAPSHOTS_DIR
    for path in sorted(set_dir.iterdir()) + (sorted(snapshot_dir.glob(".*.tmp")) if snapshot_dir.is_dir() else []):
        if not path.is_file():
            continue
        name = path.name
        if name.startswith("shard-") and name.endswith(".parquet") and name not in needed:
            if problems:
                continue  # an unreadable snapshot may pin it
            orphan_ok = replanned_long_ago
        elif name.startswith(".") and name.endswith((".tmp", ".stale")):
            orphan_ok = now - path.stat().st_mtime > grace_s
        elif name.endswith(".claim"):
            holder = read_claim(path)
            if holder is None or not is_stale(holder):
                continue  # released meanwhile, or a live worker's
            orphan_ok = True
        else:
            continue
        if orphan_ok:
            removable.append(path)
        else:
            young += 1
    return Leftovers(removable, young, problems)


def _expired_snapshots(set_dir: Path, now: float, keep_s: float, registered: RegisteredSnapshots, needed: set[str]) -> tuple[list[Path], list[str]]:
    """Snapshots prune may remove, and problems; adds the shards of the kept ones to `needed`."""
    snapshot_dir = set_dir / SNAPSHOTS_DIR
    pins, problems = {}, []
    for path in sorted(snapshot_dir.glob("*.json")) if snapshot_dir.is_dir() else []:
        try:
            pin = json.loads(path.read_text())
            pins[path] = ({s["file"] for s in pin["shards"]}, pin.get("complete", True), path.stat().st_mtime)
        except (OSError, ValueError, KeyError, TypeError) as error:
            problems.append(f"{path}: unreadable snapshot ({type(error).__name__}: {error}); the set's old shards are kept")
    complete = [p for p, (_, done, _) in pins.items() if done]
    newest = max(complete, key=lambda p: pins[p][2], default=None)  # what the set's latest finished run reads
    expired = [p for p, (_, _, mtime) in pins.items() if now - mtime > keep_s and p != newest]
    if expired:
        named = registered()
        if named is None:
            problems.append("the model registry could not be read: snapshots past their retention are kept")
            expired = []
        else:
            keys = {snapshot_key(p) for p in named}
            expired = [p for p in expired if snapshot_key(p) not in keys]
    for path, (files, _, _) in pins.items():
        if path not in expired:
            needed |= files
    return expired, problems


def summarize(set_dir: str | Path, grace_s: float = GRACE_S, keep_snapshots_s: float = KEEP_SNAPSHOTS_S, registered: RegisteredSnapshots = set) -> SetSummary:
    set_dir = Path(set_dir)
    manifest = read_manifest(set_dir)
    files = [p for p in set_dir.rglob("*") if p.is_file()]
    found = leftovers(set_dir, grace_s, keep_snapshots_s=keep_snapshots_s, registered=registered)
    scored = [set_dir / s["file"] for s in manifest["shards"] if shard_done(set_dir, s)]
    newest = max((p.stat().st_mtime for p in scored), default=(set_dir / MANIFEST_FILE).stat().st_mtime)
    return SetSummary(
        target_set=set_dir.name,
        model_revision=manifest["model_revision"],
        dtype=manifest.get("dtype", "float32"),
        rows=manifest["rows"],
        shards=len(manifest["shards"]),
        shards_scored=len(scored),
        size_bytes=sum(p.stat().st_size for p in files),
        leftover_files=len(found.removable),
        leftover_bytes=sum(p.stat().st_size for p in found.removable),
        last_written=time.strftime("%Y-%m-%d %H:%M", time.localtime(newest)),
        problems=found.problems,
    )


def prune_set(
    set_dir: str | Path, grace_s: float = GRACE_S, dry_run: bool = False, keep_snapshots_s: float = KEEP_SNAPSHOTS_S,
    registered: RegisteredSnapshots = set,
) -> PruneReport:
    """Remove the set's leftovers (see the module docstring); a dry run only reports them."""
    set_dir = Path(set_dir)
    found = leftovers(set_dir, grace_s, keep_snapshots_s=keep_snapshots_s, registered=registered)
    report = PruneReport(set_dir.name, kept_young=found.young, problems=found.problems)
    for path in found.removable:
        try:
            size = path.stat().st_size
            if not dry_run:
                path.unlink()
        except FileNotFoundError:
            continue  # removed by someone else meanwhile
        report.removed.append(path.name)
        report.freed_bytes += size
    return report


def as_dicts(items) -> list[dict]:
    return [asdict(item) for item in items]
