"""Skill latency in process: p50 / p95 of each built-in skill on real photos (scikit-image), on this machine's CPUs.

Run from the repository root::

    .venv/bin/python bench/skills_latency.py [--quick] [--runs 24] [--gen-runs 6] [--threads 2] [--out skills.json]

Each skill is called ``--runs`` times (after one untimed warm-up call that also loads its model) in turn over the
photos ``astronaut()``, ``chelsea()``, ``coffee()`` and ``rocket()`` (as sent: 512x512 to 640x427 px):

- ``detect``: the face cascade, and the cat-face cascade; ``segment``: GrabCut (5 iterations) on a box per photo
  (the astronaut's detected face, the cat's head, the cup, the rocket); ``ocr``: PP-OCR on each photo with a
  line of text drawn on it (the read-back rate is reported);
- ``generate_image`` / ``generate_audio`` / ``generate_video``: the ``toy`` preset's decoders (shipped build;
  ``tiny`` when there is none) at their own defaults, ``--gen-runs`` captions each;
- ``detect_objects``: OWL-ViT from a random folder written here, ``--owlvit tiny`` (hidden 32: the code path, not
  a real cost) or ``base`` (OWL-ViT B/32's real configuration with random weights: the real CPU cost).

``--threads`` sets torch's and OpenCV's thread counts and ONNX Runtime's (OCR).

Then the skill deployment's throughput (``--no-serve`` skips it): the ``skills-cpu`` deployment
(:class:`services.deployments.SkillServer` hosting detect / segment / ocr, as ``services.app`` deploys it) on a Ray
Serve cluster of this script's own (its own temp dir, ``--serve-cpus`` CPUs), called through its DeploymentHandle
with 1 and then 8 requests in flight (``--serve-requests`` each; a mix of detect on the four photos and segment on
the astronaut): requests per second and the p50 / p95 latency a caller sees (Ray's transport and queueing included).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
# a box per photo for segment (x1, y1, x2, y2 in pixels of the photo as sent), written by hand
SEGMENT_BOXES = {"astronaut": (177, 67, 270, 160), "chelsea": (40, 0, 400, 300), "coffee": (70, 15, 530, 395),
                 "rocket": (295, 120, 345, 400)}
OCR_LINE = "OPEN THE POD BAY DOORS"
CAPTIONS = {
    "image": ["a red circle", "a blue triangle", "a green square"],
    "audio": ["a low sine tone", "a high square tone", "a middle sine tone"],
    "video": ["a red circle moving left", "a blue square moving up", "a green triangle moving right"],
}


def _photos() -> dict:
    import skimage.data

    return {name: getattr(skimage.data, name)() for name in PHOTOS}


def _with_line(photo):
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    im = Image.fromarray(photo)
    draw = ImageDraw.Draw(im)
    try:
        font = ImageFont.load_default(size=28)
    except TypeError:  # Pillow < 10.1: the bitmap font (small; expect a lower read-back rate)
        font = ImageFont.load_default()
    x, y = 20, im.height - 60
    box = draw.textbbox((x, y), OCR_LINE, font=font)
    draw.rectangle((box[0] - 8, box[1] - 8, box[2] + 8, box[3] + 8), fill=(255, 255, 255))
    draw.text((x, y), OCR_LINE, font=font, fill=(0, 0, 0))
    return np.asarray(im)


def _time(skill, calls: list, runs: int) -> tuple[dict, list]:
    """Warm up once, then ``runs`` timed calls cycling over ``calls`` ((arguments, media) pairs)."""
    skill.run(*calls[0])
    samples, results = [], []
    for i in range(runs):
        args, media = calls[i % len(calls)]
        t0 = time.perf_counter()
        r = skill.run(args, media)
        samples.append(time.perf_counter() - t0)
        results.append(r)
    return C.stats_s(samples), results


def _owlvit_folder(size: str, root: Path) -> Path:
    from skills.objects import save_tiny_owlvit

    if size == "tiny":
        return save_tiny_owlvit(root / "owlvit-tiny")
    import torch
    from transformers import OwlViTConfig, OwlViTForObjectDetection, OwlViTProcessor

    tiny = save_tiny_owlvit(root / "owlvit-tokenizer")  # the offline tokenizer and a processor to resize
    proc = OwlViTProcessor.from_pretrained(str(tiny))
    proc.image_processor.size = {"height": 768, "width": 768}
    proc.image_processor.crop_size = {"height": 768, "width": 768}
    cfg = OwlViTConfig(text_config={"vocab_size": len(proc.tokenizer), "bos_token_id": proc.tokenizer.bos_token_id,
                                    "eos_token_id": proc.tokenizer.eos_token_id,
                                    "pad_token_id": proc.tokenizer.pad_token_id},
                       vision_config={"image_size": 768, "patch_size": 32})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = OwlViTForObjectDetection(cfg).eval()
    out = root / "owlvit-base"
    model.save_pretrained(str(out))
    proc.save_pretrained(str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=24, help="timed calls per CPU skill (--quick: 3)")
    p.add_argument("--gen-runs", type=int, default=6, help="timed calls per generator (--quick: 1)")
    p.add_argument("--threads", type=int, default=2, help="torch / OpenCV / ONNX Runtime threads")
    p.add_argument("--owlvit", choices=("tiny", "base"), default="tiny",
                   help="detect_objects' random folder: tiny (code path) or OWL-ViT B/32's real size (real cost)")
    p.add_argument("--no-generate", action="store_true", help="skip the generators")
    p.add_argument("--no-serve", action="store_true", help="skip the skill deployment's throughput (Ray Serve)")
    p.add_argument("--serve-requests", type=int, default=48, help="requests per concurrency level (--quick: 16)")
    p.add_argument("--serve-cpus", type=int, default=2, help="CPUs of the bench's own Ray cluster")
    p.add_argument("--serve-only", action="store_true", help="only the skill deployment's throughput")
    args = p.parse_args(argv)
    runs, gen_runs = (3, 1) if args.quick else (args.runs, args.gen_runs)
    os.environ["POLYMODAL_OCR_THREADS"] = str(args.threads)

    import cv2
    import torch

    from decoders import build_decoder
    from polymodal.presets import get_preset
    from skills import build_skill, images

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    photos = _photos()
    rows, results = [], {"runs": runs, "gen_runs": gen_runs, "threads": args.threads, "skills": {}}

    def record(key: str, skill_name: str, what: str, st: dict, res: list, note: str = "") -> None:
        ok = sum(r.ok for r in res)
        rows.append([key, what, st["n"], st["p50_s"], st["p95_s"], st["mean_s"], f"{ok}/{len(res)}", note])
        results["skills"][key] = {"skill": skill_name, "input": what, **st, "ok": ok, "note": note,
                                  "errors": sorted({r.error for r in res if not r.ok})}
        print(f"  {key}: p50 {st['p50_s']:.3f} s, p95 {st['p95_s']:.3f} s ({ok}/{len(res)} ok) {note}", flush=True)

    if not args.serve_only:  # each skill in process
        sent = {n: images(a) for n, a in photos.items()}
        detect = build_skill("detect")
        for target in ("face", "cat_face"):
            st, res = _time(detect, [({"target": target}, sent[n]) for n in PHOTOS], runs)
            found = sum(len(r.boxes) for r in res)
            record(f"detect ({target})", "detect", "4 photos", st, res, f"{found} boxes in {len(res)} calls")

        seg = build_skill("segment")
        st, res = _time(seg, [({"box_px": list(SEGMENT_BOXES[n])}, sent[n]) for n in PHOTOS], runs)
        record("segment", "segment", "4 photos + a box", st, res,
               f"mask {sum(r.masks[0].area_px for r in res if r.ok) / max(1, len(res)):.0f} px on average")

        ocr = build_skill("ocr", threads=args.threads)
        lined = {n: images(_with_line(a)) for n, a in photos.items()}
        st, res = _time(ocr, [({}, lined[n]) for n in PHOTOS], runs)
        want = OCR_LINE.replace(" ", "")
        read = sum(any(b.phrase.replace(" ", "").upper() == want for b in r.boxes) for r in res)
        record("ocr", "ocr", "4 photos + a line", st, res, f"line read back {read}/{len(res)}")

        root = Path(tempfile.mkdtemp(prefix="pm-bench-skills-"))
        t0 = time.perf_counter()
        try:
            owl = build_skill("detect_objects", path=str(_owlvit_folder(args.owlvit, root)))
        finally:
            shutil.rmtree(root, ignore_errors=True)  # loaded: the folder (600 MB for base) is no longer needed
        load_s = time.perf_counter() - t0
        st, res = _time(owl, [({"queries": ["a face", "a cat", "a cup", "a rocket"]}, sent[n]) for n in PHOTOS], runs)
        record(f"detect_objects ({args.owlvit})", "detect_objects", "4 photos, 4 queries", st, res,
               f"random weights; folder written + loaded in {load_s:.1f} s")

        if not args.no_generate:
            try:
                preset, which = get_preset("toy"), "toy"
            except FileNotFoundError:
                preset, which = get_preset("tiny"), "tiny"
            for m, dec_cfg in preset.decoders.items():
                t0 = time.perf_counter()
                skill = build_skill(f"generate_{m.value}", decoder=build_decoder(m, dec_cfg))
                load_s = time.perf_counter() - t0
                calls = [({"caption": c, "seed": k}, ()) for k, c in enumerate(CAPTIONS[m.value])]
                st, res = _time(skill, calls, gen_runs)
                record(f"generate_{m.value} ({which})", f"generate_{m.value}", "a caption", st, res,
                       f"{dec_cfg.defaults.num_inference_steps} steps; decoder loaded in {load_s:.1f} s")

        C.print_table(f"skill latency in process ({args.threads} threads; load average "
                      f"{os.getloadavg()[0]:.1f})", ["skill", "input", "n", "p50 s", "p95 s", "mean s", "ok", "note"],
                      rows)
    if not args.no_serve:
        n_req = 16 if args.quick else args.serve_requests
        results["deployment"] = _deployment_throughput(photos, n_req, args.serve_cpus)
        C.print_table(f"skills-cpu deployment through Ray Serve ({args.serve_cpus} CPUs; load average "
                      f"{os.getloadavg()[0]:.1f})", ["in flight", "requests", "req/s", "p50 s", "p95 s", "ok"],
                      [[c, d["n"], d["req_per_s"], d["p50_s"], d["p95_s"], d["ok"]]
                       for c, d in results["deployment"]["concurrency"].items()])
    C.finish(results, args.out)
    return 0


def _deployment_throughput(photos: dict, n_req: int, num_cpus: int) -> dict:
    """The ``skills-cpu`` deployment on a Ray cluster of our own: requests per second at 1 and 8 in flight."""
    import asyncio

    import ray
    from ray import serve

    from polymodal.modality import Modality
    from polymodal.types import MediaPart
    from services.deployments import SkillServer
    from services.protocol import SkillRequest
    from services.skill_host import SKILL_DEPLOYMENTS

    names = list(SKILL_DEPLOYMENTS["skills-cpu"])
    reqs = [SkillRequest(f"bench-{n}", "detect", '{"target": "face"}', (MediaPart(Modality.IMAGE, photos[n]),))
            for n in PHOTOS]
    reqs.append(SkillRequest("bench-seg", "segment", json.dumps({"box_px": list(SEGMENT_BOXES["astronaut"])}),
                             (MediaPart(Modality.IMAGE, photos["astronaut"]),)))
    temp = tempfile.mkdtemp(prefix="pm-ray-", dir="/tmp")
    out: dict = {"deployment": "skills-cpu", "skills": names, "mix": "detect (face) on 4 photos + segment",
                 "concurrency": {}}
    ray.init(address="local", num_cpus=num_cpus, _temp_dir=temp, include_dashboard=False, logging_level="error",
             configure_logging=False)
    try:
        # no HTTP proxy (the handle is called directly; nothing listens on a port other servers may use)
        serve.start(proxy_location="Disabled", logging_config={"log_level": "WARNING"})
        handle = serve.run(serve.deployment(SkillServer).options(
            name="skills-cpu", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=8).bind("tiny", names),
            name="bench-skills", route_prefix=None, logging_config={"log_level": "WARNING"})

        async def level(c: int) -> dict:
            lat: list[float] = []
            ok = 0
            sem = asyncio.Semaphore(c)

            async def one(k: int) -> None:
                nonlocal ok
                async with sem:
                    t0 = time.perf_counter()
                    r = await handle.run.remote(reqs[k % len(reqs)])
                    lat.append(time.perf_counter() - t0)
                    ok += r.ok

            await asyncio.gather(*(one(k) for k in range(len(reqs))))  # warm-up: every model loaded
            lat.clear()
            ok = 0
            t0 = time.perf_counter()
            await asyncio.gather(*(one(k) for k in range(n_req)))
            wall = time.perf_counter() - t0
            return {**C.stats_s(lat), "req_per_s": n_req / wall, "wall_s": wall, "ok": f"{ok}/{n_req}"}

        async def levels() -> None:  # one event loop for every call of the handle
            for c in (1, 8):
                out["concurrency"][c] = d = await level(c)
                print(f"  skills-cpu, {c} in flight: {d['req_per_s']:.1f} req/s, p50 {d['p50_s']:.3f} s, "
                      f"p95 {d['p95_s']:.3f} s ({d['ok']} ok)", flush=True)

        asyncio.run(levels())
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
