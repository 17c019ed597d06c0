"""Claims (``<out>/_claims/<run_id>``): exclusive, refreshed, released, and taken over when stale."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import asdict

import pytest

from mmbalance.claims import CLAIMS_DIR, Claim, ClaimBook, ClaimInfo, pid_namespace
from mmbalance.errors import ConfigError

RUN = "0123456789ab"


def _write_claim(out, **fields):
    """A claim file as another process would have written it."""
    now = time.time()
    info = {"run_id": RUN, "host": "elsewhere", "pid": 4242, "namespace": "pid:[1]", "token": "f00d",
            "started": now, "heartbeat": now, **fields}
    (out / CLAIMS_DIR).mkdir(parents=True, exist_ok=True)
    (out / CLAIMS_DIR / RUN).write_text(json.dumps(info))
    return ClaimInfo(**info)


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_claim_is_exclusive_and_holds_who_and_when(tmp_path):
    with ClaimBook(tmp_path) as first, ClaimBook(tmp_path) as second:
        claim = first.acquire(RUN)
        assert isinstance(claim, Claim) and claim.previous is None and claim.takeover_record() is None
        data = json.loads((tmp_path / CLAIMS_DIR / RUN).read_text())
        assert data["run_id"] == RUN and data["pid"] == os.getpid() and data["host"] == platform.node()
        assert data["namespace"] == pid_namespace() and data["token"] == claim.info.token
        assert data["started"] == data["heartbeat"] and abs(data["started"] - time.time()) < 60
        held = second.acquire(RUN)  # a live owner (this very process): skipped, not taken
        assert isinstance(held, ClaimInfo) and held.token == claim.info.token
        assert held.describe().startswith(f"{platform.node()}:{os.getpid()} (since ")
        first.release(claim)
        assert not (tmp_path / CLAIMS_DIR / RUN).exists()
        assert isinstance(second.acquire(RUN), Claim)


def test_heartbeat_is_refreshed_and_close_releases(tmp_path):
    book = ClaimBook(tmp_path, timeout=60, heartbeat_every=0.05)
    claim = book.acquire(RUN)
    path = tmp_path / CLAIMS_DIR / RUN
    first = json.loads(path.read_text())["heartbeat"]
    deadline = time.monotonic() + 20
    while json.loads(path.read_text())["heartbeat"] == first:
        assert time.monotonic() < deadline, "the heartbeat was never refreshed"
        time.sleep(0.02)
    assert json.loads(path.read_text())["token"] == claim.info.token
    book.close()
    assert not path.exists() and not list((tmp_path / CLAIMS_DIR).iterdir())  # no temporary file left


def test_a_claim_from_another_host_with_a_fresh_heartbeat_is_respected(tmp_path):
    other = _write_claim(tmp_path)
    with ClaimBook(tmp_path, timeout=30) as book:
        assert book.acquire(RUN) == other


def test_a_claim_whose_heartbeat_is_older_than_the_timeout_is_taken_over(tmp_path):
    other = _write_claim(tmp_path, heartbeat=time.time() - 31)
    with ClaimBook(tmp_path, timeout=30) as book:
        claim = book.acquire(RUN)
        assert isinstance(claim, Claim) and claim.previous == other
        record = claim.takeover_record()
        assert record["host"] == "elsewhere" and record["pid"] == 4242
        assert record["reason"].startswith("heartbeat 31 s ago, more than the claim timeout of 30 s")
        assert json.loads((tmp_path / CLAIMS_DIR / RUN).read_text())["token"] == claim.info.token


def test_a_claim_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    pid = _dead_pid()
    _write_claim(tmp_path, host=platform.node(), pid=pid, namespace=pid_namespace())
    with ClaimBook(tmp_path, timeout=3600) as book:
        claim = book.acquire(RUN)
        assert isinstance(claim, Claim), claim
        assert claim.takeover_record()["reason"] == f"its process {pid} on {platform.node()} is gone"
    # the same dead pid in another PID namespace (another container) is not known to be dead
    _write_claim(tmp_path, host=platform.node(), pid=pid, namespace="pid:[0]")
    with ClaimBook(tmp_path, timeout=3600) as book:
        assert isinstance(book.acquire(RUN), ClaimInfo)


def test_an_unreadable_claim_counts_from_its_modification_time(tmp_path):
    path = tmp_path / CLAIMS_DIR / RUN
    path.parent.mkdir()
    path.write_text("")  # its creator died between creating and writing it
    with ClaimBook(tmp_path, timeout=30) as book:
        held = book.acquire(RUN)
        assert isinstance(held, ClaimInfo) and held.describe().startswith("another process (since ")
        old = time.time() - 60
        os.utime(path, (old, old))
        claim = book.acquire(RUN)
        assert isinstance(claim, Claim) and claim.previous is None
        assert claim.reason.startswith("unreadable claim, last written 60 s ago")


def test_concurrent_takeovers_of_one_stale_claim_have_one_winner(tmp_path):
    _write_claim(tmp_path, heartbeat=time.time() - 100)
    books = [ClaimBook(tmp_path, timeout=30) for _ in range(8)]
    results: list[object] = [None] * len(books)
    barrier = threading.Barrier(len(books))

    def take(i):
        barrier.wait()
        results[i] = books[i].acquire(RUN)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(books))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if isinstance(r, Claim)]
    assert len(winners) == 1, results
    token = json.loads((tmp_path / CLAIMS_DIR / RUN).read_text())["token"]
    assert winners[0].info.token == token
    assert not (tmp_path / CLAIMS_DIR / f"{RUN}.takeover").exists()
    for book in books:
        book.close()


def test_an_owner_that_lost_its_claim_warns_and_leaves_the_new_owner_alone(tmp_path):
    book = ClaimBook(tmp_path, timeout=60, heartbeat_every=3600)
    claim = book.acquire(RUN)
    newer = _write_claim(tmp_path, token="beef")  # taken over while this process was paused
    with pytest.warns(RuntimeWarning, match=r"now belongs to elsewhere:4242 .* may be trained twice"):
        book.refresh(claim)
    assert claim.lost_to == newer
    book.release(claim)
    assert json.loads((tmp_path / CLAIMS_DIR / RUN).read_text())["token"] == "beef"  # not removed
    book.close()


@pytest.mark.parametrize("timeout", [0, -1, float("inf"), float("nan"), "600"])
def test_claim_timeout_must_be_positive_seconds(tmp_path, timeout):
    with pytest.raises(ConfigError, match=r"--claim-timeout must be a number of seconds > 0, got"):
        ClaimBook(tmp_path, timeout=timeout)


def test_claim_info_round_trips_through_its_file(tmp_path):
    with ClaimBook(tmp_path) as book:
        claim = book.acquire(RUN)
        assert ClaimInfo.from_json((tmp_path / CLAIMS_DIR / RUN).read_text()) == claim.info
        assert asdict(claim.info)["run_id"] == RUN


def test_a_takeover_decided_on_an_old_reading_leaves_the_new_owner_alone(tmp_path):
    """Between reading a stale claim and locking it, another process may have taken it over: the taker
    re-reads under the lock and gives up."""
    stale = _write_claim(tmp_path, heartbeat=time.time() - 100)
    with ClaimBook(tmp_path, timeout=30) as first, ClaimBook(tmp_path, timeout=30) as late:
        winner = first.acquire(RUN)
        assert isinstance(winner, Claim)
        path = tmp_path / CLAIMS_DIR / RUN
        assert late._take_over(path, stale, late._new_info(RUN), "decided before the winner") is None
        assert json.loads(path.read_text())["token"] == winner.info.token


def test_stale_claims_of_finished_runs_are_discarded_live_ones_kept(tmp_path):
    """An owner killed between writing a run's row and releasing its claim leaves the claim behind; the
    next matrix removes it (stale), but never a live owner's."""
    _write_claim(tmp_path, heartbeat=time.time() - 100)
    with ClaimBook(tmp_path, timeout=30) as book:
        assert book.discard_stale([RUN, "ffffffffffff"]) == [RUN]
        assert not (tmp_path / CLAIMS_DIR / RUN).exists()
        _write_claim(tmp_path)  # fresh heartbeat: its owner may be releasing it right now
        assert book.discard_stale([RUN]) == []
        assert (tmp_path / CLAIMS_DIR / RUN).exists()
    assert ClaimBook(tmp_path / "none").discard_stale([RUN]) == []
