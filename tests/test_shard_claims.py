"""Shard claims: one live holder per shard; abandoned claims (no heartbeat, or a dead local process) are taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from sdpo_platform.shard_claims import read_claim, try_claim


def foreign_claim(path, host="gpu-node-7", pid=12345, age_s=0.0):
    path.write_text(json.dumps({"host": host, "pid": pid, "token": "theirs", "started": time.time()}))
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))


def test_one_holder_at_a_time_and_release_frees_the_shard(tmp_path):
    path = tmp_path / "shard-a.claim"
    first = try_claim(path)
    assert first is not None and first.held() and try_claim(path) is None
    assert read_claim(path)["pid"] == os.getpid()
    first.release()
    assert not path.exists() and [p.name for p in tmp_path.iterdir()] == []  # no temp files left
    with try_claim(path) as second:
        assert second.held()
    assert not path.exists()


def test_a_live_foreign_claim_is_respected_and_a_stale_one_taken_over(tmp_path):
    path = tmp_path / "shard-a.claim"
    foreign_claim(path, age_s=60)
    assert try_claim(path, timeout_s=600) is None and read_claim(path)["token"] == "theirs"
    foreign_claim(path, age_s=601)  # no heartbeat for longer than the timeout
    claim = try_claim(path, timeout_s=600)
    assert claim is not None and read_claim(path)["token"] == claim.token
    claim.release()


def test_a_claim_of_a_dead_local_process_is_taken_over_at_once(tmp_path):
    path = tmp_path / "shard-a.claim"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    foreign_claim(path, host=socket.gethostname(), pid=gone.pid)
    claim = try_claim(path)
    assert claim is not None and read_claim(path)["pid"] == os.getpid()
    claim.release()


def test_the_heartbeat_keeps_a_long_claim_fresh(tmp_path):
    path = tmp_path / "shard-a.claim"
    with try_claim(path, timeout_s=600, heartbeat_s=0.05):
        os.utime(path, (time.time() - 3600, time.time() - 3600))
        time.sleep(0.3)
        assert read_claim(path)["age_s"] < 5 and try_claim(path, timeout_s=600) is None
