"""Toy world grounding: does the service box the shape a held-out question names?

Run from the repository root::

    .venv/bin/python bench/toyworld_grounding.py [--quick] [--n 200] [--preset toy-grounding] [--toy-dir DIR]
        [--out toyworld_grounding.json]

Serves ``--preset`` (default ``toy-grounding``: the toy preset with grounding tokens; its build is the one in
``$POLYMODAL_TOY_DIR`` or ``--toy-dir``) as the Ray Serve graph of ``services.app:app_builder`` (ingress and LLM;
no decoder: the answer is text and boxes) on our own local Ray cluster, and measures over HTTP:

- **Service.** ``--n`` (``--quick``: 12) random-layout 64 px toy images (data seed 20 000, disjoint from the build's
  data seeds and from the other benches'), each with a *held-out* question
  (:func:`training.toyworld.grounding.questions` ``(heldout=True)`` formatted with the image's
  :func:`~training.toyworld.grounding.phrase`, e.g. "Mark the red circle, please."), checked disjoint from every
  training question (:func:`~training.toyworld.grounding.all_questions` ``(heldout=False)``, with
  :func:`~training.toyworld.phrasings.assert_disjoint`) before anything is sent. Each goes through the OpenAI
  client (``client.chat.completions.create`` with ``extra_body={"task": "grounding"}``, temperature 0, one seed
  each, ``--concurrency`` at once); the answer's first box (``message.boxes[0].box``, pixels of the sent image) is
  scored by its IoU with the shape's true box (:func:`~training.toyworld.grounding.true_box`). An answer without
  a box is a miss, counted apart from failed requests. Reported: share with IoU >= 0.5, mean IoU (misses count
  0), answers without a box, errors, latency p50 / p95.
- **Control.** The same question with another image of the set (a seeded derangement ``perm``), the returned box
  scored against the *original* image's true box. Chance is the share of pairs (i, perm[i]) whose two true boxes
  have IoU >= 0.5: what a model that ignored the question's phrase and boxed the sent image's shape perfectly
  would score. "Chance + 3 sd" adds three binomial standard deviations of a share over N items
  (``bench/toyworld.py``'s :func:`chance`).
- **Overlays.** The first 4 requests ask for ``box_overlay: true``; with ``--out`` the overlay PNGs (the image with
  the returned boxes drawn) go to ``<out stem>_overlays/`` next to it.

Verdicts: PASS when the share is >= 90 % and the control <= chance + 3 sd. ``--strict`` exits 1 when a verdict
fails (the default exits 0: figures, not a test). Exit 2: unknown preset, a preset without grounding, no toy build,
or no ``openai`` package (the ``test`` extra).
"""

from __future__ import annotations

import base64
import io
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C
import toyworld as TW

from polymodal.grounding import box_iou as iou

TARGET_SHARE = 0.90
IOU_HIT = 0.5
DATA_SEED = 20_000  # data seed of the images (the build uses 0 and 1, toyworld_encoder.py 1000, toyworld.py 10 000)
SIZE_PX = 64
OVERLAYS = 4  # requests (the first ones) that ask for box_overlay
TASK = "grounding"


# ---- boxes and chance ------------------------------------------------------------------------------------
def swap_chance(true_boxes: Sequence[Sequence[float]], perm: Sequence[int]) -> dict[str, float]:
    """Chance of the swapped-image control: the share of pairs (i, perm[i]) whose true boxes overlap with
    IoU >= 0.5, with its binomial sigma over N items and chance + 3 sigma (:func:`toyworld.chance`)."""
    n = len(true_boxes)
    if len(perm) != n or n == 0:
        raise ValueError(f"need one partner per box: {n} boxes, {len(perm)} partners")
    hits = sum(iou(true_boxes[i], true_boxes[j]) >= IOU_HIT for i, j in enumerate(perm))
    return TW.chance([hits / n] * n) | {"pairs_overlapping": hits}


