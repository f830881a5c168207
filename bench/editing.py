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

Not measured here: what an edit looks like (the toy world's edit kinds are not trained yet; see the README).
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

MIB = 1024 * 1024
MODES = ("generation", "generation+edits")


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


def main() -> None:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--preset", default="toy")
    p.add_argument("--rounds", type=int, default=None, help="rounds of requests per side (default 10; --quick 2)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--child", choices=MODES, help=argparse_hidden())
    args = p.parse_args()
    rounds = args.rounds or (2 if args.quick else 10)
    if args.child:
        print(json.dumps(child(args.child, args.preset, rounds, args.batch)))
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


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
