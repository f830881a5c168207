"""``bench/toyworld_grounding.py``'s pure helpers (no model, no cluster): IoU, the held-out check, the chance of
the swapped-image control, the request and reading boxes out of a chat answer through the OpenAI client.

The ``--quick`` run itself needs a Ray cluster and a grounding preset (minutes on 2 cores), so it is not run here.
"""

from __future__ import annotations

import base64
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import toyworld_grounding as TG

from training.toyworld.data import COLOURS, SHAPES
from training.toyworld.grounding import TRAIN_QUESTIONS


@pytest.mark.parametrize(("a", "b", "want"), [
    ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),
    ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7),  # inter 1, union 4 + 4 - 1
    ([0, 0, 4, 4], [2, 0, 6, 4], 8 / 24),  # half of each: inter 8, union 16 + 16 - 8
    ([0, 0, 4, 4], [0, 0, 2, 2], 4 / 16),  # contained
    ([0, 0, 4, 4], [0, 0, 4, 2], 0.5),  # exactly the hit threshold
    ([0, 0, 4, 4], [4, 0, 8, 4], 0.0),  # touching edges
    ([0, 0, 4, 4], [10, 10, 20, 20], 0.0),
    ([4, 4, 0, 0], [0, 0, 4, 4], 0.0),  # inverted box: area 0
    ([1, 1, 1, 1], [1, 1, 1, 1], 0.0),  # two empty boxes
    ([10.5, 20.25, 30.5, 40.25], [10.5, 20.25, 30.5, 30.25], 0.5),  # fractional pixels
])
def test_iou_hand_computed(a, b, want):
    assert TG.iou(a, b) == pytest.approx(want)
    assert TG.iou(b, a) == pytest.approx(want)


def test_items_are_heldout_and_name_their_shape():
    items = TG.grounding_items(12, seed=0)
    info = TG.check_heldout([it["question"] for it in items])
    assert info["common"] == 0 and info["training_questions"] == len(TRAIN_QUESTIONS) * len(COLOURS) * len(SHAPES)
    for it in items:
        a = it["attributes"]
        assert f"{a['colour']} {a['shape']}" in it["question"]
        x1, y1, x2, y2 = it["box"]
        assert 0 <= x1 < x2 <= TG.SIZE_PX and 0 <= y1 < y2 <= TG.SIZE_PX
        assert x2 - x1 == a["size_px"]
        with Image.open(io.BytesIO(it["png"])) as im:
            px = np.asarray(im.convert("RGB")).astype(int)
        assert px.shape == (TG.SIZE_PX, TG.SIZE_PX, 3)
        # the shape's colour is inside the true box and nowhere outside it
        near = np.abs(px - np.asarray(COLOURS[a["colour"]])).sum(-1) < 60
        inside = np.zeros(near.shape, bool)
        inside[int(y1):int(y2), int(x1):int(x2)] = True
        assert near[inside].sum() > 0.2 * inside.sum() and near[~inside].sum() == 0
    assert len({it["question"] for it in items}) > 6  # varied colours, shapes and templates (48 strings)
    assert TG.grounding_items(3, seed=0)[2]["png"] == items[2]["png"]  # seeded


def test_heldout_check_catches_a_training_question():
    ok = TG.grounding_items(4)
    train_q = TRAIN_QUESTIONS[2].format(phrase="blue triangle")
    with pytest.raises(AssertionError, match="training"):
        TG.check_heldout([it["question"] for it in ok] + [train_q])


def test_swap_chance_hand_made():
    a, b = [0, 0, 10, 10], [0, 0, 10, 10]  # same box
    c, d = [20, 20, 30, 30], [21, 20, 31, 30]  # IoU 90 / 110
    e = [40, 40, 50, 50]
    boxes, perm = [a, b, c, d, e], [1, 0, 3, 4, 2]  # pairs (a,b) (b,a) (c,d) hit; (d,e) (e,c) miss
    ch = TG.swap_chance(boxes, perm)
    assert ch["pairs_overlapping"] == 3 and ch["chance"] == pytest.approx(0.6)
    assert ch["chance_plus_3_sigma"] == pytest.approx(0.6 + 3 * math.sqrt(5 * 0.6 * 0.4) / 5)
    ch0 = TG.swap_chance([a, c, e], [1, 2, 0])
    assert ch0["chance"] == 0 and ch0["chance_plus_3_sigma"] == 0
    with pytest.raises(ValueError):
        TG.swap_chance(boxes, [1, 0])


