"""Reliability: what a request asks is what it gets, overload is refused up front, nothing is lost.

Run from the repository root (needs the ``reliability`` extra: ``pip install -e '.[reliability]'``)::

    .venv/bin/python bench/reliability.py [--quick] [--only fuzz,concurrent,kill,restart,plain] [--out r.json]

Sections (each prints its figures; a summary table closes the run):

- **fuzz**: schemathesis (pinned in the ``reliability`` extra) over ``/openapi.json`` of the ``--no-ray`` host
  (``polymodal serve --no-ray``, ``tiny`` preset, in a subprocess, with tightened server limits so that valid
  requests stay fast: 32 new tokens, 8 steps, 64 px, 8 frames, 2 s of audio). Every operation, positive and
  negative cases (``--cases`` each, hypothesis seed ``--seed``). Counted: cases, status classes, and any 5xx that
  is not a documented 503 (``overloaded`` / ``stage_unavailable`` with ``Retry-After``), with examples.
- **concurrent**: the default graph (``services.app:app_builder`` with ``AppArgs(preset="toy")``: ingress, LLM,
  image / audio / video decoders, one replica each, as ``polymodal serve`` deploys it) on our own 2-CPU Ray
  cluster; after ``--warmup`` sequential requests (a running service has measured itself), ``--n`` text+image
  chats (``modalities: ["text", "image"]``) at once. Counted: answered (200 with an image), refused (503 +
  Retry-After), 504 after admission, other errors, lost (no HTTP answer), duplicate ids, p50 / p95 latency of the
  answered, wall time.
- **kill**: the same graph with two image-decoder replicas; ``--n`` text+image chats at once and the first image
  replica seen with a request in flight (Serve's ``get_num_ongoing_requests`` of the replica actor) is killed
  (``ray.kill``). Counted as above, plus the requests that failed because of the kill (any 500 / 503
  ``stage_unavailable``: should be 0) and the renders sent again (``polymodal_decoder_retried_total``).
- **restart**: the ``--no-ray`` host (``tiny``) with a store folder; a chat answered with ``media_format: url``
  and a finished video job; the service stopped (SIGTERM) and started again on the same store: the artifact and
  the job (status and MP4) are still served.
- **plain**: ``--plain`` held-out plain questions (:func:`training.toyworld.phrasings.plain_questions`:
  arithmetic, capitals, definitions, facts; none names a toy attribute) to the ``toy`` LLM stage in-process,
  without ``modalities`` (the preset's policy: the model decides): the share answered without a medium.

The heavy sections (fuzz at full size, concurrent, kill) take minutes on 2 cores; run them when the machine is
quiet (``uptime``). ``--quick``: 600 fuzz cases, 40 concurrent, 20 plain questions.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

SECTIONS = ("fuzz", "concurrent", "kill", "restart", "plain")
DOCUMENTED_503 = ("overloaded", "stage_unavailable")
FUZZ_LIMITS = {"max_new_tokens": 32, "max_inference_steps": 8, "max_height_px": 64, "max_width_px": 64,
               "max_num_frames": 8, "max_duration_s": 2.0, "max_n": 2, "max_media_inputs": 2,
               "max_body_bytes": 1024 * 1024, "max_media_bytes": 512 * 1024}


# ---- a --no-ray host in a subprocess -------------------------------------------------------------------


class LocalHost:
    """``services.run.serve_main(no_ray=True)`` in a subprocess (its own process group), stopped with SIGTERM."""

    def __init__(self, preset: str, app_args: dict, store_dir: str | None = None, log: Path | None = None):
        self.port = C.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log or Path(tempfile.mkstemp(prefix="pm-rel-", suffix=".log")[1])
        args_file = self.args_file = Path(tempfile.mkstemp(prefix="pm-rel-args-", suffix=".json")[1])
        args_file.write_text(json.dumps(app_args))
        code = ("import json, sys; from services.run import serve_main; "
                f"sys.exit(serve_main({preset!r}, host='127.0.0.1', port={self.port}, no_ray=True, "
                f"store_dir={store_dir!r}, app_args=json.load(open({str(args_file)!r}))))")
        with open(self.log, "w") as fh:
            self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=C.ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait(self, timeout_s: float = 300) -> LocalHost:
        deadline = time.monotonic() + timeout_s
        while "serving preset" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the --no-ray host did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)
        return self

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self.args_file.unlink(missing_ok=True)
        if self.proc.returncode == 0:
            self.log.unlink(missing_ok=True)
        return self.proc.returncode


# ---- fuzz --------------------------------------------------------------------------------------------


def fuzz_schema(schema, call, cases: int, seed: int, label: str = "", model: str | None = None) -> dict[str, Any]:
    """Every operation of a schemathesis ``schema``, ``cases`` positive and ``cases`` negative examples each
    (hypothesis seed ``seed``); ``call(case) -> response`` sends one. Returns counts and unexpected 5xx examples.

    ``model``: positive cases name the served model (a random ``model`` string is always a 400, so no generated
    chat would reach the model otherwise); negative cases keep what was generated.
    A 5xx is expected only as a documented 503 (``code`` overloaded / stage_unavailable, with ``Retry-After``).
    """
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as hseed
    from hypothesis.errors import Unsatisfiable

    from schemathesis import GenerationMode

    statuses: Counter = Counter()
    per_op: dict[str, Counter] = {}
    bad: list[dict] = []
    skipped: list[str] = []
    total = 0
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            counts = per_op.setdefault(f"{op.label} [{mode.value}]", Counter())

            @hseed(seed)
            @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet)
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                nonlocal total
                if model and mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
                    case.body["model"] = model
                resp = call(case)
                total += 1
                code = resp.status_code
                statuses[f"{code // 100}xx"] += 1
                counts[code] += 1
                if code >= 500:
                    try:
                        err = json.loads(resp.content)["error"]
                    except Exception:  # noqa: BLE001 - an unexpected body is itself a finding
                        err = {"code": None, "message": resp.content[:200].decode(errors="replace")}
                    if not (code == 503 and err.get("code") in DOCUMENTED_503 and "retry-after" in
                            {k.lower() for k in resp.headers}):
                        bad.append({"operation": op.label, "mode": mode.value, "status": code,
                                    "error": err, "body": str(getattr(case, "body", None))[:300]})

            try:
                run()
            except Unsatisfiable:  # e.g. negative cases of an operation with nothing to get wrong
                skipped.append(f"{op.label} [{mode.value}]")
        print(f"  fuzz{label}: {op.label}: {sum(sum(c.values()) for k, c in per_op.items() if k.startswith(op.label))} "
              f"cases", flush=True)
    return {"cases": total, "seed": seed, "statuses": dict(statuses), "unexpected_5xx": len(bad),
            "unexpected_examples": bad[:10], "no_cases": skipped,
            "per_operation": {k: {str(s): n for s, n in sorted(c.items())} for k, c in per_op.items()}}


def fuzz_app_args() -> dict:
    return {"server": {"request_timeout_s": 60, "max_video_jobs": 1, "max_video_queue": 4,
                       "limits": FUZZ_LIMITS}}


def section_fuzz(cases: int, seed: int) -> dict[str, Any]:
    import schemathesis

    host = LocalHost("tiny", fuzz_app_args()).wait()
    try:
        schema = schemathesis.openapi.from_url(host.url + "/openapi.json")
        import requests

        session = requests.Session()
        t = time.perf_counter()
        out = fuzz_schema(schema, lambda case: case.call(base_url=host.url, session=session, timeout=120),
                          cases, seed, model="tiny")
        out["wall_s"] = time.perf_counter() - t
    finally:
        host.stop()
    out["host"] = "polymodal serve --no-ray --preset tiny (tightened limits)"
    out["limits"] = FUZZ_LIMITS
    print(f"fuzz: {out['cases']} cases in {out['wall_s']:.0f} s, statuses {out['statuses']}, "
          f"unexpected 5xx {out['unexpected_5xx']}", flush=True)
    for b in out["unexpected_examples"][:3]:
        print(f"  unexpected: {b}", flush=True)
    return out


# ---- concurrent / kill on Ray ----------------------------------------------------------------------------


REQUEST: dict[str, Any] = {"model": "toy", "image": None}  # set by main: --preset, --image-steps


def chat_request(i: int) -> dict:
    colours, shapes = ("red", "green", "blue", "yellow"), ("circle", "square", "triangle")
    body = {"model": REQUEST["model"], "seed": i, "modalities": ["text", "image"], "messages": [
        {"role": "user", "content": f"Could you draw a {colours[i % 4]} {shapes[(i // 4) % 3]} for me?"}]}
    if REQUEST["image"]:
        body["image"] = dict(REQUEST["image"])
    return body


def has_image(body: dict) -> bool:
    msg = body["choices"][0]["message"]
    text = json.dumps(msg)
    return '"image_url"' in text or "data:image/png" in text or bool(msg.get("images"))


async def burst(url: str, n: int, on_started=None) -> list[dict]:
    """``n`` text+image chats at once -> one row per request (status, id, latency, error code)."""
    import httpx

    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
    async with httpx.AsyncClient(timeout=900, limits=limits) as c:
        async def one(i: int) -> dict:
            t = time.perf_counter()
            try:
                r = await c.post(url + "/v1/chat/completions", json=chat_request(i))
            except Exception as e:  # noqa: BLE001 - a lost request
                return {"status": None, "error": f"{type(e).__name__}: {e}", "latency_s": time.perf_counter() - t}
            row = {"status": r.status_code, "latency_s": time.perf_counter() - t,
                   "retry_after": r.headers.get("retry-after")}
            try:
                body = r.json()
            except ValueError:
                body = {}
            if r.status_code == 200:
                row["id"] = body.get("id")
                row["image"] = has_image(body)
            else:
                row["code"] = (body.get("error") or {}).get("code")
                row["message"] = (body.get("error") or {}).get("message", "")[:160]
            return row

        tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
        if on_started is not None:
            await on_started()
        return await asyncio.gather(*tasks)


def tally(rows: list[dict], wall_s: float) -> dict[str, Any]:
    answered = [r for r in rows if r["status"] == 200 and r.get("image")]
    ids = [r["id"] for r in rows if r["status"] == 200]
    lat = C.stats_s([r["latency_s"] for r in answered]) if answered else {}
    out = {
        "requests": len(rows),
        "answered": len(answered),
        "answered_without_image": sum(r["status"] == 200 and not r.get("image") for r in rows),
        "refused_503": sum(r["status"] == 503 for r in rows),
        "refused_with_retry_after": sum(r["status"] == 503 and bool(r.get("retry_after")) for r in rows),
        "timeout_504_after_admission": sum(r["status"] == 504 for r in rows),
        "other_errors": sum(r["status"] not in (None, 200, 503, 504) for r in rows),
        "lost": sum(r["status"] is None for r in rows),
        "duplicate_ids": len(ids) - len(set(ids)),
        "p50_answered_s": lat.get("p50_s"), "p95_answered_s": lat.get("p95_s"), "wall_s": wall_s,
        "answered_within_120_s": sum(r["latency_s"] <= 120 for r in answered),
        "error_codes": dict(Counter(f"{r['status']} {r.get('code')}" for r in rows if r["status"] != 200)),
        "error_examples": [r for r in rows if r["status"] not in (200, 503)][:3],
    }
    return out


def graph_args(image_replicas: int = 1):
    """The default graph of ``polymodal serve`` for ``--preset`` (``AppArgs`` defaults: one replica per stage), with
    ``image_replicas`` image decoders."""
    from services.app import AppArgs

    decoders = {"image": {"num_replicas": image_replicas}} if image_replicas != 1 else {}
    return AppArgs(preset=REQUEST["model"], decoders=decoders)


def warm(url: str, n: int) -> list[float]:
    import httpx

    out = []
    for i in range(n):
        t = time.perf_counter()
        r = httpx.post(url + "/v1/chat/completions", json=chat_request(10_000 + i), timeout=600)
        r.raise_for_status()
        out.append(time.perf_counter() - t)
    return out


def section_concurrent(n: int, warmup: int) -> dict[str, Any]:
    with C.ray_cluster(num_cpus=2):
        url, ready_s = C.deploy(graph_args(), f"the default graph ({REQUEST['model']}, one replica per stage)",
                                timeout_s=1800)
        warm_s = warm(url, warmup)
        t = time.perf_counter()
        rows = asyncio.run(burst(url, n))
        out = tally(rows, time.perf_counter() - t)
    out.update({"ready_s": ready_s, "warmup_latencies_s": warm_s,
                "graph": f"AppArgs(preset={REQUEST['model']!r}) defaults", "image_options": REQUEST["image"]})
    print(f"concurrent: {json.dumps({k: v for k, v in out.items() if k != 'error_examples'})}", flush=True)
    return out


def image_replicas() -> list[tuple[str, str]]:
    import ray

    return [(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
            if "decoder-image" in a["name"] and "REPLICA" in a["name"].upper()]


def section_kill(n: int, warmup: int) -> dict[str, Any]:
    import httpx
    import ray

    with C.ray_cluster(num_cpus=2):
        url, ready_s = C.deploy(graph_args(image_replicas=2), f"{REQUEST['model']} with two image-decoder replicas",
                                timeout_s=1800)
        warm(url, warmup)
        replicas = image_replicas()
        killed: dict[str, Any] = {}

        def steps() -> float:
            text = httpx.get(url + "/metrics", timeout=30).text
            m = re.search(r'^polymodal_decoder_steps_total\{modality="image"\} (\S+)$', text, re.M)
            return float(m.group(1)) if m else 0.0

        async def kill_when_rendering():
            """Kill the first image replica seen with a request in flight (Serve's own count per replica)."""
            handles = [(name, ray.get_actor(name, namespace=ns)) for name, ns in replicas]
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                for name, h in handles:
                    ongoing = await asyncio.to_thread(ray.get, h.get_num_ongoing_requests.remote(), timeout=10)
                    if ongoing >= 1:
                        ray.kill(h, no_restart=True)
                        killed.update({"replica": name, "at_s": time.perf_counter() - t, "ongoing_at_kill": ongoing,
                                       "steps_before": await asyncio.to_thread(steps)})
                        print(f"kill: killed {name} with {ongoing} request(s) in flight, {killed['at_s']:.1f} s "
                              "into the burst", flush=True)
                        return
                await asyncio.sleep(0.05)

        t = time.perf_counter()
        rows = asyncio.run(burst(url, n, on_started=lambda: asyncio.ensure_future(kill_when_rendering())))
        out = tally(rows, time.perf_counter() - t)
        time.sleep(2)
        out["image_replicas_after"] = len(image_replicas())
        m = re.search(r'^polymodal_decoder_retried_total\{modality="image"\} (\S+)$',
                      httpx.get(url + "/metrics", timeout=30).text, re.M)
        out["renders_retried"] = int(float(m.group(1))) if m else 0
    out.update({"ready_s": ready_s, "image_replicas_before": len(replicas), "killed": killed,
                "image_options": REQUEST["image"],
                "failed_by_the_kill": sum(1 for r in rows if r["status"] == 500
                                          or (r["status"] == 503 and r.get("code") == "stage_unavailable"))})
    print(f"kill: {json.dumps({k: v for k, v in out.items() if k != 'error_examples'})}", flush=True)
    return out


# ---- restart -----------------------------------------------------------------------------------------------


def section_restart() -> dict[str, Any]:
    import httpx

    store = tempfile.mkdtemp(prefix="pm-rel-store-")
    args = {"server": {"request_timeout_s": 120}}
    host = LocalHost("tiny", args, store_dir=store).wait()
    try:
        r = httpx.post(host.url + "/v1/chat/completions", timeout=120, json={
            "model": "tiny", "messages": [{"role": "user", "content": "draw"}], "modalities": ["image"],
            "media_format": "url", "max_tokens": 4})
        r.raise_for_status()
        urls = sorted(set(re.findall(r"https?://[^\s\"')\]]+/v1/artifacts/[^\s\"')\]]+", r.text)))
        before = {u: httpx.get(u, timeout=30).content for u in urls}
        job = httpx.post(host.url + "/v1/videos", json={"prompt": "waves", "seconds": 1}, timeout=60).json()
        deadline = time.monotonic() + 120
        while httpx.get(f"{host.url}/v1/videos/{job['id']}", timeout=30).json()["status"] not in ("completed", "failed"):
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        mp4 = httpx.get(f"{host.url}/v1/videos/{job['id']}/content", timeout=30).content
    finally:
        rc1 = host.stop()
    again = LocalHost("tiny", args, store_dir=store).wait()
    try:
        after = {u.replace(host.url, again.url): httpx.get(u.replace(host.url, again.url), timeout=30) for u in urls}
        job_after = httpx.get(f"{again.url}/v1/videos/{job['id']}", timeout=30).json()
        mp4_after = httpx.get(f"{again.url}/v1/videos/{job['id']}/content", timeout=30).content
    finally:
        rc2 = again.stop()
    kept = sum(a.status_code == 200 and a.content == before[u.replace(again.url, host.url)] for u, a in after.items())
    out = {"artifacts": len(urls), "artifacts_kept": kept, "video_job_status_after": job_after.get("status"),
           "video_mp4_same": bool(mp4) and mp4 == mp4_after, "exit_codes": [rc1, rc2]}
    shutil.rmtree(store, ignore_errors=True)
    print(f"restart: {out}", flush=True)
    return out


# ---- plain questions -----------------------------------------------------------------------------------


def plain_share(stage, questions: list[str], seed: int = 0, max_new_tokens: int | None = None) -> dict[str, Any]:
    """Questions to an LLM stage without ``modalities`` (its preset's policy decides): the share answered without
    a medium (no signal group), and which media came otherwise."""
    from polymodal.types import SignalGroup, TextPart, Turn

    rows = []
    t = time.perf_counter()
    for i, q in enumerate(questions):
        groups, text = [], ""
        for item in stage.stream([Turn("user", (TextPart(q),))], seed=seed + i, max_new_tokens=max_new_tokens):
            if isinstance(item, SignalGroup):
                groups.append(item.modality.value)
            elif hasattr(item, "finish_reason"):
                text = item.text
        rows.append({"question": q, "media": groups, "answer": text})
    wall = time.perf_counter() - t
    plain = sum(not r["media"] for r in rows)
    return {"questions": len(rows), "without_media": plain, "share_without_media": plain / max(1, len(rows)),
            "media_made": dict(Counter(m for r in rows for m in r["media"])), "wall_s": wall,
            "examples_with_media": [r for r in rows if r["media"]][:5], "sample_answers": rows[:3]}


def section_plain(n: int) -> dict[str, Any]:
    from polymodal.pipeline import build_llm_stage
    from training.toyworld.phrasings import plain_questions

    C.one_thread()
    stage = build_llm_stage("toy")
    out = plain_share(stage, plain_questions(n))
    out["policy"] = stage.preset.generation.media_without_modalities
    print(f"plain: {out['without_media']}/{out['questions']} answered without media "
          f"({out['share_without_media']:.1%}); media made: {out['media_made']}", flush=True)
    return out


# ---- main ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {', '.join(SECTIONS)}")
    p.add_argument("--cases", type=int, default=200, help="fuzz: examples per operation and mode (--quick: 30)")
    p.add_argument("--seed", type=int, default=21, help="fuzz: hypothesis seed")
    p.add_argument("--n", type=int, default=200, help="concurrent / kill: requests at once (--quick: 40)")
    p.add_argument("--warmup", type=int, default=3, help="concurrent / kill: sequential requests first")
    p.add_argument("--plain", type=int, default=200, help="plain questions (--quick: 20)")
    p.add_argument("--preset", default="toy", help="concurrent / kill: the preset of the graph")
    p.add_argument("--image-steps", type=int, default=None,
                   help="concurrent / kill: image num_inference_steps (default: the preset's)")
    args = p.parse_args(argv)
    REQUEST["model"] = args.preset
    REQUEST["image"] = {"num_inference_steps": args.image_steps} if args.image_steps else None
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        p.error(f"--only: unknown {bad}; choose from {', '.join(SECTIONS)}")
    cases = 30 if args.quick else args.cases
    n = args.n if args.n != 200 or not args.quick else 40
    n_plain = 20 if args.quick else args.plain
    results: dict[str, Any] = {"benchmark": "reliability", "machine": C.machine(), "sections": {}}
    runners = {"fuzz": lambda: section_fuzz(cases, args.seed), "concurrent": lambda: section_concurrent(n, args.warmup),
               "kill": lambda: section_kill(n, args.warmup), "restart": section_restart,
               "plain": lambda: section_plain(n_plain)}
    for s in only:
        print(f"== {s}", flush=True)
        results["sections"][s] = runners[s]()
    rows = []
    r = results["sections"]
    if "fuzz" in r:
        f = r["fuzz"]
        rows.append(["schemathesis over /openapi.json (--no-ray, tiny)", f"{f['cases']} cases, seed {f['seed']}",
                     f"statuses {f['statuses']}", f"unexpected 5xx: {f['unexpected_5xx']}"])
    for key, label in (("concurrent", f"{n} text+image chats at once ({args.preset}, default graph)"),
                       ("kill", f"{n} text+image chats, 1 of 2 image replicas killed")):
        if key in r:
            x = r[key]
            rows.append([label, f"answered {x['answered']}, refused {x['refused_503']} (503 + Retry-After "
                                f"{x['refused_with_retry_after']})",
                         f"504 after admission {x['timeout_504_after_admission']}, other {x['other_errors']}, lost "
                         f"{x['lost']}, duplicate ids {x['duplicate_ids']}"
                         + (f", failed by the kill {x['failed_by_the_kill']} (renders retried {x['renders_retried']})"
                            if key == "kill" else ""),
                         f"p50 {C.fmt(x['p50_answered_s'])} s, wall {C.fmt(x['wall_s'])} s"])
    if "restart" in r:
        x = r["restart"]
        rows.append(["restart with the store kept (--no-ray, tiny)", f"artifacts kept {x['artifacts_kept']}/"
                     f"{x['artifacts']}", f"video job after: {x['video_job_status_after']}",
                     f"same MP4: {x['video_mp4_same']}"])
    if "plain" in r:
        x = r["plain"]
        rows.append([f"{x['questions']} held-out plain questions to toy, no modalities",
                     f"without media {x['without_media']}/{x['questions']}", f"share {x['share_without_media']:.1%}",
                     f"media made {x['media_made']}"])
    C.print_table("reliability", ["check", "result", "", ""], rows)
    C.finish(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
