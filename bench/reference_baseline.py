"""Reference baseline: NExT-GPT's serving behaviour against ours on the same preset.

Run from the repository root::

    .venv/bin/python bench/reference_baseline.py [--quick] [--out reference.json]

NExT-GPT's released demo keeps its LLM loaded but builds the diffusion pipeline again (``from_pretrained``)
for every request that produces a medium, and answers one request at a time. Emulated here in-process with
the same preset and code: the reference builds the image decoder stage (``build_decoder_stage``: pipeline
load + output projector) per request, renders, and drops it. Ours keeps the stage loaded and, for
throughput, renders concurrent requests in batches through ``services.workers.DecoderWorker`` (the code the
image decoder deployment runs, ``max_batch_size`` as in ``AppArgs``). By default the decoder is a ``bench``
pipeline saved in the diffusers on-disk layout and loaded from disk (``--decoder-source disk``), as the
reference loads SD v1.5; ``memory`` builds it from its config instead (no file I/O). One torch thread on both
sides; reference and ours alternate request by request.

Throughput of ours with batching is measured as N requests arriving at once: the LLM answers them one at a
time, then the decoder renders their images in batches (no overlap of LLM and decoder, which the Ray graph
would add).
"""

from __future__ import annotations

import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=20, help="timed requests per side (--quick: 3)")
    p.add_argument("--concurrent", type=int, default=8, help="requests arriving at once for ours with batching")
    p.add_argument("--rounds", type=int, default=3, help="batched rounds of --concurrent requests (--quick: 1)")
    p.add_argument("--max-batch-size", type=int, default=4, help="decoder max_batch_size of ours (AppArgs default)")
    p.add_argument("--decoder-source", choices=["disk", "memory"], default="disk",
                   help="reference builds the decoder from a saved pipeline (disk) or from its config (memory)")
    p.add_argument("--steps", type=int, default=C.BENCH_STEPS, help="denoising steps of the bench preset")
    p.add_argument("--size-px", type=int, default=32, help="image size of the bench preset")
    p.add_argument("--max-tokens", type=int, default=16, help="max_new_tokens of each request")
    args = p.parse_args(argv)
    n, rounds = (3, 1) if args.quick else (args.requests, args.rounds)

    from decoders import save_tiny_checkpoint
    from polymodal.pipeline import as_turns, build_decoder_stage, build_llm_stage
    from services.protocol import RenderRequest
    from services.workers import BatchItem, DecoderWorker

    C.one_thread()
    image = C.Modality.IMAGE
    preset = C.bench_preset(num_inference_steps=args.steps, size_px=args.size_px, max_new_tokens=args.max_tokens)
    if args.decoder_source == "disk":
        folder = Path(tempfile.mkdtemp(prefix="pm-bench-ref-")) / "image-decoder"
        save_tiny_checkpoint(image, preset.decoders[image], folder, seed=0)
        dec = preset.decoders[image].model_copy(update={"source": "pretrained", "path": str(folder)})
        preset = preset.model_copy(update={"decoders": {**preset.decoders, image: dec}})

    print("building the LLM stage (shared by both sides) ...", flush=True)
    llm = build_llm_stage(preset)
    d_llm = llm.engine.d_llm
    turns = as_turns(C.BENCH_PROMPT)

    def groups_for(seed: int):
        res = llm.generate(turns, modalities=[image], seed=seed, max_new_tokens=args.max_tokens)
        return [g for g in res.groups if g.modality is image]

    def render_encode(stage, groups, seed: int) -> list[bytes]:
        out = stage.render(groups, [seed + g.index for g in groups])
        return [m.encode()[0] for m in out]

    def reference(seed: int) -> list[bytes]:
        groups = groups_for(seed)
        stage = build_decoder_stage(preset, image, d_llm=d_llm)  # NExT-GPT: a fresh pipeline per request
        try:
            return render_encode(stage, groups, seed)
        finally:
            del stage

    ours_stage = build_decoder_stage(preset, image, d_llm=d_llm)

    def ours(seed: int) -> list[bytes]:
        return render_encode(ours_stage, groups_for(seed), seed)

    worker = DecoderWorker(ours_stage)

    def ours_batched(seeds: list[int]) -> int:
        items = [BatchItem(RenderRequest(request_id=uuid.uuid4().hex, group=g, seed=s + g.index,
                                         options=ours_stage.defaults))
                 for s in seeds for g in groups_for(s)]
        done = 0
        for k in range(0, len(items), args.max_batch_size):
            out = worker.run_batch(items[k:k + args.max_batch_size])
            done += sum(not isinstance(o, Exception) for o in out)
        return done

    t = time.perf_counter()
    build_times = []
    for _ in range(1 if args.quick else 3):
        t = time.perf_counter()
        build_decoder_stage(preset, image, d_llm=d_llm)
        build_times.append(time.perf_counter() - t)

    sides = {"reference": reference, "ours": ours}
    lat: dict[str, list[float]] = {k: [] for k in sides}
    same = 0
    for k in sides:  # warm-up
        sides[k](0)
    for i in range(n):
        outs = {}
        for k in (list(sides) if i % 2 == 0 else list(sides)[::-1]):
            t = time.perf_counter()
            outs[k] = sides[k](100 + i)
            lat[k].append(time.perf_counter() - t)
        same += outs["reference"] == outs["ours"]
        print(f"  request {i + 1}/{n}", end="\r", flush=True)
    batched = []
    for r in range(rounds):
        seeds = [1000 + r * args.concurrent + j for j in range(args.concurrent)]
        t = time.perf_counter()
        media = ours_batched(seeds)
        batched.append({"requests": len(seeds), "media": media, "wall_s": time.perf_counter() - t})

    st = {k: C.stats_s(v) for k, v in lat.items()}
    thr = {
        "reference_one_at_a_time": n / sum(lat["reference"]),
        "ours_one_at_a_time": n / sum(lat["ours"]),
        "ours_batched": sum(b["requests"] for b in batched) / sum(b["wall_s"] for b in batched),
    }
    results = {
        "benchmark": "reference_baseline",
        "preset": preset.name, "decoder_source": args.decoder_source,
        "decoder_stage_build_s": C.stats_s(build_times),
        "latency": st,
        "throughput_req_per_s": thr,
        "batched_rounds": batched,
        "ratios": {
            "latency_p50_reference_over_ours": C.ratio(st["reference"]["p50_s"], st["ours"]["p50_s"]),
            "latency_p95_reference_over_ours": C.ratio(st["reference"]["p95_s"], st["ours"]["p95_s"]),
            "throughput_ours_one_at_a_time_over_reference": C.ratio(thr["ours_one_at_a_time"],
                                                                  thr["reference_one_at_a_time"]),
            "throughput_ours_batched_over_reference": C.ratio(thr["ours_batched"], thr["reference_one_at_a_time"]),
        },
        "identical_images": f"{same}/{n}",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
    }
    ra = results["ratios"]
    C.print_table(
        f"NExT-GPT-style serving (decoder built per request, one at a time) vs ours; preset {preset.name!r} "
        f"({args.steps} steps, {args.size_px}px, decoder from {args.decoder_source}), {n} requests per side",
        ["side", "p50 s", "p95 s", "requests/s"],
        [["reference (NExT-GPT style)", st["reference"]["p50_s"], st["reference"]["p95_s"],
          thr["reference_one_at_a_time"]],
         ["ours, one at a time", st["ours"]["p50_s"], st["ours"]["p95_s"], thr["ours_one_at_a_time"]],
         [f"ours, {args.concurrent} at once, batch {args.max_batch_size}", "", "", thr["ours_batched"]],
         ["ratio reference/ours latency", ra["latency_p50_reference_over_ours"], ra["latency_p95_reference_over_ours"],
          ""],
         ["ratio ours/reference throughput", "", "", ra["throughput_ours_batched_over_reference"]]],
    )
    print(f"decoder stage build: {results['decoder_stage_build_s']['mean_s']:.3f} s (mean); "
          f"identical images: {results['identical_images']}")
    C.finish(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