def _png(rgb=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), rgb, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _body(message: dict) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "toy-grounding",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}


ARTIFACT = "http://bench.invalid/v1/artifacts/art_0123456789abcdef.png"
OVERLAY_MESSAGE = {  # the answer's shape of services/ingress/__init__.py
    "role": "assistant",
    "content": f"The red circle.\n\n![image 1]({ARTIFACT})",
    "images": [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(_png()).decode()},
                "index": 0, "overlay": True}],
    "parts": [{"type": "text", "text": "The red circle."},
              {"type": "image_url", "image_url": {"url": ARTIFACT}, "artifact_id": "art_0123456789abcdef",
               "mime_type": "image/png", "index": 0, "text_offset": 15, "overlay": True, "image_index": 0}],
    "boxes": [{"phrase": "red circle", "box": [12.5, 8.0, 40.0, 35.75], "image_index": 0, "text_span": [4, 14]},
              {"phrase": "red circle", "box": [0.0, 0.0, 5.0, 5.0], "image_index": 0, "text_span": None}],
}


def test_reading_boxes_through_the_openai_client():
    openai = pytest.importorskip("openai")
    import httpx

    sent = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(200, json=_body(OVERLAY_MESSAGE))

    client = openai.OpenAI(base_url="http://bench.invalid/v1", api_key="none", max_retries=0,
                           http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    out = client.chat.completions.create(**TG.chat_kwargs("toy-grounding", _png(), "Mark the red circle, please.",
                                                          seed=7, box_overlay=True))
    body = sent[0]
    assert body["task"] == "grounding" and body["box_overlay"] is True and body["seed"] == 7
    assert body["temperature"] == 0 and body["max_tokens"] == 16
    image, text = body["messages"][0]["content"]
    assert text == {"type": "text", "text": "Mark the red circle, please."}
    assert base64.b64decode(image["image_url"]["url"].split(",", 1)[1]) == _png()
    assert "box_overlay" not in TG.chat_kwargs("m", _png(), "q", seed=0)["extra_body"]

    message = out.choices[0].message
    assert TG.first_box(message) == [12.5, 8.0, 40.0, 35.75]  # the first box is the answer
    assert TG.answer_text(message) == "The red circle."
    with Image.open(io.BytesIO(TG.overlay_png(message))) as im:
        assert im.size == (4, 4) and im.convert("RGB").getpixel((0, 0)) == (10, 200, 30)
    # the same from the JSON body's dict
    assert TG.first_box(OVERLAY_MESSAGE) == [12.5, 8.0, 40.0, 35.75]


def test_reading_no_box_and_bad_boxes():
    plain = {"role": "assistant", "content": "I do not know.", "boxes": []}
    assert TG.first_box(plain) is None and TG.overlay_png(plain) is None
    assert TG.answer_text(plain) == "I do not know."
    assert TG.first_box({"role": "assistant", "content": "x"}) is None  # a model without grounding: no field
    with pytest.raises(ValueError):
        TG.first_box({"role": "assistant", "content": "", "boxes": [{"phrase": "x", "box": [1, 2, 3]}]})


def test_summarize_counts_misses_apart_from_errors():
    truth = [[0, 0, 4, 4]] * 4
    rows = [{"box": [0, 0, 4, 4], "error": None, "latency_s": 0.1, "text": "a"},  # IoU 1
            {"box": [0, 0, 2, 2], "error": None, "latency_s": 0.2, "text": "b"},  # IoU 0.25
            {"box": None, "error": None, "latency_s": 0.3, "text": "c"},  # no box
            {"box": None, "error": "HTTPError: 503", "latency_s": 0.4, "text": ""}]
    s = TG.summarize(rows, truth, wall_s=2.0)
    assert s["hits"] == 1 and s["share"] == 0.25 and s["mean_iou"] == pytest.approx(1.25 / 4)
    assert s["no_box"] == 1 and s["errors"] == 1 and s["latency"]["p50_s"] == pytest.approx(0.25)
