"""Editing shares the loaded weights (issue #27): the decoder deployment's memory after edits have been served,
against the same deployment serving only generation.

Run from the repository root::

    .venv/bin/python bench/editing.py [--quick] [--preset toy] [--out editing.json]

Each side runs in a fresh child process (same preset, same thread count, same generation requests), hosting the
decoder stages as a decoder deployment does (:class:`services.workers.DecoderWorker` over
:class:`polymodal.pipeline.DecoderStage`; render requests carry signal groups of random states):

- ``generation``: ``--rounds`` rounds of one image and one video generation batch (``--batch`` items each), then
  two more image batches and one more video batch (the other side's edit calls, as generations);
- ``generation+edits``: the same first two batches, then an img2img batch, an inpainting batch and a video-to-video
  batch per round (so the edit pipelines are composed and have run): the same number of pipeline calls.

Measured after the last round (``gc.collect()`` first): the process's USS and PSS (psutil ``memory_full_info``) and
the bytes of every distinct parameter / buffer tensor the decoder pipelines hold, edit pipelines included (by
storage pointer: a second copy of the weights would count twice). Printed: both sides and the ratio, and for scale
what one more copy of the weights would add.

``--quality``: what the edits show, through the service (a ``--no-ray`` host of ``--preset``, in this process,
``POST /v1/images/edits`` with the official ``openai`` client; ``--path chat``: ``/v1/chat/completions`` with the
source in the user message and ``edit: true``). ``--n`` held-out sources (seed 20 000; random layout:
the shape's position and size vary) at the preset's image size, each edited once per kind:

- ``recolour``: e.g. "make the {shape} {colour}" (a colour other than the source's): the edit must read as the
  asked colour *and* keep the source's shape;
- ``reshape``: e.g. "make it a {shape}" (another shape): the asked shape, the source's colour kept.

Instructions come from the held-out bank (:data:`training.toyworld.phrasings.HELDOUT_EDITS`, phrasing drawn per
request with its own seed, so the sources are those of earlier runs); the toy MosIT edit dialogues use only
``TRAIN_EDITS`` (no string in both).

Both must also keep the shape's place: the foreground's bounding-box centre within ``EDIT_POSITION_TOL`` of the image
size of the source's, its side within ``EDIT_SIZE_TOL`` (relative) of the source's (a regeneration from scratch moves
them). Controls: (1) *instruction of another request*: the edit of source i scored against the target of request j
(a derangement: i's edit request is kept, only the expectation changes); chance is 1/3 of a changed colour
(recolour) or 1/2 of a changed shape (reshape), before the kept parts; (2) *same edit, two sources*: request i's
instruction applied to source i and to source j; the share where each output's box is nearer its own source's box
than the other's (the outputs follow their sources; 0.5 if they did not).
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
from training.toyworld.checkers import EDIT_POSITION_TOL, EDIT_SIZE_TOL  # noqa: E402
from training.toyworld.editing import edit_requests, score_edits  # noqa: E402

MIB = 1024 * 1024
MODES = ("generation", "generation+edits")
PATHS = ("images-edit", "chat")  # --quality: POST /v1/images/edits, or /v1/chat/completions with edit=true


def _weights_bytes(stages) -> int:
    """Bytes of the distinct tensors (parameters and buffers) of every pipeline the decoders hold."""
    seen: dict[int, int] = {}
    for stage in stages.values():
        dec = stage.decoder
        pipes = [dec.pipeline, *dec._edit_pipelines.values()]
        for pipe in pipes:
            for comp in pipe.components.values():
                if hasattr(comp, "parameters"):
                    for t in (*comp.parameters(), *comp.buffers()):
                        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def child(mode: str, preset_name: str, rounds: int, batch: int) -> dict:
    """One side: build the image and video decoder stages, serve the rounds, measure."""
    import numpy as np
    import psutil

    C.one_thread()
    from polymodal.modality import Modality
    from polymodal.pipeline import build_decoder_stage
    from polymodal.presets import get_preset
    from polymodal.types import EditSource, SignalGroup
    from services.protocol import RenderRequest
    from services.workers import BatchItem, DecoderWorker

    preset = get_preset(preset_name)
    mods = [m for m in (Modality.IMAGE, Modality.VIDEO) if m in preset.decoders and m in preset.output_projectors]
    stages = {m: build_decoder_stage(preset, m) for m in mods}
    workers = {m: DecoderWorker(s) for m, s in stages.items()}
    rng = np.random.default_rng(0)

    def group(m: Modality) -> SignalGroup:
        proj = stages[m].projector  # (N, D_llm) states of the size its output projector takes
        shape = (proj.num_signal_tokens, proj.d_llm)
        return SignalGroup(m, rng.standard_normal(shape).astype(np.float32),
                           rng.standard_normal(shape).astype(np.float32), 0, 0)

    def run(m: Modality, sources=None) -> None:
        opts = stages[m].defaults
        reqs = [RenderRequest("bench", group(m), k, opts, None if sources is None else sources[k])
                for k in range(batch)]
        out = workers[m].run_batch([BatchItem(r) for r in reqs])
        bad = [o for o in out if isinstance(o, Exception)]
        if bad:
            raise RuntimeError(f"{m.value}: {bad[0]}")

    for _ in range(rounds):
        for m in mods:
            run(m)
        if mode == "generation":  # as many pipeline calls as the other side's edits: the same serving history
            run(Modality.IMAGE)
            run(Modality.IMAGE)
            if Modality.VIDEO in stages:
                run(Modality.VIDEO)
        else:
            d = stages[Modality.IMAGE].defaults
            img = rng.integers(0, 255, (d.height_px, d.width_px, 3), dtype=np.uint8)
            mask = np.zeros(img.shape[:2], bool)
            mask[: d.height_px // 2] = True
            run(Modality.IMAGE, [EditSource(Modality.IMAGE, img)] * batch)
            run(Modality.IMAGE, [EditSource(Modality.IMAGE, img, mask)] * batch)
            if Modality.VIDEO in stages:
                v = stages[Modality.VIDEO].defaults
                vid = rng.integers(0, 255, (v.num_frames, v.height_px, v.width_px, 3), dtype=np.uint8)
                run(Modality.VIDEO, [EditSource(Modality.VIDEO, vid)] * batch)
    gc.collect()
    mem = psutil.Process().memory_full_info()
    return {"mode": mode, "uss_mib": mem.uss / MIB, "pss_mib": mem.pss / MIB,
            "weights_mib": _weights_bytes(stages) / MIB,
            "edit_pipelines": {m.value: sorted(s.decoder._edit_pipelines) for m, s in stages.items()}}


def quality(preset_name: str, n: int, settings: list[dict], path: str = "images-edit") -> dict:
    """The quality half (see the module docstring) through a ``--no-ray`` host of ``preset_name``, once per entry of
    ``settings`` (the edit options sent, e.g. ``{"strength": 0.6}`` or ``{"image_guidance_scale": 2.0}``; ``{}``:
    the preset's defaults) on the same sources, seeds and instructions. ``path``: ``images-edit`` (``POST
    /v1/images/edits``) or ``chat`` (``/v1/chat/completions``: the source as an ``image_url`` part beside the
    instruction, ``edit: true``, the edit options under ``image``; the answer's first image is scored).

    Raises:
        ValueError: another ``path``."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    import base64
    import io
    import threading
    import time

    import numpy as np
    from openai import OpenAI
    from PIL import Image

    from polymodal.modality import Modality
    from polymodal.presets import get_preset
    from services.run import serve_main

    size_px = get_preset(preset_name).decoders[Modality.IMAGE].defaults.height_px
    port, stop, log = C.free_port(), threading.Event(), io.StringIO()
    threading.Thread(target=serve_main, args=(preset_name,), daemon=True,
                     kwargs=dict(host="127.0.0.1", port=port, no_ray=True, stop_event=stop, out=log)).start()
    deadline = time.monotonic() + 600
    while "serving preset" not in log.getvalue():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the {preset_name} host did not start: {log.getvalue()}")
        time.sleep(0.2)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)

    def png(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    def edit(image, prompt, _target, seed, setting):  # training.toyworld.editing.EditFn: the instruction is sent
        if path == "chat":
            url = "data:image/png;base64," + base64.b64encode(png(image)).decode()
            r = client.chat.completions.create(
                model=preset_name, messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]}],
                extra_body={"edit": True, "seed": seed, "image": setting})
            data = r.choices[0].message.images[0]["image_url"]["url"].split(",", 1)[1]
        else:
            data = client.images.edit(model=preset_name, image=("src.png", png(image), "image/png"), prompt=prompt,
                                      extra_body={"seed": seed, **setting}).data[0].b64_json
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))

    reqs = edit_requests(n, size_px)
    t0 = time.perf_counter()
    runs = [{"strength": setting.get("strength"), "image_guidance_scale": setting.get("image_guidance_scale"),
             "kinds": score_edits(edit, reqs, size_px, setting)} for setting in settings]
    stop.set()
    return {"preset": preset_name, "path": path, "n": n, "size_px": size_px, "position_tol": EDIT_POSITION_TOL,
            "size_tol": EDIT_SIZE_TOL, "seconds": time.perf_counter() - t0, "runs": runs}


