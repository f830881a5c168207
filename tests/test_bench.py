"""Smoke tests of ``bench/``: each script runs in its ``--quick`` mode, prints its table and writes its JSON.

No timed assertions (figures on a shared machine are noise): the checks are that the runs complete and
that what they report is consistent (both sides of a comparison produced the same images, batching on
really formed batches and off did not, every mixed request succeeded). The scripts that start a Ray cluster
or build the GPU script's models at toy size are ``slow``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import _common as C  # noqa: E402


def _run(script: str, *args: str, tmp_path: Path, timeout: int = 900) -> tuple[str, dict]:
    out = tmp_path / f"{Path(script).stem}.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args, "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def _positive(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_stats_percentiles():
    s = C.stats_s([float(x) for x in range(20, 0, -1)])
    assert s["n"] == 20 and s["p50_s"] == 10.5 and s["p95_s"] == 19.0 and s["min_s"] == 1.0
    assert C.stats_s([3.0])["p95_s"] == 3.0
    with pytest.raises(ValueError):
        C.stats_s([])


def test_bench_preset_survives_yaml_round_trip():
    """Serve replicas get the preset through YAML; every decoder stage must still build from it."""
    from polymodal.config import PresetConfig
    from polymodal.pipeline import build_decoder_stage

    preset = C.bench_preset(num_inference_steps=5, size_px=32)
    back = PresetConfig.from_yaml(preset.to_yaml())
    assert back.name == "bench"
    assert {m: d.defaults.num_inference_steps for m, d in back.decoders.items()} == {m: 5 for m in preset.decoders}
    stage = build_decoder_stage(back, C.Modality.IMAGE)
    assert stage.defaults.num_inference_steps == 5


def test_table_prints_every_row(capsys):
    C.print_table("T", ["a", "b"], [["x", 1.23456], ["y", float("nan")]])
    out = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert out[0] == ["T"] and out[1] == ["a", "b"] and out[3] == ["x", "1.235"] and out[4] == ["y", "nan"]


def test_gpu_without_cuda_skips(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA exists here: the skip path is not taken")
    stdout, data = _run("gpu.py", tmp_path=tmp_path, timeout=300)
    assert "skipped: no CUDA" in stdout and data["skipped"] == "no CUDA"


def test_constrained_mask_quick(tmp_path):
    stdout, data = _run("constrained_mask.py", "--quick", "--tokenizer", "tiny", tmp_path=tmp_path, timeout=300)
    assert "mask cost per step" in stdout and "slowdown (x)" in stdout
    assert set(data["per_step"]) == {"json_schema", "tool_calls required", "tool_calls auto (text)"}
    for r in data["per_step"].values():
        assert r["tokens"] > 0 and _positive(r["mask_us"]["p50_s"]) and _positive(r["compute_us"]["p50_s"])
    assert _positive(data["decode"]["no_mask_tokens_per_s"]) and _positive(data["decode"]["mask_tokens_per_s"])


def test_structured_quick(tmp_path):
    """Tiny (random): without the grammar nothing is valid; with it, every call validates and every JSON answer
    that ended by itself validates (a ``length`` ending is counted as a failure, never as valid)."""
    stdout, data = _run("structured.py", "--quick", tmp_path=tmp_path, timeout=600)
    assert "with vs without the grammar" in stdout and "slowdown x" in stdout
    r = data["presets"]["tiny"]
    js, tools = r["json"], r["tools"]
    assert js["constrained"]["valid"] == js["constrained"]["finish_reasons"].get("stop", 0) >= 3
    assert tools["constrained"]["valid_share"] == 1.0 and tools["constrained"]["finish_reasons"] == {"tool_calls": 3}
    assert js["unconstrained"]["valid"] == 0 and tools["unconstrained"]["valid"] == 0
    for side in (js["constrained"], tools["constrained"], js["unconstrained"]):
        assert _positive(side["tokens_per_s"]) and 0 <= side["field_accuracy"] <= 1
    assert _positive(js["slowdown_x"]) and _positive(tools["slowdown_x"])


def test_reference_baseline_quick(tmp_path):
    stdout, data = _run("reference_baseline.py", "--quick", "--steps", "2", "--concurrent", "4",
                        tmp_path=tmp_path, timeout=600)
    assert "NExT-GPT-style serving" in stdout and "ratio ours/reference throughput" in stdout
    assert set(data["latency"]) == {"reference", "ours"}
    assert all(_positive(v) for v in data["ratios"].values())
    assert data["identical_images"] == "3/3"  # per-request rebuilt decoder == kept decoder, same seeds
    assert sum(b["media"] for b in data["batched_rounds"]) == 4


def test_skills_quick(tmp_path):
    # the deployment's throughput (its own Ray cluster) is not run here: tests/test_serve_ray.py covers the graph
    stdout, data = _run("skills_latency.py", "--quick", "--no-generate", "--no-serve", tmp_path=tmp_path, timeout=600)
    assert "skill latency in process" in stdout and "deployment" not in data
    assert set(data["skills"]) == {"detect (face)", "detect (cat_face)", "segment", "ocr", "detect_objects (tiny)"}
    for key, s in data["skills"].items():
        assert s["ok"] == s["n"] == 3 and not s["errors"], (key, s)
        assert _positive(s["p50_s"]) and s["p95_s"] >= s["p50_s"], (key, s)
    assert data["skills"]["ocr"]["note"] == "line read back 3/3"


def test_skilluse_quick(tmp_path):
    # the tiny random model through a --no-ray service with the toy skills: the plumbing of the three modes
    stdout, data = _run("skilluse.py", "--serve", "tiny", "--quick", "--max-tokens", "8", tmp_path=tmp_path,
                        timeout=900)
    assert "skill use through the service" in stdout and data["n"] == 4
    for fam in ("locate", "count"):
        fr = data["families"][fam]
        assert set(fr["modes"]) == {"skills", "disabled", "swapped"} and 0 < fr["chance"] < 1
        for mode in fr["modes"].values():
            assert mode["n"] == 4 and mode["errors"] == 0 and len(mode["items"]) == 4
            assert all(0 <= mode[k] <= 1 for k in ("right_skill", "right_args", "answer_ok"))
    assert set(data["verdicts"]) >= {"locate right_skill >= 0.95", "count swapped <= chance+3sd"}
    assert ("PASS" in stdout or "FAIL" in stdout)


def test_speech_word_error_rate():
    from speech import sentences, word_errors

    assert word_errors("The cat sat.", "the cat sat") == (0, 3)
    assert word_errors("the cat sat on the mat", "the bat sat the mat too") == (3, 6)  # sub, del, ins
    assert word_errors("It's half-past two", "it's half past two") == (0, 4)
    assert word_errors("a b", "") == (2, 2)
    texts = sentences()
    assert len(texts) == 100 and len(set(texts)) == 100 and all(t[-1] in ".?!" for t in texts)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_speech_quick(tmp_path):
    """Intelligibility of two voices on 5 sentences, and 1 / 4 streams against a --no-ray server."""
    stdout, data = _run("speech.py", "--quick", tmp_path=tmp_path)
    assert "(a) intelligibility" in stdout and "(c) /v1/audio/speech streams" in stdout
    a = data["intelligibility"]
    assert set(a) == {"echo", "echo (1 pass)", "espeak-ng:en-us"}
    assert all(r["sentences"] == 5 and r["words"] > 0 and 0 <= r["wer"] for r in a.values())
    assert a["echo"]["wer"] <= 0.2  # flite's default voice is intelligible to pocketsphinx
    for level, r in data["streaming"].items():
        assert r["joined_equal_whole"] == f"{r['requests']}/{r['requests']}", (level, r)
        assert r["first_chunk"]["p50_s"] <= r["last_chunk"]["p50_s"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_script_at_toy_size_on_cpu(tmp_path):
    """The GPU path end to end at toy sizes on the CPU: the decoder stage vs plain diffusers, the 7B-shaped LLM
    (toy-sized), one forced image request in process, and the same SD v1.5-shaped decoder served by the Ray Serve
    graph (loaded from the diffusers layout) beside the plain call, then a chat request over HTTP."""
    stdout, data = _run("gpu.py", "--cpu-smoke", tmp_path=tmp_path, timeout=840)
    assert "images/s" in stdout and "Through the Ray Serve deployment" in stdout
    assert [r["batch_size"] for r in data["decoder"]] == [1, 8]
    assert all(_positive(r["ours"]["images_per_s"]) and _positive(r["plain"]["images_per_s"]) for r in data["decoder"])
    run = data["end_to_end"]["runs"][0]
    assert run["images"] == 1 and run["finish_reason"] == "stop" and run["hidden_states_finite"]
    assert 1 <= data["llm"]["completion_tokens"] <= 8 and _positive(data["llm"]["tokens_per_s"])
    dep = data["deployment"]
    assert [r["batch_size"] for r in dep["decoder"]] == [1, 8]
    assert all(_positive(r["ratio_deployment_over_plain"]) for r in dep["decoder"])
    assert dep["decoder"][1]["mean_batch_size"] > 1  # eight clients: the deployment formed batches
    assert dep["http"]["status"] == 200 and dep["http"]["images"] == 1
    assert "e2e_request_latency" in dep["http"]["streaming_means_s"]
    fast = {r["name"]: r for r in data["fast_paths"]}  # on a CPU every row but the compile ones (a minute each)
    assert set(fast) == {"baseline", "eager-attention", "channels_last", "other-dtype"}
    assert all(r["ok_items"] == r["items"] == 1 and _positive(r["speedup_over_baseline"]) for r in fast.values())
    assert fast["eager-attention"]["fast_path"]["attention"] == "eager" and fast["channels_last"]["fast_path"][
        "channels_last"]
    assert _positive(data["llm"]["eager_tokens_per_s"]) and data["llm"]["attn_implementation"] == "sdpa"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_overhead_quick(tmp_path):
    stdout, data = _run("overhead.py", "--quick", "--calibrate-s", "0.05", "--streamed", "2", tmp_path=tmp_path)
    assert "HTTP -> Ray Serve graph" in stdout and "polymodal_time_to_first_token_seconds" in stdout
    assert "calibrated:" in stdout and 1 <= data["steps"] < 24 and data["calibrate_s"] == 0.05
    assert data["latency"]["in_process"]["n"] == data["latency"]["http_ray_serve"]["n"] == 4
    assert data["identical_outputs"] == "5/5"  # the same request gives the same image on both paths
    assert _positive(data["ratio_http_over_in_process"]["p50"])
    s = data["streaming_means_s"]
    assert 0 < s["time_to_first_token"][""] < s["e2e_request_latency"][""]
    assert 0 < s["time_to_first_medium"]["modality=image"] <= 1.5 * s["e2e_request_latency"][""]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_batching_quick(tmp_path):
    stdout, data = _run("batching.py", "--quick", "--steps", "2", "--concurrency", "1,8", "--max-batch-size", "8",
                        "--batch-wait-s", "0.2", "--llm-max-concurrency", "1", tmp_path=tmp_path)
    assert "graph gain on/off" in stdout and "serving efficiency" in stdout and "tokens/s" in stdout
    rows = {r["concurrency"]: r for r in data["decoder"]}
    assert all(r["off"]["max_batch_size_seen"] == 1 for r in rows.values())
    assert rows[8]["on-adaptive"]["max_batch_size_seen"] > 1 and rows[8]["on-timeout"]["max_batch_size_seen"] > 1
    assert rows[1]["on-adaptive"]["max_batch_size_seen"] == 1  # a lone request is never held for company
    ceiling = rows[8]["in_process"]
    assert ceiling["batch"] == 8 and _positive(ceiling["model_gain"])
    assert all(_positive(rows[8][f"serving_efficiency_{p}"]) for p in ("adaptive", "timeout"))
    llm = data["llm"]["rows"][0]
    assert llm["max_concurrency"] == 1 and _positive(llm["c1"]["tokens_per_s"]) and llm["c4"]["tokens"] > 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_memory_quick(tmp_path):
    stdout, data = _run("memory.py", "--quick", "--settle-s", "0.5", tmp_path=tmp_path)
    assert "USS" in stdout and "PSS" in stdout
    assert data["status_codes"] == {"200": 50}
    roles = {p["role"] for p in data["processes"]}
    assert {"ray::ServeReplica:polymodal:llm", "ray::ServeReplica:polymodal:decoder-image"} <= roles, roles
    assert "ray::ServeController" in roles
    t = data["totals"]
    uss = [t[k]["uss"]["before_mib"] for k in ("replicas", "serve_processes", "all_processes")]
    assert 0 < uss[0] < uss[1] < uss[2]


def test_checker_quick(tmp_path):
    """bench/checker.py: both outline rules per image set and true shape; clean renders read perfectly by both, the
    toy VAE's round trips of squares at least as well by the outline rule; a folder without a VAE exits 2."""
    stdout, data = _run("checker.py", "--quick", tmp_path=tmp_path)
    figures = data["figures"]
    assert data["n"] == 60 and "VAE round trip" in stdout and figures["as drawn"]["n"]["square"] == 20
    rules = ("outline (now)", "far pixels (before)")
    assert all(v == 1.0 for rule in rules for v in figures["as drawn"][rule].values())
    vae = figures["VAE round trip"]
    assert vae["outline (now)"]["square"] >= vae["far pixels (before)"]["square"]
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "checker.py"), "--vae", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no diffusers AutoencoderKL folder" in bad.stderr


