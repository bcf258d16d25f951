"""What a training round would read, as one digest: a round with the digest of a finished one trains nothing new.

A round reads the kept triples of the unblocked days (`assessments.kept_interactions`), starts from the
round's model (the champion or the base: `registry.round_model`) and follows the settings. When none of
these changed since a round that finished, running again only repeats it: the candidate it trained was
promoted (then the champion changed, and so did the digest) or it was not (then the same data, model and
settings train the same candidate, which loses again). The nightly schedule skips such a round.

The digest is computed in the warehouse over the selection's inputs, not over the selection itself, so a
tick reads no text into Python however large the table; inputs that changed without changing the selection
cost one round more, never one less.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import duckdb

from sdpo_platform.assessments import SCHEMA as ASSESSMENTS_SCHEMA
from sdpo_platform.config import PlatformConfig
from sdpo_platform.gating import blocked_partitions

# the sections a round's outcome depends on; ingest, cleaning and interactions act through the rows themselves
ROUND_SETTINGS = ("model", "targets", "training", "registry", "informativeness")


@dataclass(frozen=True)
class RoundInputs:
    digest: str
    interactions: int  # kept triples of unblocked days (before the targets' train/validation caps)
    days: int  # days they come from
    blocked: list[str]  # days left out because a check failed
    round_model: str  # the label of `registry.round_model`: `models:/name/N` or `base:spec`

    def describe(self) -> str:
        blocked = f", {len(self.blocked)} blocked day(s) left out" if self.blocked else ""
        return f"{self.interactions} kept interaction(s) from {self.days} day(s){blocked}, starting from {self.round_model}"


def round_inputs(con: duckdb.DuckDBPyConnection, cfg: PlatformConfig, round_model: str) -> RoundInputs:
    """The digest of the rows, the starting model and the settings a round would use now."""
    con.execute(ASSESSMENTS_SCHEMA).fetchall()
    blocked = blocked_partitions(con)
    count, days, rows_digest = con.execute(
        """
        SELECT count(*), count(DISTINCT i.partition_date),
               md5(coalesce(string_agg(md5(concat_ws(chr(0), i.interaction_id, i.conversation_id, i.turn_index::VARCHAR,
                   i.split, coalesce(i.partition_date::VARCHAR, ''), to_json(i.context)::VARCHAR, i.response, i.followup,
                   coalesce(a.informativeness::VARCHAR, ''))), '' ORDER BY i.interaction_id), ''))
        FROM interactions i JOIN interaction_assessments a USING (interaction_id)
        WHERE a.keep AND NOT list_contains($blocked::DATE[], i.partition_date)
        """,
        {"blocked": blocked},
    ).fetchone()
    settings = cfg.model_dump(mode="json", include=set(ROUND_SETTINGS))
    digest = hashlib.sha256(json.dumps({"rows": rows_digest, "model": round_model, "settings": settings},
                                       sort_keys=True).encode("utf-8")).hexdigest()[:16]
    return RoundInputs(digest=digest, interactions=int(count), days=int(days), blocked=blocked, round_model=round_model)
