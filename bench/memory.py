"""Memory: USS and PSS (not RSS) of every service process after warm-up and after many mixed requests.

Run from the repository root::

    .venv/bin/python bench/memory.py [--quick] [--out memory.json]

Starts the whole graph of ``services.app:app_builder`` (ingress, LLM, image and audio decoders, stats) on our
own local Ray cluster, sends a warm-up round of every request kind, measures, sends ``--requests`` (500;
``--quick``: 50) mixed requests from a few concurrent clients over HTTP, and measures again. The processes
are this script's descendants (Ray's GCS, raylet and agents, and the raylet's workers: Serve controller,
HTTP proxy, one process per replica), read with psutil ``memory_full_info()``: USS (memory only that process holds)
and PSS (shared pages split among their sharers); the totals are also taken half-way, so that growth in
the second half tells a plateau from a leak. Growth in percent per process and in total (replicas;
Serve's processes = replicas + controller + proxy; all processes).

Mixed requests: text chat, image out, audio out, image + audio out, image in, audio in, SSE streaming with
audio, and ``/v1/images/generations`` with two images.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

MIB = 1024 * 1024


def _media_inputs() -> tuple[str, str]:
    """A small PNG and WAV as base64 (made here: no fixtures needed)."""
    import numpy as np
    import soundfile as sf
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
    png = base64.b64encode(buf.getvalue()).decode()
    buf = io.BytesIO()
    t = np.arange(8000) / 16000
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000, format="WAV")
    return png, base64.b64encode(buf.getvalue()).decode()


def request_kinds(model: str) -> list[tuple[str, str, dict]]:
    """(name, path, JSON body) of each request kind of the mix."""
    png, wav = _media_inputs()
    msg = lambda content: [{"role": "user", "content": content}]  # noqa: E731
    chat = "/v1/chat/completions"
    return [
        ("text", chat, {"model": model, "messages": msg("say hello"), "max_tokens": 8}),
        ("image_out", chat, {"model": model, "messages": msg("draw a fox"), "modalities": ["image"], "max_tokens": 8}),
        ("audio_out", chat, {"model": model, "messages": msg("a bell"), "modalities": ["audio"], "max_tokens": 8}),
        ("image_audio_out", chat, {"model": model, "messages": msg("a dog barking"), "modalities": ["image", "audio"],
                                   "max_tokens": 8}),
        ("image_in", chat, {"model": model, "max_tokens": 8, "messages": msg([
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png}}])}),
        ("audio_in", chat, {"model": model, "max_tokens": 8, "messages": msg([
            {"type": "text", "text": "what do you hear?"},
            {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}])}),
        ("stream_audio", chat, {"model": model, "messages": msg("sing"), "modalities": ["audio"], "max_tokens": 8,
                                "stream": True}),
        ("images_endpoint", "/v1/images/generations", {"model": model, "prompt": "a red fox", "n": 2, "size": "32x32",
                                                       "response_format": "b64_json"}),
    ]


def service_processes() -> list:
    """This process's descendants (our own Ray cluster's processes)."""
    import psutil

    return psutil.Process().children(recursive=True)


def _role(proc) -> str:
    cmd = proc.cmdline()
    if cmd and cmd[0].startswith("ray::"):  # the process title; a running task adds ".method"
        return cmd[0].split()[0].split(".")[0]
    name = proc.name()
    if name.startswith("python") and any("log_monitor" in c for c in cmd):
        return "log_monitor"
    if name.startswith("python") and any("dashboard" in c for c in cmd):
        return "dashboard_agent"
    return name


def snapshot() -> dict[int, dict]:
    """pid -> role, USS and PSS in bytes (processes that vanish or deny access are skipped)."""
    import psutil

    out = {}
    for proc in service_processes():
        try:
            info = proc.memory_full_info()
            out[proc.pid] = {"role": _role(proc), "uss": int(info.uss), "pss": int(getattr(info, "pss", 0))}
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


async def _drive(url: str, kinds: list, total: int, concurrency: int, start: int = 0) -> dict[str, int]:
    """Send ``total`` requests cycling through ``kinds`` -> count of each status ("200", "503", ...)."""
    import httpx

    counter = itertools.count(start)
    codes: dict[str, int] = {}

    async def client(c: httpx.AsyncClient) -> None:
        while (i := next(counter)) < start + total:
            name, path, body = kinds[i % len(kinds)]
            body = {**body, "seed": i} if path.endswith("completions") else body
            if body.get("stream"):
                async with c.stream("POST", url + path, json=body) as r:
                    async for _ in r.aiter_lines():
                        pass
                    code = r.status_code
            else:
                code = (await c.post(url + path, json=body)).status_code
            key = f"{name}:{code}" if code != 200 else "200"
            codes[key] = codes.get(key, 0) + 1

    async with httpx.AsyncClient(timeout=600) as c:
        await asyncio.gather(*[client(c) for _ in range(concurrency)])
    return codes


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=500, help="mixed requests after warm-up (--quick: 50)")
    p.add_argument("--concurrency", type=int, default=4, help="concurrent HTTP clients")
    p.add_argument("--preset", default="tiny", help="preset served (name or YAML path)")
    p.add_argument("--settle-s", type=float, default=3.0, help="pause before each measurement")
    args = p.parse_args(argv)
    total = 50 if args.quick else args.requests

    from services.app import AppArgs

    app_args = AppArgs(preset=args.preset, modalities=[C.Modality.IMAGE, C.Modality.AUDIO],
                       server={"request_timeout_s": 600, "max_concurrent_requests": 64})
    model = app_args.resolved_preset().name
    kinds = request_kinds(model)
    with C.ray_cluster():
        url, _ = C.deploy(app_args, f"preset {model!r}")
        t = time.perf_counter()
        warm_codes = asyncio.run(_drive(url, kinds, 2 * len(kinds), min(args.concurrency, 2)))
        time.sleep(args.settle_s)
        before = snapshot()
        print(f"warm-up done ({time.perf_counter() - t:.1f} s); sending {total} mixed requests ...", flush=True)
        t = time.perf_counter()
        half = total // 2
        codes = asyncio.run(_drive(url, kinds, half, args.concurrency, start=1000))
        paused = time.perf_counter()
        time.sleep(args.settle_s)
        middle = snapshot()  # growth in the second half tells a plateau from a leak
        resumed = time.perf_counter()
        for k, v in asyncio.run(_drive(url, kinds, total - half, args.concurrency, start=1000 + half)).items():
            codes[k] = codes.get(k, 0) + v
        elapsed = (paused - t) + (time.perf_counter() - resumed)
        time.sleep(args.settle_s)
        after = snapshot()

    rows, per_process = [], []
    for pid in sorted(set(before) | set(after), key=lambda q: (before.get(q) or after.get(q))["role"]):
        b, a = before.get(pid), after.get(pid)
        role = (b or a)["role"]
        entry = {"pid": pid, "role": role, "before": b, "after": a,
                 "note": "" if b and a else ("started during the run" if a else "gone during the run")}
        if b and a:
            entry["uss_growth_pct"] = 100 * (a["uss"] - b["uss"]) / max(b["uss"], 1)
            entry["pss_growth_pct"] = 100 * (a["pss"] - b["pss"]) / max(b["pss"], 1)
        per_process.append(entry)
        rows.append([role, pid,
                     b["uss"] / MIB if b else "", a["uss"] / MIB if a else "", entry.get("uss_growth_pct", ""),
                     b["pss"] / MIB if b else "", a["pss"] / MIB if a else "", entry.get("pss_growth_pct", ""),
                     entry["note"]])

    groups = {"replicas": ("ray::ServeReplica",),
              "serve_processes": ("ray::ServeReplica", "ray::ServeController", "ray::ProxyActor"),
              "all_processes": ("",)}

    def total_of(snap: dict, key: str, prefixes: tuple[str, ...]) -> int:
        return sum(v[key] for v in snap.values() if v["role"].startswith(prefixes))

    totals = {}
    for label, prefixes in groups.items():
        t_ = {k: {"before_mib": total_of(before, k, prefixes) / MIB, "middle_mib": total_of(middle, k, prefixes) / MIB,
                  "after_mib": total_of(after, k, prefixes) / MIB} for k in ("uss", "pss")}
        for v in t_.values():
            v["growth_pct"] = 100 * (v["after_mib"] - v["before_mib"]) / max(v["before_mib"], 1e-9)
            v["second_half_growth_pct"] = 100 * (v["after_mib"] - v["middle_mib"]) / max(v["middle_mib"], 1e-9)
        totals[label] = t_
        rows.append([f"TOTAL {label}", "", t_["uss"]["before_mib"], t_["uss"]["after_mib"], t_["uss"]["growth_pct"],
                     t_["pss"]["before_mib"], t_["pss"]["after_mib"], t_["pss"]["growth_pct"],
                     f"2nd half: USS {t_['uss']['second_half_growth_pct']:+.2f}%"])

    results = {"benchmark": "memory", "preset": model, "requests": total, "concurrency": args.concurrency,
               "elapsed_s": elapsed, "requests_per_s": total / elapsed, "status_codes": codes,
               "warmup_status_codes": warm_codes, "request_kinds": [k[0] for k in kinds],
               "totals": totals, "processes": per_process}
    C.print_table(
        f"Memory of the service processes (MiB), preset {model!r}: after warm-up vs after {total} mixed requests "
        f"({args.concurrency} clients, {elapsed:.0f} s)",
        ["process", "pid", "USS warm", "USS after", "USS +%", "PSS warm", "PSS after", "PSS +%", "note"], rows,
    )
    print(f"status codes: {codes}")
    C.finish(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
