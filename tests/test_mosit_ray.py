"""``--ray``: the same shard function on Ray Data actors gives the same dataset as a local run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_ray_run_equals_local_run(tmp_path):
    pytest.importorskip("ray.data")
    import shutil
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="mosit-ray-", dir="/tmp")  # AF_UNIX socket paths must stay short
    from mosit.config import parse_config
    from mosit.example import build_catalog_from_recipe
    from mosit.job import build

    catalog = build_catalog_from_recipe(ROOT / "examples" / "mosit" / "catalog_recipe.yaml", tmp_path / "catalog")
    data = {
        "name": "ray", "seed": 2, "num_dialogues": 6, "shard_size": 2, "min_turns": 1, "max_turns": 2,
        "topics": ["a ginger cat", "a rocket on the launch pad", "a cup of espresso"],
        "modes": {"T_I": {}, "I_T": {}, "T_V": {}},
        "catalog": {"path": str(catalog)}, "llm": {"kind": "scripted"}, "retrieval": {"threshold": 0.3},
        "caption_encoder": {"kind": "none"},
        "ray": {"num_workers": 1, "num_cpus_per_worker": 1, "temp_dir": ray_tmp},
    }
    cfg = parse_config(data, tmp_path)
    try:
        s_ray = build(cfg, tmp_path / "ray_out", use_ray=True, progress=False)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    s_local = build(cfg, tmp_path / "local_out", progress=False)
    assert len(list((tmp_path / "ray_out" / "work" / "shards").glob("shard-*.jsonl"))) == 3
    for name in ("mosit.json", "rejects.jsonl", "summary.json"):
        assert (tmp_path / "ray_out" / name).read_bytes() == (tmp_path / "local_out" / name).read_bytes(), name
    assert s_ray == s_local and s_ray["dialogues"]["total"] == 6
    assert json.loads((tmp_path / "ray_out" / "mosit.json").read_text())
