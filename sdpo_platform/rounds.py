"""What a training round would read, as one digest: a round with the digest of a finished one trains nothing new.

A round reads the kept triples of the unblocked days (`assessments.kept_interactions`), starts from the
round's model (the champion or the base: `registry.round_model`), must beat the champion, and follows the
settings and the code that compute its numbers. When none of these changed since a round that finished,
running again only repeats it: its candidate was promoted (then the champion changed, and so did the
digest) or it was not (then the same inputs train the same candidate, which loses again). The nightly
schedule skips such a round.

The digest is computed in the warehouse over the selection's inputs, not over the selection itself, so a
tick reads no text into Python however large the table; inputs that changed without changing the selection
cost one round more, never one less. Settings that cannot change a round's outcome (where it runs, how
its work is batched, where it is logged) are left out, so turning them costs nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import duckdb

from sdpo_platform.assessments import SCHEMA as ASSESSMENTS_SCHEMA
from sdpo_platform.config import PlatformConfig
from sdpo_platform.gating import blocked_partitions, unblocked

NO_EFFECT = {  # per section: knobs that change how a round runs, not what it trains
    "targets": {"batch_token_budget", "shard_size"},
    "training": {"device"},
    "registry": {"experiment", "serve_max_new_tokens"},
}


@dataclass(frozen=True)
class RoundInputs:
    digest: str
    interactions: int  # kept triples of unblocked days (before the targets' train/validation caps)
    days: int  # days they come from
    blocked: list[str]  # days left out because a check failed
    round_model: str  # `models:/name/N` or `base:spec` (`registry.round_label`)

    def describe(self) -> str:
        blocked = f", {len(self.blocked)} blocked day(s) left out" if self.blocked else ""
        return f"{self.interactions} kept interaction(s) from {self.days} day(s){blocked}, starting from {self.round_model}"


def round_start(cfg: PlatformConfig) -> dict:
    """What a round starts from and must beat, without building anything: the round model's label, the
    champion (the bar in both modes), and for a round from the base, its files' names, sizes and times
    (new weights under the same spec are a new start; the contents are not read)."""
    from sdpo_platform.models import resolve_model
    from sdpo_platform.registry import current_champion, round_champion, round_label

    starts_from = round_champion(cfg.registry.model_name, cfg.registry.next_round_from)
    champion = starts_from if cfg.registry.next_round_from == "champion" else current_champion(cfg.registry.model_name)
    start = {"round_model": round_label(cfg.registry.model_name, cfg.model, starts_from), "champion": champion}
    if starts_from is None:
        location = Path(resolve_model(cfg.model))
        files = sorted(p for p in location.iterdir() if p.is_file()) if location.is_dir() else []
        start["base_files"] = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files] or str(location)
    return start


def round_settings(cfg: PlatformConfig) -> dict:
    """The settings and code versions a round's numbers depend on."""
    from sdpo_platform import __version__
    from sdpo_platform.hindsight import PROMPT_ENCODING_VERSION
    from sdpo_platform.scoring import SCORING_VERSION

    sections = {name: getattr(cfg, name).model_dump(mode="json", exclude=NO_EFFECT.get(name, set()))
                for name in ("targets", "training", "registry")}
    return {"model": cfg.model, **sections, "principles_preamble": cfg.informativeness.principles_preamble,
            "code": {"platform": __version__, "scoring": SCORING_VERSION, "prompt_encoding": PROMPT_ENCODING_VERSION}}


def round_inputs(con: duckdb.DuckDBPyConnection, cfg: PlatformConfig) -> RoundInputs:
    """The digest of the rows, the start and the settings a round would use now (MLflow configured)."""
    con.execute(ASSESSMENTS_SCHEMA).fetchall()
    blocked = blocked_partitions(con)
    # a sum of per-row md5s, not an ordered string of them: no sort and no 1M-string aggregate (2.7 GB at 1M before)
    count, days, lower, upper = con.execute(
        f"""
        WITH kept AS (
            SELECT md5(concat_ws(chr(0), i.interaction_id, i.conversation_id, i.turn_index::VARCHAR, i.split,
                       coalesce(i.partition_date::VARCHAR, ''), to_json(i.context)::VARCHAR, i.response, i.followup,
                       coalesce(round(a.informativeness, 6)::VARCHAR, ''))) AS row_md5, i.partition_date
            FROM interactions i JOIN interaction_assessments a USING (interaction_id)
            WHERE a.keep AND {unblocked("i.partition_date")}
        )
        SELECT count(*), count(DISTINCT partition_date),
               coalesce(sum(md5_number_lower(row_md5)::HUGEINT), 0)::VARCHAR, coalesce(sum(md5_number_upper(row_md5)::HUGEINT), 0)::VARCHAR
        FROM kept
        """,
        {"blocked": blocked},
    ).fetchone()
    rows_digest = f"{count}:{lower}:{upper}"
    start = round_start(cfg)
    digest = hashlib.sha256(json.dumps({"rows": rows_digest, "start": start, "settings": round_settings(cfg)},
                                       sort_keys=True).encode("utf-8")).hexdigest()[:16]
    return RoundInputs(digest=digest, interactions=int(count), days=int(days), blocked=blocked,
                       round_model=start["round_model"])
