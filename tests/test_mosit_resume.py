"""SIGKILL a MosIT build midway, resume it, and get exactly the output of an uninterrupted build.

Runs the real CLI (``python -m mosit build``) in subprocesses with the scripted LLM (slowed per call so
the kill lands midway), and real retrieval (all-MiniLM-L6-v2).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _cmd(cfg: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mosit", "build", "--config", str(cfg), "--out", str(out), "--no-progress", *extra]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] != "work"}


def test_sigkill_midway_then_resume_equals_uninterrupted(tmp_path):
    from mosit.example import build_catalog_from_recipe

    catalog = build_catalog_from_recipe(ROOT / "examples" / "mosit" / "catalog_recipe.yaml", tmp_path / "catalog")
    num, shard = 16, 2
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "resume", "seed": 7, "num_dialogues": num, "shard_size": shard, "min_turns": 1, "max_turns": 3,
        "topics": ["a ginger cat", "a rocket on the launch pad", "a cup of espresso", "the surface of the moon"],
        "modes": {"T_I": {}, "T_A": {}, "T_V": {}, "I_T": {}, "A_I": {}},
        "catalog": {"path": str(catalog)},
        "llm": {"kind": "scripted", "options": {"delay_s": 0.04}},
        "retrieval": {"threshold": 0.3},
        "caption_encoder": {"kind": "none"},
    }))
    a, b = tmp_path / "a", tmp_path / "b"
    shards = a / "work" / "shards"
    ref = subprocess.Popen(_cmd(cfg, b), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    victim = subprocess.Popen(_cmd(cfg, a), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and victim.poll() is None:
        if shards.is_dir() and len(list(shards.glob("shard-*.jsonl"))) >= 2:
            break
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    done = sorted(p.name for p in shards.glob("shard-*.jsonl"))
    assert 2 <= len(done) < num // shard, done  # killed midway
    assert not (a / "mosit.json").exists()

    ref_out = ref.communicate(timeout=300)[0].decode()
    assert ref.returncode == 0, ref_out
    # without --resume the half-built folder is refused
    r = subprocess.run(_cmd(cfg, a), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--resume" in r.stderr
    r = subprocess.run(_cmd(cfg, a, "--resume"), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    ta, tb = _tree(a), _tree(b)
    assert sorted(ta) == sorted(tb)
    assert [k for k in ta if ta[k] != tb[k]] == []
    records = json.loads(ta["mosit.json"])
    summary = json.loads(ta["summary.json"])
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == summary["dialogues"]["accepted"] > 0
    rejected = [json.loads(l) for l in ta["rejects.jsonl"].decode().splitlines()]
    assert sorted(ids + [r["id"] for r in rejected if r["kind"] == "dialogue"]) == [f"mosit-{i:06d}" for i in range(num)]
    assert not list(a.rglob("*.tmp-*"))