def test_artifact_store_quick(tmp_path):
    """bench/artifact_store.py: per-call latency at each store size, in the JSON; bad sizes exit 2."""
    stdout, data = _run("artifact_store.py", "--quick", "--sizes", "0,50", tmp_path=tmp_path)
    assert "Artifact store" in stdout and [s["stored"] for s in data["sizes"]] == [0, 50]
    assert all(_positive(s["latency"][k]["p50_s"]) for s in data["sizes"] for k in ("reserve", "fulfil", "lookup"))
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "artifact_store.py"), "--sizes", "a,1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "comma-separated integers" in bad.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_editing_quality_smoke(tmp_path):
    """bench/editing.py --quality through a --no-ray toy host with the official openai client: both edit kinds
    scored with their controls at each image guidance scale (the toy's image decoder is an InstructPix2Pix one; a
    smoke test: n = 3; last stop's callback break went unseen)."""
    stdout, data = _run("editing.py", "--quality", "--n", "3", "--image-guidance-scale", "1.5,2.5", tmp_path=tmp_path)
    assert "edits through the service" in stdout and data["n"] == 3 and data["preset"] == "toy"
    assert [r["image_guidance_scale"] for r in data["runs"]] == [1.5, 2.5]
    assert "image guidance 2.5" in stdout
    for run in data["runs"]:
        assert set(run["kinds"]) == {"recolour", "reshape"}
        for v in run["kinds"].values():
            assert all(0.0 <= v[k] <= 1.0 for k in ("asked", "other", "place", "all", "control_other", "follow"))
    stdout, data = _run("editing.py", "--quality", "--n", "3", "--path", "chat", tmp_path=tmp_path)
    assert "edits through the service (chat)" in stdout and data["path"] == "chat"
    assert set(data["runs"][0]["kinds"]) == {"recolour", "reshape"}