def check_heldout(questions: Sequence[str]) -> dict[str, Any]:
    """Assert that no question is a training grounding question -> what was checked.

    Raises:
        AssertionError: a question is among :func:`training.toyworld.grounding.all_questions` ``(heldout=False)``.
    """
    from training.toyworld.grounding import all_questions
    from training.toyworld.phrasings import assert_disjoint

    train = all_questions(heldout=False)
    assert_disjoint(questions, train)
    return {"questions": len(questions), "distinct": len(set(questions)), "training_questions": len(train),
            "common": 0}


def grounding_items(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` random-layout 64 px toy images (data seed 20 000) as PNG with their attributes, true box and a
    held-out question naming their shape: ``[{"png", "attributes", "box", "question"}]``."""
    from PIL import Image

    from training.toyworld.data import item_rng, render_image
    from training.toyworld.grounding import phrase, questions, true_box

    templates = questions(n, heldout=True, seed=seed)
    out = []
    for i in range(n):
        image, attrs = render_image(item_rng(DATA_SEED, C.Modality.IMAGE, i), SIZE_PX, layout="random")
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        out.append({"png": buf.getvalue(), "attributes": attrs, "box": true_box(attrs),
                    "question": templates[i].format(phrase=phrase(attrs))})
    return out


# ---- requests and answers ---------------------------------------------------------------------------------
def chat_kwargs(model: str, png: bytes, question: str, *, seed: int, max_tokens: int = 16,
                box_overlay: bool = False) -> dict[str, Any]:
    """Keyword arguments of ``client.chat.completions.create``: the image (PNG data URL) then the question,
    ``task: "grounding"`` (and ``box_overlay``) as extra body fields, greedy with one seed."""
    url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "seed": seed,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": question}]}],
            "extra_body": {"task": TASK} | ({"box_overlay": True} if box_overlay else {})}


def message_dict(message: Any) -> dict[str, Any]:
    """A chat answer's ``message`` as a dict (see ``_common.as_dict``)."""
    return C.as_dict(message)


def answer_boxes(message: Any) -> list[dict[str, Any]]:
    """``message.boxes`` (``[{"phrase", "box", "image_index", "text_span"}]``); absent or null -> ``[]``.

    Raises:
        ValueError: ``boxes`` is not a list of objects with a 4-number ``box``.
    """
    boxes = message_dict(message).get("boxes") or []
    if not isinstance(boxes, list) or any(
            not isinstance(b, dict) or not isinstance(b.get("box"), list) or len(b["box"]) != 4 for b in boxes):
        raise ValueError(f"message.boxes is not a list of boxes: {str(boxes)[:200]}")
    return boxes


def first_box(message: Any) -> list[float] | None:
    """The answer's box: the first of ``message.boxes`` ([x1, y1, x2, y2] px of the sent image), or None."""
    boxes = answer_boxes(message)
    return [float(v) for v in boxes[0]["box"]] if boxes else None


def answer_text(message: Any) -> str:
    """The answer's words (``content`` without its media references; see ``_common.answer_text``)."""
    return C.answer_text(message)


def overlay_png(message: Any) -> bytes | None:
    """The PNG of the answer's ``box_overlay`` image (the ``images`` item marked ``overlay``, an inline data URL),
    or None."""
    for item in message_dict(message).get("images") or []:
        if isinstance(item, dict) and item.get("overlay") and item.get("type") == "image_url":
            return TW.data_url_bytes(item["image_url"]["url"])
    return None


def summarize(rows: Sequence[dict], truth: Sequence[Sequence[float]], wall_s: float) -> dict[str, Any]:
    """Share of IoU >= 0.5, mean IoU (misses and errors 0), no-box answers, errors, latency of ``rows``
    (``{"box", "error", "latency_s", "text"}``) against the boxes ``truth`` (row i against truth[i])."""
    n = len(rows)
    ious = [iou(r["box"], t) if r["box"] is not None else 0.0 for r, t in zip(rows, truth)]
    errors = [r["error"] for r in rows if r["error"]]
    return {"hits": sum(x >= IOU_HIT for x in ious), "n": n, "share": sum(x >= IOU_HIT for x in ious) / n,
            "mean_iou": sum(ious) / n, "no_box": sum(r["box"] is None and not r["error"] for r in rows),
            "errors": len(errors), "error_examples": errors[:3],
            "latency": C.stats_s([r["latency_s"] for r in rows]), "wall_s": wall_s, "requests_per_s": n / wall_s,
            "ious": [round(x, 4) for x in ious],
            "samples": [{"text": r["text"], "box": r["box"], "true_box": list(t)} for r, t in zip(rows[:4], truth)]}


# ---- main ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="grounding requests (--quick: 12)")
    p.add_argument("--preset", default="toy-grounding", help="a grounding preset name or YAML path")
    p.add_argument("--toy-dir", default=None, help="toy build folder (default: $POLYMODAL_TOY_DIR, else shipped)")
    p.add_argument("--concurrency", type=int, default=6, help="HTTP requests at once")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens of the chat requests")
    p.add_argument("--seed", type=int, default=0, help="seed of the questions, the derangement and generation")
    p.add_argument("--strict", action="store_true", help="exit 1 when a PASS/FAIL verdict fails")
    args = p.parse_args(argv)
    n = 12 if args.quick else args.n
    if n < 2:
        p.error("--n must be >= 2 (the control needs a derangement)")
    if args.concurrency < 1:
        p.error("--concurrency must be >= 1")
    if args.max_tokens < 1:
        p.error("--max-tokens must be >= 1")
    if args.toy_dir:
        os.environ["POLYMODAL_TOY_DIR"] = str(Path(args.toy_dir).resolve())  # Ray's workers inherit it

    from polymodal.presets import get_preset
    from training.toyworld.evaluate import derangement

    try:
        preset = get_preset(args.preset)
    except (ValueError, FileNotFoundError) as e:
        print(f"bench/toyworld_grounding.py: {e}", file=sys.stderr)
        return 2
    if preset.grounding is None or TASK not in preset.grounding.tasks:
        print(f"bench/toyworld_grounding.py: preset {preset.name!r} has no {TASK!r} task (no grounding)",
              file=sys.stderr)
        return 2
    try:
        import openai
    except ImportError:
        print("bench/toyworld_grounding.py: needs the openai package (the `test` extra)", file=sys.stderr)
        return 2

    # ---- what is asked (held out), checked before anything is sent
    items = grounding_items(n, args.seed)
    held = check_heldout([it["question"] for it in items])
    print(f"preset: {preset.name}; POLYMODAL_TOY_DIR={os.environ.get('POLYMODAL_TOY_DIR', '(shipped build)')}")
    print(f"held-out check: {held['questions']} questions ({held['distinct']} distinct), none among the "
          f"{held['training_questions']} training grounding questions (assert_disjoint)")
    truth = [it["box"] for it in items]
    perm = derangement(n, args.seed)
    chance = swap_chance(truth, perm)

    from services.app import AppArgs

    app_args = AppArgs(preset=args.preset, modalities=[],
                       server={"request_timeout_s": 900, "max_concurrent_requests": 64})
    results: dict[str, Any] = {
        "benchmark": "toyworld_grounding", "preset": preset.name, "toy_dir": os.environ.get("POLYMODAL_TOY_DIR"),
        "n": n, "seed": args.seed, "data_seed": DATA_SEED, "size_px": SIZE_PX, "concurrency": args.concurrency,
        "max_tokens": args.max_tokens, "iou_hit": IOU_HIT, "heldout_check": held, "timings_s": {},
        "requests": [{"question": it["question"], "attributes": dict(it["attributes"]),
                      "true_box": it["box"]} for it in items]}
    overlays: list[bytes | None] = [None] * min(OVERLAYS, n)

    def ask(i: int, image_index: int) -> dict:
        overlay = image_index == i and i < len(overlays)
        kwargs = chat_kwargs(preset.name, items[image_index]["png"], items[i]["question"],
                             seed=1_000 * args.seed + i, max_tokens=args.max_tokens, box_overlay=overlay)
        out, dt, err = TW.timed(lambda: client.chat.completions.create(**kwargs))
        box, text = None, ""
        if err is None:
            try:
                message = out.choices[0].message
                box, text = first_box(message), answer_text(message)
                if overlay:
                    overlays[i] = overlay_png(message)
            except Exception as e:  # noqa: BLE001 - an unreadable answer counts as a miss
                err = f"{type(e).__name__}: {str(e)[:200]}"
        return {"box": box, "error": err, "latency_s": dt, "text": text}

    t_start = time.perf_counter()
    with C.ray_cluster():
        url, results["timings_s"]["deploy_until_ready"] = C.deploy(
            app_args, f"preset {args.preset!r} (ingress + LLM)", timeout_s=1800)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=1200, max_retries=0)
        try:
            rows, wall = TW.run_all(lambda i: ask(i, i), n, args.concurrency, "grounding")
            ctrl, wall_c = TW.run_all(lambda i: ask(i, perm[i]), n, args.concurrency, "grounding, swapped image")
        finally:
            client.close()
    results["timings_s"]["service_total"] = time.perf_counter() - t_start

    results["service"] = summarize(rows, truth, wall)
    results["swapped_image_control"] = summarize(ctrl, truth, wall_c) | {"derangement": perm}
    results["chance"] = chance
    if args.out is not None:
        folder = args.out.parent / f"{args.out.stem}_overlays"
        folder.mkdir(parents=True, exist_ok=True)
        saved = []
        for i, png in enumerate(overlays):
            if png is not None:
                path = folder / f"overlay_{i:02d}.png"
                path.write_bytes(png)
                saved.append({"path": str(path), "question": items[i]["question"], "true_box": truth[i],
                              "box": rows[i]["box"]})
        results["overlays"] = saved
        print(f"overlays: {len(saved)} PNG under {folder}")

    # ---- tables and verdicts
    table = []
    for label, r in (("service: image + held-out question", results["service"]),
                     ("control: another image of the set", results["swapped_image_control"])):
        table.append([label, f"{r['hits']}/{r['n']}", r["share"], r["mean_iou"], r["no_box"], r["errors"],
                      chance["chance"], chance["chance_plus_3_sigma"], r["latency"]["p50_s"], r["latency"]["p95_s"],
                      r["wall_s"]])
    C.print_table(f"grounding: does the first box hit the named shape (IoU >= {IOU_HIT})? ({n} random-layout "
                  f"{SIZE_PX} px images, held-out questions, preset {preset.name})",
                  ["path", "IoU>=0.5", "share", "mean IoU", "no box", "errors", "chance", "chance+3sd", "p50 s",
                   "p95 s", "wall s"], table)
    print(f"  chance: {chance['pairs_overlapping']}/{n} swapped pairs have true boxes with IoU >= {IOU_HIT}; "
          f"answers: {[s['text'] for s in results['service']['samples'][:2]]}")
    svc, ctl = results["service"], results["swapped_image_control"]
    verdicts = [[f"service share IoU >= {IOU_HIT} >= {TARGET_SHARE:.0%}", svc["share"], TARGET_SHARE,
                 "PASS" if svc["share"] >= TARGET_SHARE else "FAIL"],
                ["swapped-image control <= chance + 3 sd", ctl["share"], chance["chance_plus_3_sigma"],
                 "PASS" if ctl["share"] <= chance["chance_plus_3_sigma"] else "FAIL"]]
    C.print_table("verdicts", ["check", "value", "threshold", "verdict"], verdicts)
    results["verdicts"] = [{"check": c, "value": v, "threshold": t, "verdict": x} for c, v, t, x in verdicts]
    results["timings_s"]["total"] = time.perf_counter() - t_start
    print(f"service: {svc['requests_per_s']:.2f} requests/s at concurrency {args.concurrency}; {svc['errors']} "
          f"errors {svc['error_examples'][:1]}; control: {ctl['errors']} errors {ctl['error_examples'][:1]}")
    print(f"timings: {', '.join(f'{k} {v:.1f} s' for k, v in results['timings_s'].items())}")
    C.finish(results, args.out)
    return 1 if args.strict and any(v[3] == "FAIL" for v in verdicts) else 0


if __name__ == "__main__":
    sys.exit(main())
