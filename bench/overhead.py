"""Serving overhead: the same request in-process (``AnyToAnyPipeline``) and over HTTP into the Ray Serve graph.

Run from the repository root::

    .venv/bin/python bench/overhead.py [--quick] [--out overhead.json]

Both sides use the ``bench`` preset (``tiny`` with 24 denoising steps, so one text+image request takes about
0.5 s on one CPU thread), one torch thread, the same prompt, seed and ``max_tokens``; requests alternate
between the two sides so load on a shared machine hits both alike. The HTTP side is the full graph of
``services.app:app_builder`` (ingress -> LLM deployment -> image decoder deployment) on our own local Ray
cluster; its time includes JSON, PNG encoding and base64, which the in-process side also does (it encodes
the image to PNG) so that the difference is the serving graph itself.
"""

from __future__ import annotations

import base64
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def calibrate_steps(target_s: float, size_px: int, max_tokens: int, probe_steps: int = C.BENCH_STEPS,
                    repeats: int = 5) -> int:
    """Denoising steps at which one in-process text+image request of the bench preset takes about ``target_s``
    seconds here: the LLM's and the decoder's times (``Answer.timings_s``, median of ``repeats`` after a warm-up)
    at ``probe_steps``, the decoder's time taken as proportional to the steps.

    Raises:
        SystemExit: the LLM alone already takes ``target_s`` or more.
    """
    import statistics

    from polymodal.pipeline import AnyToAnyPipeline

    pipe = AnyToAnyPipeline.from_preset(C.bench_preset(num_inference_steps=probe_steps, size_px=size_px,
                                                       max_new_tokens=max_tokens))
    runs = [pipe.generate(C.BENCH_PROMPT, modalities=[C.Modality.IMAGE], seed=1000 + i,
                          max_new_tokens=max_tokens).timings_s for i in range(repeats + 1)][1:]
    llm = statistics.median(r["llm"] for r in runs)
    per_step = statistics.median(r["decoder.image"] for r in runs) / probe_steps
    if llm >= target_s:
        raise SystemExit(f"--calibrate-s {target_s}: the LLM alone takes {llm:.3f} s here")
    steps = max(1, round((target_s - llm) / per_step))
    print(f"calibrated: {steps} denoising steps for ~{target_s:.2f} s in process (LLM {1000 * llm:.0f} ms, "
          f"{1000 * per_step:.2f} ms per step at {size_px}px)", flush=True)
    return steps


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=40, help="timed requests per side (--quick: 4)")
    p.add_argument("--warmup", type=int, default=3, help="untimed requests per side first (--quick: 1)")
    p.add_argument("--steps", type=int, default=C.BENCH_STEPS, help="denoising steps of the bench preset")
    p.add_argument("--size-px", type=int, default=32, help="image size of the bench preset")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens of the request")
    p.add_argument("--text-only", action="store_true",
                   help="a text-only request instead (the LLM path alone: no decoder, no PNG)")
    p.add_argument("--batch-policy", choices=["adaptive", "timeout"], default=None,
                   help="image decoder batch_policy (default: DecoderDeploymentArgs' default)")
    p.add_argument("--batch-wait-s", type=float, default=None,
                   help="image decoder batch_wait_timeout_s (policy timeout; a lone request waits it)")
    p.add_argument("--calibrate-s", type=float, default=None, metavar="S",
                   help="set the denoising steps so that the in-process text+image request takes about S seconds on "
                        "this machine (issue #30 fixes the workload at ~0.39 s; a quiet 2-core box runs the default "
                        "24 steps in ~0.2 s, the same box at load 7 in ~0.39 s); overrides --steps")
    p.add_argument("--streamed", type=int, default=5,
                   help="streamed requests sent after the timed ones, so /metrics has time to first token and per "
                        "output token (a whole answer's text comes with its signal groups: no per-token times)")
    p.add_argument("--lean", action="store_true",
                   help="deploy only what the request uses (ingress, LLM, image decoder, stats): no speech and no "
                        "skill deployment, whose idle replicas' Ray timers share the two cores")
    args = p.parse_args(argv)
    n, warm = (4, 1) if args.quick else (args.requests, args.warmup)

    import httpx

    from polymodal.pipeline import AnyToAnyPipeline
    from services.app import AppArgs, DecoderDeploymentArgs
    from services.metrics import STREAMING_METRICS, histogram_means

    C.one_thread()
    if args.calibrate_s is not None:
        args.steps = calibrate_steps(args.calibrate_s, args.size_px, args.max_tokens)
    preset = C.bench_preset(num_inference_steps=args.steps, size_px=args.size_px, max_new_tokens=args.max_tokens)
    tmp = Path(tempfile.mkdtemp(prefix="pm-bench-overhead-"))
    preset_path = C.write_preset(preset, tmp)
    decoder = DecoderDeploymentArgs(**{k: v for k, v in (("batch_policy", args.batch_policy),
                                                          ("batch_wait_timeout_s", args.batch_wait_s)) if v is not None})
    lean = {"speech": {"enabled": False}, "skills": {}} if args.lean else {}
    app_args = AppArgs(preset=str(preset_path), modalities=[C.Modality.IMAGE], decoders={C.Modality.IMAGE: decoder},
                       **lean)

    print(f"in-process pipeline: building {preset.name!r} ...", flush=True)
    pipe = AnyToAnyPipeline.from_preset(preset)

    out_modalities = [] if args.text_only else [C.Modality.IMAGE]

    def in_process(seed: int) -> bytes:
        answer = pipe.generate(C.BENCH_PROMPT, modalities=out_modalities, seed=seed, max_new_tokens=args.max_tokens)
        if args.text_only:
            return answer.text.strip().encode()
        data, _, _ = answer.media[0].encode()
        return data

    with C.ray_cluster():
        url, _ = C.deploy(app_args, f"preset {app_args.preset!r}")
        client = httpx.Client(timeout=600)

        def over_http(seed: int) -> bytes:
            r = client.post(url + "/v1/chat/completions", json=C.chat_body(
                preset.name, seed=seed, max_tokens=args.max_tokens, modalities=[m.value for m in out_modalities]))
            r.raise_for_status()
            message = r.json()["choices"][0]["message"]
            if args.text_only:
                return C.answer_text(message).encode()
            return base64.b64decode(C.answer_media(message, "image")[0].split(",", 1)[1])

        sides = {"in_process": in_process, "http_ray_serve": over_http}
        times: dict[str, list[float]] = {k: [] for k in sides}
        same = 0
        for i in range(warm + n):
            order = list(sides) if i % 2 == 0 else list(sides)[::-1]
            outs = {}
            for k in order:
                t = time.perf_counter()
                outs[k] = sides[k](1000 + i)
                if i >= warm:
                    times[k].append(time.perf_counter() - t)
            same += outs["in_process"] == outs["http_ray_serve"]
            print(f"  request {i + 1}/{warm + n}", end="\r", flush=True)
        for i in range(args.streamed):  # whole answers have no time per token: these give /metrics the streamed one
            body = C.chat_body(preset.name, seed=2000 + i, max_tokens=args.max_tokens,
                               modalities=[m.value for m in out_modalities])
            with client.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as r:
                r.raise_for_status()
                for _ in r.iter_lines():
                    pass
        streaming = histogram_means(client.get(url + "/metrics").text)
        client.close()

    st = {k: C.stats_s(v) for k, v in times.items()}
    a, b = st["in_process"], st["http_ray_serve"]
    results = {
        "benchmark": "overhead",
        "preset": preset.model_dump(mode="json", include={"name", "description"}),
        "steps": args.steps, "calibrate_s": args.calibrate_s,
        "request": C.chat_body(preset.name, seed=0, max_tokens=args.max_tokens,
                               modalities=[m.value for m in out_modalities]),
        "app_args": app_args.model_dump(mode="json", include={"llm", "decoders", "ingress", "speech", "skills"}),
        "torch_threads_in_process": 1,
        "latency": st,
        "ratio_http_over_in_process": {"p50": C.ratio(b["p50_s"], a["p50_s"]),
                                       "p95": C.ratio(b["p95_s"], a["p95_s"])},
        "overhead_ms": {"p50": 1000 * (b["p50_s"] - a["p50_s"]), "p95": 1000 * (b["p95_s"] - a["p95_s"])},
        "identical_outputs": f"{same}/{warm + n}",
        "streaming_means_s": streaming,
    }
    C.print_table(
        f"Serving overhead: one {'text-only' if args.text_only else 'text+image'} request, preset {preset.name!r} "
        f"({args.steps} steps, {args.size_px}px, max_tokens {args.max_tokens}), {n} requests per side",
        ["path", "p50 s", "p95 s", "mean s"],
        [["in-process AnyToAnyPipeline", a["p50_s"], a["p95_s"], a["mean_s"]],
         ["HTTP -> Ray Serve graph", b["p50_s"], b["p95_s"], b["mean_s"]],
         ["ratio HTTP / in-process", results["ratio_http_over_in_process"]["p50"],
          results["ratio_http_over_in_process"]["p95"], C.ratio(b["mean_s"], a["mean_s"])],
         ["overhead ms", results["overhead_ms"]["p50"], results["overhead_ms"]["p95"],
          1000 * (b["mean_s"] - a["mean_s"])]],
    )
    print(f"identical {'texts' if args.text_only else 'images'} on both paths: {results['identical_outputs']}")
    C.print_table(
        f"Streaming latencies of the HTTP side (the ingress's /metrics, from the plan's start; mean of {warm + n} "
        f"whole answers + {args.streamed} streamed ones; time to first token and per output token: the streamed)",
        ["metric", "label", "mean ms"],
        [[STREAMING_METRICS[k], label or "-", 1000 * v] for k, by in streaming.items() for label, v in by.items()],
    )
    C.finish(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
