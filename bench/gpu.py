"""GPU: real-size, randomly initialised SD v1.5 UNet/VAE and a 7B-shaped LLM (Vicuna-7B / LLaMA-7B shape).

Run from the repository root on a CUDA machine::

    .venv/bin/python bench/gpu.py [--quick] [--out gpu.json]

Without CUDA it prints ``skipped: no CUDA`` and exits 0 (``--cpu-smoke`` runs the same code on the CPU at
toy sizes instead, for tests). Measured, side by side on one pipeline object:

- images/s at batch 1 and 8 through our decoder stage (output projector -> ``decoders.ImageDecoder`` ->
  ``services.workers.DecoderWorker``, the code the image decoder deployment runs, PNG encoding included)
  against a plain ``StableDiffusionPipeline`` call with the same ``prompt_embeds``;
- end-to-end seconds per 512x512, 50-step image: ``AnyToAnyPipeline`` with the 7B-shaped LLM (random, so
  it never emits signal tokens or EOS on its own: after ``--text-tokens`` text tokens the image's signal
  tokens and then EOS are forced through the decode loop's ``propose`` hook), then the decoder;
- LLM tokens/s at batch 1 (``--llm-tokens`` tokens, EOS and signal tokens suppressed);
- through the Ray Serve deployment (part ``deployment``): the same SD v1.5-shaped decoder, saved in the diffusers
  layout and loaded by the image decoder deployment of the whole graph (``services.app:app_builder``, our own
  local Ray cluster), images/s at each batch size with that many closed-loop clients calling the decoder
  deployment's handle with ready signal groups, beside the plain diffusers call in this process (the ratio is
  the issue's ">= 0.95x" check); then one chat request over HTTP with ``modalities: ["image"]`` (the LLM's
  image group is forced at its token limit), seconds end to end.

- fast paths (part ``fastpath``): one row per speed option diffusers and PyTorch give the decoder
  (``DecoderConfig.fast_path`` / ``dtype``: SDPA vs the classic attention processor, channels_last, the other
  16-bit dtype, ``torch.compile`` default and ``reduce-overhead`` (CUDA graphs)), each a freshly built decoder stage
  at ``--fast-path-batch``, its first call (compile included) timed apart, images/s and the speed-up over the
  baseline row; with part ``llm`` also the LLM's tokens/s with ``attn_implementation`` sdpa vs eager.

``--parts`` picks what runs (``decoder,llm,e2e,deployment,fastpath``; each re-runnable alone).

The SD v1.5 UNet, VAE and CLIP ViT-L/14 text encoder are built from their published configs written out in
code (no download), with a small-std initialisation (weights N(0, ``--init-std``)) so that float16 stays finite;
``--dtype bfloat16`` is the other way. The LLM is ``nextgpt-7b-random``'s (hidden 4096, 32 layers, 32 heads,
intermediate 11008) in float16 with transformers' own initialisation (std 0.02).
"""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

# Stable Diffusion v1.5 (unet/, vae/, text_encoder/ config.json of stable-diffusion-v1-5), as keyword arguments.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                      set_alpha_to_one=False, steps_offset=1)

# --cpu-smoke: the same code at toy sizes.
TOY_UNET = dict(SD15_UNET, sample_size=8, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
                norm_num_groups=8, cross_attention_dim=32)
TOY_VAE = dict(SD15_VAE, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=64)
TOY_TEXT = dict(SD15_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=8, projection_dim=32)
TOY_LLM = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=512)


