"""Batching: media/s of the image decoder deployment at 1, 4 and 16 concurrent requests with batching off
(``max_batch_size`` 1) and on (``max_batch_size`` N, per batch policy); the model's own batching ceiling in process;
tokens/s of the LLM deployment at 1 and 4 concurrent requests.

Run from the repository root::

    .venv/bin/python bench/batching.py [--quick] [--out batching.json]

The deployments are the real ``services.deployments`` classes with ``services.app`` deployment settings
(``DecoderDeploymentArgs`` / ``LLMDeploymentArgs``), each in its own Serve application on our own local Ray
cluster, called through DeploymentHandles from this process (no HTTP, no LLM in front of the decoder: the
decoder gets ready signal groups of the preset's shape, so its own throughput is measured). Batching off
and on are measured side by side, level by level; "on" once per ``--batch-policies`` entry (``adaptive``: no timer,
requests that arrive while a batch runs share the next call; ``timeout``: Ray's ``@serve.batch`` waiting
``--batch-wait-s``). Each replica has fractional CPUs, hence one torch thread.

The ceiling: at each level the same decoder stage, built in this process on one torch thread, renders one batch of
that many items (``DecoderWorker.run_batch``, PNG encoding included) against the same number of items one by one:
model gain = (one by one) / (batched) wall time. The graph gain is the deployment's media/s batching on over off
at that concurrency; serving efficiency = graph gain / model gain (1.0: the graph keeps all the model's gain).
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


async def _load(call, concurrency: int, total: int) -> dict:
    """``total`` calls from ``concurrency`` closed-loop clients -> wall time, per-call latencies, results."""
    counter = itertools.count()
    lat: list[float] = []
    results: list = []

    async def client() -> None:
        while (i := next(counter)) < total:
            t = time.perf_counter()
            results.append(await call(i))
            lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(concurrency)])
    return {"wall_s": time.perf_counter() - t0, "latency": C.stats_s(lat), "results": results}


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=_ints, default=[1, 4, 16], help="decoder levels (comma separated)")
    p.add_argument("--max-batch-size", type=int, default=16, help="decoder max_batch_size with batching on")
    p.add_argument("--batch-wait-s", type=float, default=0.0, help="decoder batch_wait_timeout_s (policy timeout)")
    p.add_argument("--batch-policies", default="adaptive,timeout",
                   help="batch policies measured with batching on (comma separated; services.workers.BATCH_POLICIES)")
    p.add_argument("--decoder-num-cpus", type=float, default=0.4, help="num_cpus of each decoder replica")
    p.add_argument("--requests-per-client", type=int, default=3,
                   help="decoder calls per concurrent client and level (at least 24 calls per level; --quick: 2, "
                        "at least 4)")
    p.add_argument("--steps", type=int, default=C.BENCH_STEPS, help="denoising steps of the bench preset")
    p.add_argument("--size-px", type=int, default=32, help="image size of the bench preset")
    p.add_argument("--llm-concurrency", type=_ints, default=[1, 4], help="LLM levels (comma separated)")
    p.add_argument("--llm-max-concurrency", type=_ints, default=[1, 4],
                   help="LLMDeploymentArgs.max_concurrency values; one LLM application each")
    p.add_argument("--llm-num-cpus", type=float, default=0.4, help="num_cpus of the LLM replica")
    p.add_argument("--llm-max-new-tokens", type=int, default=32, help="max_new_tokens of each LLM request")
    p.add_argument("--llm-requests", type=int, default=16, help="LLM requests per level (--quick: 4)")
    p.add_argument("--llm-preset", default=None,
                   help="preset of the LLM deployment (default: the bench preset, a tiny random LLM; e.g. smol)")
    args = p.parse_args(argv)

    import numpy as np
    from ray import serve

    from polymodal.presets import get_preset
    from polymodal.types import SignalGroup, TextPart, Turn
    from services.app import DecoderDeploymentArgs, LLMDeploymentArgs
    from polymodal.pipeline import build_decoder_stage
    from services.deployments import DecoderServer, LLMServer
    from services.protocol import LLMRequest, RenderRequest
    from services.workers import BatchItem, DecoderWorker, check_batch_policy

    policies = [check_batch_policy(x.strip()) for x in args.batch_policies.split(",") if x.strip()]

    preset = C.bench_preset(num_inference_steps=args.steps, size_px=args.size_px)
    llm_preset = preset if args.llm_preset is None else get_preset(args.llm_preset)
    image = C.Modality.IMAGE
    options = preset.decoders[image].defaults
    n_sig, d_llm = preset.signals.spec().count(image), preset.llm.tiny.hidden_size
    rng = np.random.default_rng(0)
    group = SignalGroup(modality=image, hidden_states=rng.standard_normal((n_sig, d_llm)).astype(np.float32),
                        token_embeds=rng.standard_normal((n_sig, d_llm)).astype(np.float32), index=0, text_offset=0)
    per_client, min_calls = (2, 4) if args.quick else (args.requests_per_client, 24)
    llm_requests = 4 if args.quick else args.llm_requests
    max_ongoing = max(16, max(args.concurrency))

    results: dict = {"benchmark": "batching", "preset": preset.name, "decoder_options": options.model_dump(),
                     "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    with C.ray_cluster(one_app=False):  # several decoder / LLM applications, called through handles
        C.serve_http(C.free_port())  # Serve's proxy on a free port (8000 may be taken); no HTTP is used here
        apps = {}
        configs = [("off", 1, policies[0])] + [(f"on-{pol}", args.max_batch_size, pol) for pol in policies]
        for label, mbs, pol in configs:
            d = DecoderDeploymentArgs(num_cpus=args.decoder_num_cpus, max_batch_size=mbs, batch_policy=pol,
                                      batch_wait_timeout_s=args.batch_wait_s, max_ongoing_requests=max_ongoing)
            app = serve.deployment(DecoderServer).options(**d.options(f"decoder-image-{label}")).bind(
                preset, image.value, None, None, mbs, args.batch_wait_s, None, batch_policy=pol)
            print(f"deploying the image decoder, batching {label} (max_batch_size {mbs}) ...", flush=True)
            apps[label] = serve.run(app, name=f"decoder-{label}", route_prefix=None, blocking=False)

        C.one_thread()
        local = DecoderWorker(build_decoder_stage(preset, image))

        def in_process(batch: int) -> dict:
            """One batch of ``batch`` items vs the same items one by one, interleaved -> wall times, model gain."""
            def items(k: int):
                return [BatchItem(RenderRequest(request_id=uuid.uuid4().hex, group=group, seed=k + i, options=options))
                        for i in range(batch)]

            one, together = [], []
            for rep_ in range(2 if args.quick else 3):
                for mode in (("one", "together") if rep_ % 2 == 0 else ("together", "one")):
                    t = time.perf_counter()
                    if mode == "one":
                        for it in items(0):
                            local.run_batch([it])
                        one.append(time.perf_counter() - t)
                    else:
                        local.run_batch(items(0))
                        together.append(time.perf_counter() - t)
            a, b = float(np.median(one)), float(np.median(together))
            return {"batch": batch, "one_by_one_s": a, "batched_s": b, "ms_per_item_one": 1000 * a / batch,
                    "ms_per_item_batched": 1000 * b / batch, "model_gain": C.ratio(a, b)}

        in_process(1)  # warm-up

        def render(handle):
            async def call(i: int):
                return await handle.render.remote(RenderRequest(request_id=uuid.uuid4().hex, group=group,
                                                                seed=i, options=options))
            return call

        async def decoder_levels() -> list[dict]:
            for h in apps.values():  # warm-up
                await _load(render(h), 2, 2)
            rows = []
            for k, conc in enumerate(args.concurrency):
                total = max(min_calls, per_client * conc)
                row = {"concurrency": conc, "requests": total}
                for label in (list(apps) if k % 2 == 0 else list(apps)[::-1]):
                    r = await _load(render(apps[label]), conc, total)
                    sizes = [m.batch_size for m in r["results"]]
                    row[label] = {"media_per_s": total / r["wall_s"], "wall_s": r["wall_s"],
                                  "latency": r["latency"], "mean_batch_size": float(np.mean(sizes)),
                                  "max_batch_size_seen": int(max(sizes))}
                    print(f"  decoder: concurrency {conc}, batching {label}: {total / r['wall_s']:.2f} media/s",
                          flush=True)
                row["in_process"] = ceiling = in_process(min(conc, args.max_batch_size))
                for pol in policies:
                    gain = C.ratio(row[f"on-{pol}"]["media_per_s"], row["off"]["media_per_s"])
                    row[f"graph_gain_{pol}"] = gain
                    row[f"serving_efficiency_{pol}"] = C.ratio(gain, ceiling["model_gain"])
                print(f"  in process: batch {ceiling['batch']}: model gain {ceiling['model_gain']:.2f}x; serving "
                      "efficiency " + ", ".join(f"{pol} {row[f'serving_efficiency_{pol}']:.2f}" for pol in policies),
                      flush=True)
                rows.append(row)
            return rows

        results["decoder"] = asyncio.run(decoder_levels())
        for label in apps:
            serve.delete(f"decoder-{label}")

        llm_apps = {}
        for mc in args.llm_max_concurrency:
            la = LLMDeploymentArgs(num_cpus=args.llm_num_cpus, max_concurrency=mc,
                                   max_ongoing_requests=max(8, max(args.llm_concurrency)))
            app = serve.deployment(LLMServer).options(**la.options(f"llm-{mc}")).bind(llm_preset, None, None, mc)
            print(f"deploying the LLM ({llm_preset.name}), max_concurrency {mc} ...", flush=True)
            llm_apps[mc] = serve.run(app, name=f"llm-{mc}", route_prefix=None, blocking=False)

        def generate(handle):
            async def call(i: int):
                turn = Turn("user", (TextPart(f"{C.BENCH_PROMPT} {i}"),))
                req = LLMRequest(request_id=uuid.uuid4().hex, turns=(turn,),
                                 max_new_tokens=args.llm_max_new_tokens, seed=i)
                last = None
                async for item in handle.options(stream=True).generate.remote(req):
                    last = item
                return last.completion_tokens
            return call

        async def llm_levels() -> list[dict]:
            for h in llm_apps.values():
                await _load(generate(h), 1, 2)
            rows = []
            for mc, h in llm_apps.items():
                row = {"max_concurrency": mc}
                for conc in args.llm_concurrency:
                    r = await _load(generate(h), conc, llm_requests)
                    tokens = int(sum(r["results"]))
                    row[f"c{conc}"] = {"concurrency": conc, "requests": llm_requests, "tokens": tokens,
                                       "tokens_per_s": tokens / r["wall_s"], "wall_s": r["wall_s"],
                                       "latency": r["latency"]}
                    print(f"  LLM max_concurrency {mc}, concurrency {conc}: {tokens / r['wall_s']:.1f} tokens/s",
                          flush=True)
                rows.append(row)
            return rows

        results["llm"] = {"preset": llm_preset.name, "num_cpus": args.llm_num_cpus,
                          "max_new_tokens": args.llm_max_new_tokens, "rows": asyncio.run(llm_levels())}

    for pol in policies:
        on = f"on-{pol}"
        C.print_table(
            f"Image decoder deployment, preset {preset.name!r} ({args.steps} steps, {args.size_px}px), "
            f"max_batch_size 1 vs {args.max_batch_size}, batch policy {pol!r}"
            + (f" (batch_wait_timeout_s {args.batch_wait_s})" if pol == "timeout" else ""),
            ["concurrency", "off media/s", "on media/s", "graph gain on/off", "mean batch (on)", "p50 s off",
             "p50 s on", "model gain (in process)", "serving efficiency"],
            [[r["concurrency"], r["off"]["media_per_s"], r[on]["media_per_s"], r[f"graph_gain_{pol}"],
              r[on]["mean_batch_size"], r["off"]["latency"]["p50_s"], r[on]["latency"]["p50_s"],
              r["in_process"]["model_gain"], r[f"serving_efficiency_{pol}"]] for r in results["decoder"]],
        )
    C.print_table(
        "The model's own batching ceiling, in process (one torch thread, the same stage and items)",
        ["batch", "ms/item one by one", "ms/item batched", "model gain"],
        [[r["in_process"]["batch"], r["in_process"]["ms_per_item_one"], r["in_process"]["ms_per_item_batched"],
          r["in_process"]["model_gain"]] for r in results["decoder"]],
    )
    lc = args.llm_concurrency
    C.print_table(
        f"LLM deployment, preset {llm_preset.name!r}, max_new_tokens {args.llm_max_new_tokens}, "
        f"num_cpus {args.llm_num_cpus}",
        ["max_concurrency"] + [f"tokens/s @{c}" for c in lc] + [f"ratio @{lc[-1]}/@{lc[0]}"],
        [[r["max_concurrency"]] + [r[f"c{c}"]["tokens_per_s"] for c in lc]
         + [C.ratio(r[f"c{lc[-1]}"]["tokens_per_s"], r[f"c{lc[0]}"]["tokens_per_s"])] for r in results["llm"]["rows"]],
    )
    C.finish(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
