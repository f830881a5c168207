"""The artifact store's sweep: expired records go, live ones stay, and a request never pays for the store's size
(``FileStore.reserve`` starts a background sweep at most every ``sweep_every_s``; issue #30's profile found a
sweep per request reading every record on the ingress's event loop)."""

from __future__ import annotations

import dataclasses
import os
import threading
import time

from services.store import FileStore


def _expire(store: FileStore, art, ago_s: int = 10):
    """Rewrite ``art``'s record as expired ``ago_s`` seconds ago (as time passing would)."""
    gone = dataclasses.replace(art, expires_at=int(time.time()) - ago_s)
    store._write_meta(gone)
    return gone


def test_sweep_removes_only_expired_records(tmp_path):
    store = FileStore(tmp_path, ttl_s=60, sweep_every_s=3600)
    live = store.put(b"live", "image/png", "png")
    dead = store.put(b"dead", "image/png", "png")
    with store._sweeping:  # the first put's background sweep has finished (it could otherwise take `dead` first)
        pass
    _expire(store, dead)
    # a record written before expiries were file times: its mtime is in the past but it has not expired
    legacy = store.put(b"old", "image/png", "png")
    meta = tmp_path / "artifacts" / f"{legacy.id}.json"
    os.utime(meta, (time.time() - 100, time.time() - 100))

    assert store.sweep() == 1
    assert store.get(dead.id) is None and not (tmp_path / "artifacts" / f"{dead.id}.bin").exists()
    assert store.get(live.id)[1] == b"live" and store.get(legacy.id)[1] == b"old"
    # the record's file time is its expiry
    assert int((tmp_path / "artifacts" / f"{live.id}.json").stat().st_mtime) == store.lookup(live.id).expires_at


def test_reserve_sweeps_in_the_background_at_most_once_per_interval(tmp_path, monkeypatch):
    store = FileStore(tmp_path, ttl_s=60, sweep_every_s=3600)
    dead = [_expire(store, store.put(b"x", "image/png", "png")) for _ in range(3)]
    calls, threads = [], []
    real = store.sweep

    def counted(limit=None):
        calls.append(threading.current_thread().name)
        return real(limit)

    for t in [t for t in threading.enumerate() if t.name == "artifact-sweep"]:
        t.join(10)  # the sweep the puts above started
    monkeypatch.setattr(store, "sweep", counted)
    store._last_sweep = -float("inf")
    for _ in range(20):
        store.reserve("image/png", "png")
        threads += [t for t in threading.enumerate() if t.name == "artifact-sweep"]
    for t in threads:
        t.join(10)
    assert calls == ["artifact-sweep"], calls  # one sweep for 20 requests, never on the caller's thread
    assert all(store.lookup(a.id) is None for a in dead)
    assert not any((tmp_path / "artifacts" / f"{a.id}.json").exists() for a in dead)

    store.sweep_every_s = 0.0  # the interval passed: the next request starts another one
    assert store.sweep_soon()
    for t in [t for t in threading.enumerate() if t.name == "artifact-sweep"]:
        t.join(10)
    assert len(calls) == 2
