"""Claim files: which process is scoring which shard, so that workers started alike split a set between them.

A claim is a small JSON file (host, pid, a random token, start time) that appears atomically and only if
none exists: it is written to a temp file and hard-linked to its name (`link` fails when the name
exists, on local and NFS file systems alike, and readers never see it half written). While its holder
works, a thread touches it every `heartbeat_s`; a claim whose file is older than `timeout_s`, or whose
holder is a process of this host that no longer runs, is stale and the next claimant takes it over.
Claims only save duplicate work: shards are still written atomically, so a holder that lost its claim
(e.g. a process paused past the timeout) and its successor both write the same, complete file.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path

CLAIM_TIMEOUT_S = 600.0  # a claim not refreshed for this long is abandoned


class Claim:
    """A claim this process holds: refreshed by a daemon thread until `release` (or the `with` block ends)."""

    def __init__(self, path: Path, token: str, heartbeat_s: float):
        self.path, self.token = path, token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True, name=f"claim {path.name}")
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            if self.held():
                try:
                    os.utime(self.path)
                except FileNotFoundError:
                    pass

    def held(self) -> bool:
        """Whether the claim file is still ours (it may have been taken over after a long pause)."""
        return (read_claim(self.path) or {}).get("token") == self.token

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.held():
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def read_claim(path: Path) -> dict | None:
    """The claim's content plus its `age_s` (since the last heartbeat); None when there is no claim."""
    try:
        age = time.time() - path.stat().st_mtime
        return json.loads(path.read_text()) | {"age_s": age}
    except (FileNotFoundError, ValueError):
        return None


def is_stale(holder: dict, timeout_s: float = CLAIM_TIMEOUT_S) -> bool:
    """No heartbeat for `timeout_s`, or a holder on this host whose process is gone."""
    if holder["age_s"] > timeout_s:
        return True
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError):
            pass  # another user's live process, or a claim without a pid: trust the heartbeat
    return False


def describe(holder: dict) -> str:
    return f"{holder.get('host')}:{holder.get('pid')} (heartbeat {holder['age_s']:.0f}s ago)"


def try_claim(path: str | Path, timeout_s: float = CLAIM_TIMEOUT_S, heartbeat_s: float | None = None) -> Claim | None:
    """Claim `path` for this process; None when a live claim of another holder is there.

    A stale claim is moved aside (a rename, which only one claimant wins) and put back if what was moved
    is no longer the claim judged stale (someone else took it over meanwhile). Putting it back fails when
    a third claimant linked its own claim in that moment: the one whose claim was moved then holds a
    `Claim` whose file is not its own, so holders check `held()` before they start the work (the
    scoring workers do, once the model is loaded). Past that check a lost claim costs duplicate work,
    never a wrong file: shards are written atomically and alike.
    """
    path = Path(path)
    token = secrets.token_hex(8)
    body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": token, "started": time.time()})
    staging = path.parent / f".{path.name}.{token}.tmp"
    staging.write_text(body)
    try:
        for _ in range(3):
            try:
                os.link(staging, path)
                return Claim(path, token, heartbeat_s or max(timeout_s / 10, 0.05))
            except FileExistsError:
                pass
            holder = read_claim(path)
            if holder is None:
                continue  # released meanwhile: try again
            if not is_stale(holder, timeout_s):
                return None
            aside = path.parent / f".{path.name}.{token}.stale"
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue
            moved = read_claim(aside) or {}
            if moved.get("token") != holder.get("token"):  # not the stale claim: give it back
                try:
                    os.link(aside, path)
                except FileExistsError:
                    pass
                os.remove(aside)
                return None
            os.remove(aside)
        return None
    finally:
        os.remove(staging)