def main() -> None:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--preset", default="toy")
    p.add_argument("--rounds", type=int, default=None, help="rounds of requests per side (default 10; --quick 2)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--quality", action="store_true", help="what the edits show, through the service (not memory)")
    p.add_argument("--n", type=int, default=None, help="--quality: held-out sources (default 200; --quick 12)")
    p.add_argument("--strength", default="preset", help="--quality: comma-separated edit strengths, each run on the "
                   "same sources side by side (0 < s <= 1; 'preset': the preset's default), e.g. 0.6,0.8,1.0")
    p.add_argument("--image-guidance-scale", default=None, help="--quality: comma-separated image guidance scales "
                   "(>= 1; an InstructPix2Pix image decoder's edit option, instead of --strength), side by side")
    p.add_argument("--path", choices=PATHS, default="images-edit",
                   help="--quality: the endpoint edits go through (chat: the source in the user message, edit=true)")
    p.add_argument("--child", choices=MODES, help=argparse_hidden())
    args = p.parse_args()
    rounds = args.rounds or (2 if args.quick else 10)
    if args.child:
        print(json.dumps(child(args.child, args.preset, rounds, args.batch)))
        return
    if args.quality:
        C.one_thread()
        strengths = [None if x.strip() == "preset" else float(x) for x in args.strength.split(",")]
        if any(x is not None and not 0 < x <= 1 for x in strengths):
            p.error(f"--strength: each value must be in (0, 1] or 'preset', got {args.strength!r}")
        settings = [{} if x is None else {"strength": x} for x in strengths]
        if args.image_guidance_scale is not None:
            if args.strength != "preset":
                p.error("--strength and --image-guidance-scale are the edit options of two kinds of decoder: give one")
            settings = [{"image_guidance_scale": float(x)} for x in args.image_guidance_scale.split(",")]
            if any(x["image_guidance_scale"] < 1 for x in settings):
                p.error(f"--image-guidance-scale: each value must be >= 1, got {args.image_guidance_scale!r}")
        res = quality(args.preset, args.n or (12 if args.quick else 200), settings, args.path)
        C.print_table(f"edits through the service ({res['path']}), preset {res['preset']} (n {res['n']}, "
                      f"{res['size_px']} px; place: "
                      f"centre within {EDIT_POSITION_TOL:.0%} of the image, side within {EDIT_SIZE_TOL:.0%})",
                      ["setting", "kind", "asked change", "other kept", "place kept", "all",
                       "ctrl: other's instruction", "chance + 3 sd", "ctrl: follows its source"],
                      [[_setting(run), k, v["asked"], v["other"],
                        v["place"], v["all"], v["control_other"], v["chance_plus_3sd"], v["follow"]]
                       for run in res["runs"] for k, v in run["kinds"].items()])
        C.print_table("'all' per held-out phrasing", ["setting", "kind", "phrasing", "n", "all"],
                      [[_setting(run), k, t, b["n"], b["all"]] for run in res["runs"] for k, v in run["kinds"].items()
                       for t, b in v["by_phrasing"].items()])
        C.finish({**res, "machine": C.machine()}, args.out)
        return
    sides = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--child", mode, "--preset", args.preset, "--rounds", str(rounds),
               "--batch", str(args.batch)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        sides[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    gen, edit = sides["generation"], sides["generation+edits"]
    results = {
        "preset": args.preset, "rounds": rounds, "batch": args.batch, "machine": C.machine(), "sides": sides,
        "uss_ratio": C.ratio(edit["uss_mib"], gen["uss_mib"]),
        "pss_ratio": C.ratio(edit["pss_mib"], gen["pss_mib"]),
        "weights_ratio": C.ratio(edit["weights_mib"], gen["weights_mib"]),
        "one_more_copy_ratio": C.ratio(gen["uss_mib"] + gen["weights_mib"], gen["uss_mib"]),
    }
    C.print_table(f"decoder deployment memory, preset {args.preset} ({rounds} rounds, batch {args.batch})",
                  ["side", "USS MiB", "PSS MiB", "weights MiB"],
                  [[m, s["uss_mib"], s["pss_mib"], s["weights_mib"]] for m, s in sides.items()])
    C.print_table("ratios (generation+edits / generation)", ["measure", "ratio"], [
        ["USS", results["uss_ratio"]], ["PSS", results["pss_ratio"]], ["weights", results["weights_ratio"]],
        ["USS if the edits held one more copy of the weights", results["one_more_copy_ratio"]]])
    C.finish(results, args.out)


def _setting(run: dict) -> str:
    if run.get("image_guidance_scale") is not None:
        return f"image guidance {run['image_guidance_scale']}"
    return "preset" if run["strength"] is None else f"strength {run['strength']}"


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