def small_init_(module, std: float) -> None:
    """Weights (ndim > 1) ~ N(0, std), biases 0; norms keep weight 1 (float16 stays finite)."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, std)
            elif name.endswith("bias"):
                p.zero_()


def sd15_pipeline(device: str, dtype, *, toy: bool, init_std: float):
    """A StableDiffusionPipeline of SD v1.5's architecture (random, built on ``device``)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from decoders import tiny

    text_cfg = TOY_TEXT if toy else SD15_TEXT
    tokenizer = tiny.text_tokenizer(model_max_length=text_cfg["max_position_embeddings"])
    with torch.device(device):
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer) if toy else 49408, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **text_cfg))
        unet = UNet2DConditionModel(**(TOY_UNET if toy else SD15_UNET))
        vae = AutoencoderKL(**(TOY_VAE if toy else SD15_VAE))
    if init_std > 0:
        for m in (text_encoder, unet, vae):
            small_init_(m, init_std)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler(**SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False,
    )
    return pipe.to(device, dtype)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="run the same code on the CPU at toy sizes (tests)")
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16", help="decoder and LLM dtype")
    p.add_argument("--init-std", type=float, default=0.02,
                   help="std of the decoder's random weights (0: diffusers' default initialisation)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (--quick: 4)")
    p.add_argument("--size-px", type=int, default=512, help="image height and width")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--batch-sizes", default="1,8", help="decoder batch sizes (comma separated)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per batch size and side (--quick: 1)")
    p.add_argument("--text-tokens", type=int, default=32, help="text tokens before the forced image group (e2e)")
    p.add_argument("--llm-tokens", type=int, default=128, help="tokens of the LLM tokens/s run (--quick: 16)")
    p.add_argument("--parts", default="decoder,llm,e2e,deployment,fastpath",
                   help="what to run (comma separated): decoder, llm, e2e, deployment, fastpath")
    p.add_argument("--fast-paths", default=None,
                   help=f"fast-path rows of part fastpath (comma separated; choices: {', '.join(FAST_PATHS)}; "
                   "default all, with --cpu-smoke all but the compile rows, which take a minute each on a CPU)")
    p.add_argument("--fast-path-batch", type=int, default=1, help="batch size of the fast-path rows")
    args = p.parse_args(argv)

    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("skipped: no CUDA")
        C.finish({"benchmark": "gpu", "skipped": "no CUDA"}, args.out)
        return 0

    import numpy as np

    from polymodal.config import DecoderDefaults
    from polymodal.pipeline import AnyToAnyPipeline, DecoderStage, as_turns, build_llm_stage
    from polymodal.presets import get_preset
    from polymodal.types import SignalGroup
    from projectors import build_output_projector
    from services.protocol import RenderRequest
    from services.workers import BatchItem, DecoderWorker

    from decoders import ImageDecoder

    toy = args.cpu_smoke
    device = "cpu" if toy else "cuda"
    dtype = torch.float32 if toy else getattr(torch, args.dtype)
    steps = 2 if toy else (4 if args.quick else args.steps)
    size = 64 if toy else args.size_px
    repeats = 1 if (toy or args.quick) else args.repeats
    batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    llm_tokens = 8 if toy else (16 if args.quick else args.llm_tokens)
    text_tokens = 4 if toy else args.text_tokens
    image = C.Modality.IMAGE

    preset = get_preset("nextgpt-7b-random")
    llm_cfg = preset.llm.model_copy(update={"dtype": "float32" if toy else args.dtype})
    if toy:
        llm_cfg = llm_cfg.model_copy(update={"tiny": llm_cfg.tiny.model_copy(update=TOY_LLM)})
    text_cfg = TOY_TEXT if toy else SD15_TEXT
    q, d_cond = text_cfg["max_position_embeddings"], text_cfg["hidden_size"]
    defaults = DecoderDefaults(num_inference_steps=steps, guidance_scale=args.guidance_scale, height_px=size,
                               width_px=size)
    dec_cfg = preset.decoders[image].model_copy(update={
        "dtype": "float32" if toy else args.dtype, "cond_tokens": q, "cond_dim": d_cond, "defaults": defaults})
    preset = preset.model_copy(update={"llm": llm_cfg, "decoders": {image: dec_cfg}})
    results: dict = {"benchmark": "gpu", "device": torch.cuda.get_device_name(0) if not toy else "cpu (toy sizes)",
                     "dtype": str(dtype).replace("torch.", ""), "steps": steps, "size_px": size,
                     "guidance_scale": args.guidance_scale, "init_std": args.init_std}

    print("building the SD v1.5-shaped pipeline ...", flush=True)
    pipe = sd15_pipeline(device, dtype, toy=toy, init_std=args.init_std)
    results["unet_params_m"] = sum(x.numel() for x in pipe.unet.parameters()) / 1e6
    results["vae_params_m"] = sum(x.numel() for x in pipe.vae.parameters()) / 1e6
    decoder = ImageDecoder(pipe, dec_cfg, init_state="random", device=device)

    print("building the 7B-shaped LLM stage ...", flush=True)
    parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    unknown = parts - {"decoder", "llm", "e2e", "deployment", "fastpath"}
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choices: decoder, llm, e2e, deployment, fastpath")
    llm = engine = None
    d_llm = int(llm_cfg.tiny.hidden_size)
    if parts & {"llm", "e2e"}:
        t = time.perf_counter()
        llm = build_llm_stage(preset, device=device)  # the preset draws the random 7B on the GPU (init_device)
        results["llm_build_s"] = time.perf_counter() - t
        engine = llm.engine
        results["llm_params_b"] = sum(x.numel() for x in engine.model.parameters()) / 1e9
        results["llm_shape"] = {k: getattr(engine.model.config, k) for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")}
        d_llm = engine.d_llm
    pcfg = preset.output_projectors[image].model_copy(update={"num_queries": q})
    n_sig = preset.signals.spec().count(image)
    proj = build_output_projector(pcfg, d_llm=d_llm, num_signal_tokens=n_sig, cond_shape=(q, d_cond), seed=0)
    stage = DecoderStage(image, proj.to(device).eval(), decoder, "random")
    worker = DecoderWorker(stage)

    rng = np.random.default_rng(0)

    def group(i: int) -> SignalGroup:
        return SignalGroup(modality=image, index=0, text_offset=0,
                           hidden_states=rng.standard_normal((n_sig, d_llm)).astype(np.float32),
                           token_embeds=rng.standard_normal((n_sig, d_llm)).astype(np.float32))

    def ours(b: int, worker: DecoderWorker = worker) -> int:
        items = [BatchItem(RenderRequest(request_id=uuid.uuid4().hex, group=group(i), seed=i, options=defaults))
                 for i in range(b)]
        out = worker.run_batch(items)
        _sync()
        return sum(not isinstance(o, Exception) for o in out)

    def plain(b: int) -> int:
        with torch.no_grad():
            embeds = stage.project([group(i) for i in range(b)]).to(device, dtype)
        neg = decoder.negative_prompt_embeds.unsqueeze(0).expand_as(embeds).contiguous()
        out = pipe(prompt_embeds=embeds, negative_prompt_embeds=neg, num_inference_steps=steps,
                   guidance_scale=args.guidance_scale, height=size, width=size, output_type="np",
                   generator=[torch.Generator("cpu").manual_seed(i) for i in range(b)])
        _sync()
        return int(np.isfinite(out.images).all(axis=(1, 2, 3)).sum())

    rows = []
    for b in (batch_sizes if "decoder" in parts else []):
        if not rows:
            print("decoder: warm-up ...", flush=True)
            ours(1)
            plain(1)
        row: dict = {"batch_size": b}
        for k in range(repeats):
            for name, fn in ((("ours", ours), ("plain", plain)) if k % 2 == 0 else (("plain", plain), ("ours", ours))):
                t = time.perf_counter()
                ok = fn(b)
                row.setdefault(name, {"wall_s": [], "ok_items": 0, "items": 0})
                row[name]["wall_s"].append(time.perf_counter() - t)
                row[name]["ok_items"] += ok
                row[name]["items"] += b
        for name in ("ours", "plain"):
            row[name]["images_per_s"] = b * len(row[name]["wall_s"]) / sum(row[name]["wall_s"])
        row["ratio_ours_over_plain"] = C.ratio(row["ours"]["images_per_s"], row["plain"]["images_per_s"])
        print(f"  batch {b}: ours {row['ours']['images_per_s']:.3f} images/s, plain "
              f"{row['plain']['images_per_s']:.3f} images/s", flush=True)
        rows.append(row)
    results["decoder"] = rows
    if "fastpath" in parts:
        def fresh_worker(cfg) -> DecoderWorker:
            dt = torch.float32 if toy else getattr(torch, cfg.dtype)
            dec = ImageDecoder(sd15_pipeline(device, dt, toy=toy, init_std=args.init_std), cfg, init_state="random",
                               device=device)
            return DecoderWorker(DecoderStage(image, proj.to(device).eval(), dec, "random"))

        results["fast_paths"] = fast_path_rows(args, dec_cfg, fresh_worker, ours, repeats)
    if "deployment" in parts:
        results["deployment"] = through_deployment(args, preset, pipe, pcfg, dec_cfg, plain, group, batch_sizes,
                                                   repeats, toy, size, steps)
    if engine is None:
        _tables(results, rows, None, [], args, size, steps)
        C.finish(results, args.out)
        return 0

    eos = sorted(engine.eos_ids)
    banned = torch.tensor(eos + [i for ids in engine.signal_ids.values() for i in ids], dtype=torch.long)

    def text_choice(logits) -> int:
        logits = logits.float().clone()
        logits[banned.to(logits.device)] = -float("inf")
        return int(torch.argmax(logits))

    def forced(step: int, logits) -> int:
        """Text, then the image's signal tokens, then EOS (a random LLM emits neither by itself)."""
        if step < text_tokens:
            return text_choice(logits)
        k = step - text_tokens
        ids = engine.signal_ids[image]
        return ids[k] if k < len(ids) else eos[0]

    turns = as_turns(C.BENCH_PROMPT)
    if "llm" in parts:
        print("LLM: tokens/s at batch 1 ...", flush=True)
        llm.generate(turns, max_new_tokens=4, propose=lambda s, lg: text_choice(lg))  # warm-up
        _sync()
        t = time.perf_counter()
        res = llm.generate(turns, max_new_tokens=llm_tokens, propose=lambda s, lg: text_choice(lg))
        _sync()
        wall = time.perf_counter() - t
        results["llm"] = {"params_b": results["llm_params_b"], "prompt_tokens": res.prompt_tokens,
                          "completion_tokens": res.completion_tokens, "wall_s": wall,
                          "tokens_per_s": res.completion_tokens / wall,
                          "attn_implementation": engine.model.config._attn_implementation}
        try:  # the fast-path row of the LLM: the same weights with the reference attention
            engine.model.set_attn_implementation("eager")
            llm.generate(turns, max_new_tokens=4, propose=lambda s, lg: text_choice(lg))
            _sync()
            t = time.perf_counter()
            res = llm.generate(turns, max_new_tokens=llm_tokens, propose=lambda s, lg: text_choice(lg))
            _sync()
            results["llm"]["eager_tokens_per_s"] = res.completion_tokens / (time.perf_counter() - t)
        except Exception as e:  # noqa: BLE001 - a row that cannot run is reported, the rest still runs
            results["llm"]["eager_error"] = f"{type(e).__name__}: {e}"
        finally:
            engine.model.set_attn_implementation(results["llm"]["attn_implementation"])

    any2any = AnyToAnyPipeline(preset, llm, {image: stage})
    e2e = []
    if "e2e" in parts:
        print("end to end: one image request ...", flush=True)
    for k in (range(repeats) if "e2e" in parts else []):
        t = time.perf_counter()
        answer = any2any.generate(C.BENCH_PROMPT, modalities=[image], seed=k,
                                  max_new_tokens=text_tokens + n_sig + 2, propose=forced)
        encoded = [m.encode() for m in answer.media if hasattr(m, "encode")]
        _sync()
        e2e.append({"wall_s": time.perf_counter() - t, "timings_s": answer.timings_s,
                    "finish_reason": answer.llm.finish_reason, "images": len(encoded),
                    "forced_group": [g.forced for g in answer.llm.groups],
                    "hidden_states_finite": bool(all(np.isfinite(g.hidden_states).all() for g in answer.llm.groups))})
    if e2e:
        results["end_to_end"] = {"runs": e2e, "seconds_per_image": C.stats_s([r["wall_s"] for r in e2e])}
    _tables(results, rows, results.get("llm"), e2e, args, size, steps)
    C.finish(results, args.out)
    return 0


def _tables(results: dict, rows: list, llm: dict | None, e2e: list, args, size: int, steps: int) -> None:
    if rows:
        C.print_table(
            f"Image decoder, SD v1.5 shape (random), {size}x{size}, {steps} steps, guidance {args.guidance_scale}, "
            f"{results['dtype']}",
            ["batch", "ours images/s", "plain diffusers images/s", "ratio ours/plain", "ok ours (not NaN/black)",
             "finite plain"],
            [[r["batch_size"], r["ours"]["images_per_s"], r["plain"]["images_per_s"], r["ratio_ours_over_plain"],
              f"{r['ours']['ok_items']}/{r['ours']['items']}", f"{r['plain']['ok_items']}/{r['plain']['items']}"]
             for r in rows],
        )
    fast = results.get("fast_paths")
    if fast:
        C.print_table(
            f"Decoder fast paths (DecoderConfig.fast_path / dtype), batch {fast[0]['batch_size']}, {size}x{size}, "
            f"{steps} steps",
            ["fast path", "dtype", "first call s (compile)", "images/s", "speed-up over baseline", "ok"],
            [[r["name"], r["dtype"], r.get("first_call_s"), r.get("images_per_s", r.get("error")),
              r.get("speedup_over_baseline"), f"{r.get('ok_items', 0)}/{r.get('items', 0)}"] for r in fast],
        )
    dep = results.get("deployment")
    if dep:
        C.print_table(
            f"Through the Ray Serve deployment: image decoder (handle, ready signal groups) vs plain diffusers in "
            f"process, {size}x{size}, {steps} steps",
            ["batch (clients)", "deployment images/s", "plain diffusers images/s", "ratio deployment/plain",
             "mean batch formed"],
            [[r["batch_size"], r["deployment_images_per_s"], r["plain_images_per_s"], r["ratio_deployment_over_plain"],
              r["mean_batch_size"]] for r in dep["decoder"]],
        )
        h = dep["http"]
        print(f"HTTP chat request with an image through the whole graph: {h['status']} in {h['wall_s']:.3f} s, "
              f"{h['images']} image(s); streaming means (s): {h['streaming_means_s']}")
    table = []
    if "llm_params_b" in results:
        table.append(["LLM params (M)", 1000 * results["llm_params_b"]])
    if llm is not None:
        table.append([f"LLM tokens/s, batch 1 ({llm['completion_tokens']} tokens, {llm['attn_implementation']})",
                      llm["tokens_per_s"]])
        table.append(["LLM tokens/s, batch 1, attn_implementation eager",
                      llm.get("eager_tokens_per_s", llm.get("eager_error"))])
    if e2e:
        table += [[f"end to end s per {size}x{size} {steps}-step image (p50)",
                   results["end_to_end"]["seconds_per_image"]["p50_s"]],
                  ["end to end: images returned", f"{sum(r['images'] for r in e2e)}/{len(e2e)}"]]
    if table:
        C.print_table("7B-shaped LLM and end to end", ["measure", "value"], table)


# part fastpath: row name -> what it changes in the decoder's config ("dtype": "other" = the other 16-bit dtype)
FAST_PATHS: dict[str, dict] = {
    "baseline": {},
    "eager-attention": {"fast_path": {"attention": "eager"}},
    "channels_last": {"fast_path": {"channels_last": True}},
    "other-dtype": {"dtype": "other"},
    "compile": {"fast_path": {"compile": "default"}},
    "compile-cudagraphs": {"fast_path": {"compile": "reduce-overhead"}},
}


def fast_path_rows(args, dec_cfg, fresh_worker, ours, repeats: int) -> list[dict]:
    """Part ``fastpath``: each row a freshly built decoder stage with one option changed; its first call (where
    ``torch.compile`` compiles) timed apart from ``repeats`` timed calls. A row that fails is reported, the
    others still run. -> rows (see :data:`FAST_PATHS`)."""
    import gc

    import torch

    from polymodal.config import DecoderFastPath

    default = [n for n in FAST_PATHS if not (args.cpu_smoke and "compile" in n)]
    names = [x.strip() for x in args.fast_paths.split(",") if x.strip()] if args.fast_paths else default
    unknown = sorted(set(names) - set(FAST_PATHS))
    if unknown:
        raise ValueError(f"unknown fast paths {unknown}; choices: {', '.join(FAST_PATHS)}")
    b = args.fast_path_batch
    rows: list[dict] = []
    for name in names:
        change = FAST_PATHS[name]
        dtype = dec_cfg.dtype
        if change.get("dtype") == "other":
            dtype = "bfloat16" if dec_cfg.dtype == "float16" else "float16"
        cfg = dec_cfg.model_copy(update={"dtype": dtype,
                                         "fast_path": DecoderFastPath(**change.get("fast_path", {}))})
        row: dict = {"name": name, "dtype": dtype, "fast_path": cfg.fast_path.model_dump(), "batch_size": b}
        print(f"fast path {name} ...", flush=True)
        try:
            worker = fresh_worker(cfg)
            row["dtype"] = str(worker.stage.decoder.dtype).replace("torch.", "")  # float32 on a CPU, whatever asked
            t = time.perf_counter()
            ours(b, worker)
            row["first_call_s"] = time.perf_counter() - t
            walls, ok = [], 0
            for _ in range(repeats):
                t = time.perf_counter()
                ok += ours(b, worker)
                walls.append(time.perf_counter() - t)
            row.update(wall_s=walls, ok_items=ok, items=b * repeats, images_per_s=b * repeats / sum(walls))
        except Exception as e:  # noqa: BLE001 - a row that cannot run is reported, the rest still runs
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        worker = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        rows.append(row)
    base = next((r for r in rows if r["name"] == "baseline" and "images_per_s" in r), None)
    for r in rows:
        if base and "images_per_s" in r:
            r["speedup_over_baseline"] = C.ratio(r["images_per_s"], base["images_per_s"])
    return rows


def through_deployment(args, preset, pipe, pcfg, dec_cfg, plain, group, batch_sizes: list[int], repeats: int,
                       toy: bool, size: int, steps: int) -> dict:
    """The decoder inside the whole Ray Serve graph (loaded from the diffusers layout, as a served checkpoint is)
    beside the plain diffusers call; one chat request over HTTP. -> figures (see the module docstring)."""
    import asyncio
    import tempfile

    import httpx
    from ray import serve

    from services.app import (AppArgs, DecoderDeploymentArgs, IngressDeploymentArgs, LLMDeploymentArgs,
                              SpeechDeploymentArgs)
    from services.metrics import histogram_means
    from services.protocol import RenderRequest

    image = C.Modality.IMAGE
    tmp = Path(tempfile.mkdtemp(prefix="pm-bench-gpu-"))
    print("deployment: saving the SD v1.5-shaped pipeline in the diffusers layout ...", flush=True)
    pipe.save_pretrained(str(tmp / "sd15"), safe_serialization=True)
    served = preset.model_copy(update={
        "name": "gpu-bench",
        "decoders": {image: dec_cfg.model_copy(update={"source": "pretrained", "path": str(tmp / "sd15")})},
        "output_projectors": {image: pcfg},
        "generation": preset.generation.model_copy(update={"max_new_tokens": 8}),
    })
    gpus = 0.0 if toy else 0.45
    app_args = AppArgs(
        preset=str(C.write_preset(served, tmp)), modalities=[image],
        llm=LLMDeploymentArgs(num_cpus=0.3, num_gpus=gpus),
        decoders={image: DecoderDeploymentArgs(num_cpus=0.3, num_gpus=gpus, max_batch_size=max(batch_sizes),
                                               max_ongoing_requests=max(16, 2 * max(batch_sizes)))},
        ingress=IngressDeploymentArgs(num_cpus=0.1),
        # what is measured is the decoder and the chat path: no speech engines (flite, pocketsphinx) or skill
        # replicas, which a bare GPU machine may lack
        speech=SpeechDeploymentArgs(enabled=False), skills={},
    )
    out: dict = {"preset": served.name, "decoder": []}
    with C.ray_cluster():
        url, ready_s = C.deploy(app_args, "the GPU bench graph (7B-shaped LLM, SD v1.5-shaped image decoder)")
        out["ready_s"] = ready_s
        handle = serve.get_deployment_handle("decoder-image", app_name="polymodal")
        options = dec_cfg.defaults

        async def clients(b: int, calls_each: int) -> tuple[float, list[int]]:
            sizes: list[int] = []

            async def client(k: int) -> None:
                for j in range(calls_each):
                    m = await handle.render.remote(RenderRequest(request_id=uuid.uuid4().hex, group=group(k),
                                                                 seed=1000 * k + j, options=options))
                    sizes.append(m.batch_size)

            t = time.perf_counter()
            await asyncio.gather(*[client(k) for k in range(b)])
            return time.perf_counter() - t, sizes

        asyncio.run(clients(1, 1))  # warm-up
        for b in batch_sizes:
            calls_each = repeats + 1
            wall, sizes = asyncio.run(clients(b, calls_each))
            t = time.perf_counter()
            for _ in range(calls_each):
                plain(b)
            plain_wall = time.perf_counter() - t
            row = {"batch_size": b, "calls": b * calls_each, "deployment_images_per_s": b * calls_each / wall,
                   "plain_images_per_s": b * calls_each / plain_wall, "mean_batch_size": sum(sizes) / len(sizes)}
            row["ratio_deployment_over_plain"] = C.ratio(row["deployment_images_per_s"], row["plain_images_per_s"])
            print(f"  deployment batch {b}: {row['deployment_images_per_s']:.3f} images/s vs plain "
                  f"{row['plain_images_per_s']:.3f}", flush=True)
            out["decoder"].append(row)

        with httpx.Client(timeout=600) as client:
            t = time.perf_counter()
            r = client.post(url + "/v1/chat/completions", json=C.chat_body(served.name, seed=1, max_tokens=8))
            wall = time.perf_counter() - t
            images = len(C.answer_media(r.json()["choices"][0]["message"], "image")) if r.status_code == 200 else 0
            # the same request streamed: a whole answer's text comes with its signal groups, so /metrics has the time
            # to first token and per output token of streamed answers only
            with client.stream("POST", url + "/v1/chat/completions",
                               json={**C.chat_body(served.name, seed=1, max_tokens=8), "stream": True}) as s:
                for _ in s.iter_lines():
                    pass
            out["http"] = {"status": r.status_code, "wall_s": wall, "images": images,
                           "streaming_means_s": histogram_means(client.get(url + "/metrics").text)}
    return out


if __name__ == "__main__":
    sys.exit(main())
