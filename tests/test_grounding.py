"""Grounding as an output (issue #11): the parsers of seven formats with pixels hand-computed for a
non-square image, our location tokens end to end (vocabulary, prompt, parse), the RefCOCO-style reader and
the instruct stage training the location rows, and the HTTP API (boxes, overlay, task) over a fake stage.

Every expected pixel value below is computed by hand from the format's documented frame for a 640 x 480
image (W x H) unless stated otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from polymodal.grounding import (
    GROUNDING_FORMATS,
    GroundedPhrase,
    GroundingConfig,
    LocGrid,
    build_parser,
    parse_grounding,
)
from polymodal.modality import Modality
from polymodal.types import LLMResult, MediaPart, TextDelta, TextPart, Turn

W, H = 640, 480
SIZES = [(W, H)]


def boxes_of(out):
    return [(b.phrase, tuple(round(v, 4) for v in b.box_px)) for b in out.boxes]


def spans_ok(out):
    """Every phrase sits at its text_span in the cleaned text."""
    for b in out.boxes:
        if b.text_span is not None:
            assert out.text[b.text_span[0]:b.text_span[1]] == b.phrase, (b, out.text)


# ---- our location tokens ---------------------------------------------------------------------------
def test_loc_hand_values_several_boxes_and_malformed_spans():
    # 16 x 16 grid on 640 x 480: cells are 40 x 30 px. loc_17 = row 1 col 1; loc_50 = row 3 col 2.
    text = ("A <p>cat</p><loc_17><loc_50> sits by <p>two dogs</p><loc_0><loc_0><loc_34><loc_255>. "
            "Odd <p>bird</p><loc_3> and reversed <p>fish</p><loc_50><loc_17> and off-grid <p>cow</p><loc_3><loc_256>"
            " stray<loc_9>[grounding]")
    out = parse_grounding("loc", text, image_sizes=SIZES)
    assert boxes_of(out) == [
        ("cat", (40.0, 30.0, 120.0, 120.0)),
        ("two dogs", (0.0, 0.0, 40.0, 30.0)),            # loc_0..loc_0: the first cell
        ("two dogs", (80.0, 60.0, 640.0, 480.0)),        # loc_34 = row 2 col 2 .. loc_255 = last cell
    ]
    # malformed spans keep their words; our (special) tokens never show in the text
    assert out.text == "A cat sits by two dogs. Odd bird and reversed fish and off-grid cow stray"
    assert all(b.image_index == 0 and b.raw.startswith("<p>") for b in out.boxes)
    spans_ok(out)


def test_loc_box_markers_and_the_last_image():
    grid = LocGrid(grid_size=8, box_markers=("<box>", "</box>"))
    text = "<p>sun</p><box><loc_9><loc_18></box><box><loc_0><loc_63></box> and <p>bad</p><box><loc_9></box>"
    # 8 x 8 grid on the second image, 320 x 160: cells 40 x 20. loc_9 = row 1 col 1; loc_18 = row 2 col 2.
    out = parse_grounding("loc", text, image_sizes=[(W, H), (320, 160)], grid=grid)
    assert boxes_of(out) == [("sun", (40.0, 20.0, 120.0, 60.0)), ("sun", (0.0, 0.0, 320.0, 160.0))]
    assert {b.image_index for b in out.boxes} == {1} and out.text == "sun and bad"


def test_loc_round_trip_encode_then_parse():
    rng = np.random.default_rng(0)
    grid = LocGrid(grid_size=16)
    for _ in range(200):
        x1, x2 = sorted(rng.uniform(0, W, 2))
        y1, y2 = sorted(rng.uniform(0, H, 2))
        text = "the " + grid.encode("thing", [(x1, y1, x2, y2)], W, H) + " here"
        out = build_parser("loc", grid=grid).parse(text, image_sizes=SIZES)
        assert out.text == "the thing here" and len(out.boxes) == 1
        bx1, by1, bx2, by2 = out.boxes[0].box_px
        # the decoded box covers the original and is at most one cell larger on each side
        assert bx1 <= x1 < bx1 + 40 and by1 <= y1 < by1 + 30 and bx2 - 40 <= x2 <= bx2 and by2 - 30 <= y2 <= by2
        # and re-encoding the decoded box gives the same cells
        assert grid.cells(out.boxes[0].box_px, W, H) == grid.cells((x1, y1, x2, y2), W, H)


def test_loc_from_token_ids_where_decoding_drops_the_tokens():
    from polymodal.offline_tokenizer import tiny_tokenizer

    grid = LocGrid()
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": grid.all_tokens()})
    ids = tok("A <p>cat</p><loc_17><loc_50> sits", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "A cat sits"  # the markup is gone from plain decoding
    out = build_parser("loc", grid=grid).parse(token_ids=ids, tokenizer=tok, image_sizes=SIZES)
    assert boxes_of(out) == [("cat", (40.0, 30.0, 120.0, 120.0))] and out.text == "A cat sits"


# ---- other models' formats -------------------------------------------------------------------------
def test_kosmos2_through_transformers_post_processing():
    # the example of Kosmos-2's model card; 32 x 32 grid, cell centres: 44 = row 1 col 12, 863 = row 26 col 31
    # -> x (12.5/32, 31.5/32) * 640 = 250, 630; y (1.5/32, 26.5/32) * 480 = 22.5, 397.5
    text = ("<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863>"
            "</object> warming himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911>"
            "</object>.")
    out = parse_grounding("kosmos2", text, image_sizes=SIZES)
    assert out.text == "An image of a snowman warming himself by a fire."
    # 5 = row 0 col 5, 911 = row 28 col 15 -> x 5.5/32*640 = 110, 15.5/32*640 = 310; y 0.5/32*480 = 7.5, 427.5
    assert boxes_of(out) == [("a snowman", (250.0, 22.5, 630.0, 397.5)), ("a fire", (110.0, 7.5, 310.0, 427.5))]
    spans_ok(out)
    assert out.boxes[0].raw.startswith("<phrase> a snowman</phrase><object>")
    # two boxes for one phrase; a span with one patch index is malformed: its words stay, no box.
    # 0 = row 0 col 0 and 33 = row 1 col 1: different row and column -> centres 0.5/32, 1.5/32
    text = ("<grounding><phrase> two dogs</phrase><object><patch_index_0000><patch_index_0033>"
            "</delimiter_of_multi_objects/><patch_index_0064><patch_index_0064></object> and<phrase> a cat</phrase>"
            "<object><patch_index_0100></object>")
    out = parse_grounding("kosmos2", text, image_sizes=SIZES)
    # 64 = row 2 col 0, same cell twice -> the whole cell: x 0..20, y 2/32*480 = 30 .. 45
    assert boxes_of(out) == [("two dogs", (10.0, 7.5, 30.0, 22.5)), ("two dogs", (0.0, 30.0, 20.0, 45.0))]
    assert out.text == "two dogs and a cat"


def test_qwen_vl():
    # Qwen-VL's README example; integers are 0-1000 of W and H
    text = "Here: <ref>击掌</ref><box>(536,509),(588,602)</box>"
    out = parse_grounding("qwen-vl", text, image_sizes=SIZES)
    assert boxes_of(out) == [("击掌", (343.04, 244.32, 376.32, 288.96))] and out.text == "Here: 击掌"
    text = ("<ref>the dogs</ref><box>(0,0),(500,500)</box><box>(500,250),(1000,1000)</box> play; "
            "<ref>a ball</ref><box>(10,20)</box> and <box>(900,0),(100,100)</box> and <box>(1,2),(3,1001)</box>")
    out = parse_grounding("qwen-vl", text, image_sizes=SIZES)
    assert boxes_of(out) == [("the dogs", (0.0, 0.0, 320.0, 240.0)), ("the dogs", (320.0, 120.0, 640.0, 480.0))]
    # a one-point box, a reversed box and a value over 1000 stay text, as written
    assert out.text == ("the dogs play; <ref>a ball</ref><box>(10,20)</box> and <box>(900,0),(100,100)</box> and "
                        "<box>(1,2),(3,1001)</box>")
    spans_ok(out)


QWEN2_TAGS = ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>"]


def test_qwen2_vl_from_token_ids():
    from polymodal.offline_tokenizer import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": QWEN2_TAGS})
    text = ("The <|object_ref_start|>dog<|object_ref_end|><|box_start|>(100,200),(300,400)<|box_end|>"
            "<|box_start|>(700,500),(900,1000)<|box_end|> runs, <|object_ref_start|>a cat<|object_ref_end|>"
            "<|box_start|>(5,5)<|box_end|> sleeps")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    plain = tok.decode(ids, skip_special_tokens=True)
    assert "<|box_start|>" not in plain and "(100,200),(300,400)" in plain  # plain decoding loses the tags
    out = build_parser("qwen2-vl").parse(token_ids=ids, tokenizer=tok, image_sizes=SIZES)
    # x * 0.64, y * 0.48
    assert boxes_of(out) == [("dog", (64.0, 96.0, 192.0, 192.0)), ("dog", (448.0, 240.0, 576.0, 480.0))]
    assert out.text == "The dog runs, <|object_ref_start|>a cat<|object_ref_end|><|box_start|>(5,5)<|box_end|> sleeps"
    assert parse_grounding("qwen2-vl", text, image_sizes=SIZES).boxes == out.boxes  # same from text
    # a referring answer: the box alone, on a portrait image (480 x 640): x * 0.48, y * 0.64
    ids = tok("<|box_start|>(250,125),(750,1000)<|box_end|>", add_special_tokens=False)["input_ids"]
    out = build_parser("qwen2-vl").parse(token_ids=ids, tokenizer=tok, image_sizes=[(480, 640)])
    assert boxes_of(out) == [("", (120.0, 80.0, 360.0, 640.0))] and out.text == ""


def test_shikra_frame_is_the_padded_square():
    # W > H: square side 640, the image pasted 80 px down: y_px = y * 640 - 80
    text = "The man[0.420,0.229,0.782,0.785] holds two cups[0.1,0.2,0.3,0.4;0.5,0.6,0.7,0.8]."
    out = parse_grounding("shikra", text, image_sizes=SIZES)
    assert boxes_of(out) == [("The man", (268.8, 66.56, 500.48, 422.4)),
                             ("holds two cups", (64.0, 48.0, 192.0, 176.0)),
                             ("holds two cups", (320.0, 304.0, 448.0, 432.0))]
    assert out.text == "The man holds two cups."
    spans_ok(out)
    # H > W (480 x 640): pasted 80 px right: x_px = x * 640 - 80; a box in the padding is clamped
    out = parse_grounding("shikra", "A kite[0.5, 0.25, 0.75, 1.0] flies, bad[0.1,0.2,0.3] [1.5,0,0.2,0.2]",
                          image_sizes=[(480, 640)])
    assert boxes_of(out) == [("A kite", (240.0, 160.0, 400.0, 640.0))]
    assert out.text == "A kite flies, bad[0.1,0.2,0.3] [1.5,0,0.2,0.2]"
    out = parse_grounding("shikra", "edge[0.0,0.0,0.1,0.1]", image_sizes=SIZES)
    assert boxes_of(out) == [("edge", (0.0, 0.0, 64.0, 0.0))]  # y in the top padding: clamped to 0


def test_minigpt_v2():
    text = "<p>a dog</p> {<10><20><50><60>}<delim>{<55><20><90><70>} runs"
    out = parse_grounding("minigpt-v2", text, image_sizes=SIZES)
    # x * 6.4, y * 4.8
    assert boxes_of(out) == [("a dog", (64.0, 96.0, 320.0, 288.0)), ("a dog", (352.0, 96.0, 576.0, 336.0))]
    assert out.text == "a dog runs"
    # a referring answer is the box alone; three numbers or a value over 100 stay text
    out = parse_grounding("minigpt-v2", "{<0><0><100><100>} <p>x</p> {<1><2><3>} {<1><2><3><101>}",
                          image_sizes=SIZES)
    assert boxes_of(out) == [("", (0.0, 0.0, 640.0, 480.0))]
    assert out.text == " <p>x</p> {<1><2><3>} {<1><2><3><101>}"


def test_paligemma_is_y_first_over_1024():
    text = "<loc0256><loc0128><loc0768><loc0512> cat ; <loc0000><loc0000><loc1023><loc1023> cat"
    out = parse_grounding("paligemma", text, image_sizes=SIZES)
    # y 256/1024*480 = 120, x 128/1024*640 = 80, y 768/1024*480 = 360, x 512/1024*640 = 320
    assert boxes_of(out) == [("cat", (80.0, 120.0, 320.0, 360.0)), ("cat", (0.0, 0.0, 639.375, 479.5312))]
    assert out.text == "cat ; cat"
    spans_ok(out)
    # three or five location tokens stay text; segmentation tokens are dropped with their box
    text = ("<loc0001><loc0002><loc0003> dog ; <loc0001><loc0002><loc0003><loc0004><loc0005> cow ; "
            "<loc0512><loc0000><loc1024><loc0512><seg001><seg002> sky")
    out = parse_grounding("paligemma", text, image_sizes=SIZES)
    assert boxes_of(out) == [("sky", (0.0, 240.0, 320.0, 480.0))]  # 1024/1024 of H is the bottom edge
    assert out.text == "<loc0001><loc0002><loc0003> dog ; <loc0001><loc0002><loc0003><loc0004><loc0005> cow ; sky"


def test_registry_and_config_errors():
    assert list(GROUNDING_FORMATS) == ["loc", "kosmos2", "qwen-vl", "qwen2-vl", "shikra", "minigpt-v2", "paligemma"]
    with pytest.raises(ValueError, match=r"unknown grounding format 'yolo'; choose from: loc, kosmos2, qwen-vl"):
        build_parser("yolo")
    with pytest.raises(ValueError, match=r"unknown grounding format 'yolo'; choose from: loc"):
        GroundingConfig(format="yolo")
    with pytest.raises(ValueError, match=r"loc_token must contain \{i\}"):
        GroundingConfig(loc_token="<loc>")
    with pytest.raises(ValueError, match="distinct"):
        GroundingConfig(tasks={"grounding": "<p>"})
    cfg = GroundingConfig(grid_size=4)
    assert cfg.added_tokens()[:2] == ["<loc_0>", "<loc_1>"] and len(cfg.added_tokens()) == 16 + 4
    assert GroundingConfig(format="kosmos2", tasks={"grounding": "<grounding>"}).added_tokens() == []
    with pytest.raises(ValueError, match=r"unknown task 'detect'; choose from: grounding, refer"):
        cfg.task_identifier("detect")
    with pytest.raises(ValueError, match="give the answer text"):
        build_parser("loc").parse(image_sizes=SIZES)
    # without an image there is nothing to place boxes on: the markup stays (our tokens are dropped)
    assert parse_grounding("qwen-vl", "<ref>a</ref><box>(1,2),(3,4)</box>").boxes == ()
    assert parse_grounding("loc", "<p>a</p><loc_1><loc_2>").text == "a"


def test_overlay_draws_the_boxes():
    from polymodal.grounding.overlay import draw_boxes, overlay_png

    img = np.zeros((H, W, 3), np.uint8)
    out = draw_boxes(img, [GroundedPhrase("cat", (40.0, 30.0, 120.0, 120.0), 0)])
    assert out.shape == img.shape and img.max() == 0  # a copy
    assert out[75, 40].any() and out[75, 119].any() and out[119, 80].any()  # the outline
    assert not out[75, 80].any() and not out[200, 300].any()  # inside and outside untouched
    assert out[:30, 40:60].any()  # the label above the box
    png = overlay_png(img, [])
    assert Image.open(io.BytesIO(png)).size == (W, H)
    with pytest.raises(ValueError, match="uint8"):
        draw_boxes(img.astype(np.float32), [])


# ---- the model: tiny-grounding end to end ----------------------------------------------------------
@pytest.fixture(scope="module")
def stage():
    from polymodal.pipeline import build_llm_stage

    return build_llm_stage("tiny-grounding")


def test_tokens_prompt_and_answer_end_to_end(stage):
    eng = stage.engine
    grid = stage.preset.grounding.grid()
    ids = {t: eng._single_id(t) for t in grid.all_tokens()}  # each one id
    assert len(set(ids.values())) == 16 * 16 + 4
    # task identifiers are read, never generated; user text typing them stays plain text
    assert {ids["[grounding]"], ids["[refer]"]} <= set(eng._always_suppressed)
    from polymodal.llm import PromptSegment

    assert len(eng.tokenize_segment(PromptSegment("<loc_3>", trusted=False))) > 1
    img = MediaPart(Modality.IMAGE, np.zeros((H, W, 3), np.uint8))
    turns = [Turn("user", (img, TextPart("where is the cat?")))]
    segs = stage.segments(turns, task="refer")
    texts = [s.text for s in segs]
    assert texts.index("[refer]") == texts.index("</Image>") + 1 and texts.index("where is the cat?") == \
        texts.index("[refer]") + 1
    with pytest.raises(ValueError, match=r"unknown task 'count'; choose from: grounding, refer"):
        stage.segments(turns, task="count")

    plan = eng.tokenizer("A <p>cat</p><loc_17><loc_50> sits.", add_special_tokens=False)["input_ids"]
    eos = eng.tokenizer.eos_token_id
    items = list(stage.stream(turns, task="grounding", max_new_tokens=32,
                              propose=lambda step, logits: plan[step] if step < len(plan) else eos))
    streamed = "".join(i.text for i in items if isinstance(i, TextDelta))
    result = items[-1]
    assert isinstance(result, LLMResult) and streamed == result.text == "A cat sits."
    assert [(b.phrase, b.box_px, b.image_index, b.text_span) for b in result.boxes] == \
        [("cat", (40.0, 30.0, 120.0, 120.0), 0, (2, 5))]


def test_preset_without_grounding_refuses_a_task():
    from polymodal.pipeline import LLMStage
    from polymodal.presets import get_preset

    import types

    preset = get_preset("tiny")
    # no model needed: the stage reads only its engine's chat format at construction (the tool-call format, #22)
    st = LLMStage(preset, engine=types.SimpleNamespace(chat_format=preset.chat), encoders={}, input_projectors={})
    with pytest.raises(ValueError, match="has no grounding"):
        st.task_identifier("grounding")


# ---- training: reader and instruct stage -----------------------------------------------------------
@pytest.fixture(scope="module")
def grounding_rows(tmp_path_factory):
    d = tmp_path_factory.mktemp("grounding-data")
    (d / "images").mkdir()
    rows = []
    for k in range(4):
        img = np.full((48, 64, 3), 255, np.uint8)
        x, y = 8 + 10 * k, 4 + 6 * k
        img[y:y + 12, x:x + 16] = (255, 0, 0)
        Image.fromarray(img).save(d / "images" / f"s{k}.png")
        rows.append({"image": f"images/s{k}.png", "phrase": "the red square", "box": [x, y, 16, 12],
                     "box_format": "xywh"})
    rows.append({"image": "images/s0.png", "phrase": "two corners", "box": [[0, 0, 8, 8], [56, 40, 64, 48]],
                 "box_format": "xyxy", "task": "refer", "question": "find {phrase}"})
    p = d / "ground.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_reader_makes_instruct_dialogues(grounding_rows):
    from training.align.data import (
        DataFormatError,
        DataSpec,
        GroundedSpan,
        MediaRef,
        TaskRef,
        detect_format,
        read_records,
    )

    assert detect_format(grounding_rows) == "grounding"
    recs = read_records(DataSpec(str(grounding_rows)))
    user, answer = recs[1].messages
    assert isinstance(user.parts[0], MediaRef) and user.parts[0].path.name == "s1.png"
    assert user.parts[1:] == (TaskRef("grounding"), "where is the red square?")
    # COCO xywh [18, 10, 16, 12] -> xyxy (18, 10, 34, 22); the size read from the file header
    assert answer.parts == (GroundedSpan("the red square", ((18.0, 10.0, 34.0, 22.0),), (64, 48)),)
    assert recs[4].messages[0].parts[1:] == (TaskRef("refer"), "find two corners")
    assert recs[4].messages[1].parts[0].boxes_px == ((0.0, 0.0, 8.0, 8.0), (56.0, 40.0, 64.0, 48.0))
    bad = grounding_rows.parent / "bad.jsonl"
    for row, msg in [({"box_format": None}, r"line 1: box_format must be one of xyxy, xywh"),
                     ({"box": [60, 40, 10, 10], "box_format": "xywh"}, r"line 1: box .* not inside the 64x48 image"),
                     ({"phrase": ""}, "line 1: empty phrase")]:
        bad.write_text(json.dumps({"image": "images/s0.png", "phrase": "p", "box": [1, 1, 2, 2],
                                   "box_format": "xyxy", **row}) + "\n")
        with pytest.raises(DataFormatError, match=msg):
            read_records(DataSpec(str(bad), "grounding"))


def test_sequence_uses_the_grounding_tokens(stage, grounding_rows):
    from training.align.data import DataSpec, read_records
    from training.align.model import IGNORE, SequenceBuilder

    eng = stage.engine
    rec = read_records(DataSpec(str(grounding_rows)))[1]
    ex = SequenceBuilder(eng, {Modality.IMAGE: 1}, 512, grounding=stage.preset.grounding).build(rec)
    tid = {t: eng._single_id(t) for t in ("[grounding]", "<p>", "</p>")}
    # xyxy (18, 10, 34, 22) on 64 x 48, 16 x 16 grid (4 x 3 px cells): cells col 4 row 3 .. col 8 row 7
    a, b = eng._single_id("<loc_52>"), eng._single_id("<loc_120>")
    assert tid["[grounding]"] in ex.ids and ex.labels[ex.ids.index(tid["[grounding]"])] == IGNORE
    i = ex.ids.index(tid["</p>"])
    assert ex.ids[i + 1:i + 3] == (a, b) and ex.labels[i + 1:i + 3] == (a, b)  # the answer's boxes are learned
    assert eng.tokenizer.decode(ex.ids[ex.ids.index(tid["<p>"]) + 1:i]) == "the red square"
    with pytest.raises(ValueError, match="needs a preset with our grounding tokens"):
        SequenceBuilder(eng, {Modality.IMAGE: 1}, 512).build(rec)


def test_instruct_step_trains_the_location_rows(grounding_rows, tmp_path):
    import torch

    from training.align import TrainConfig, load_parts, train
    from training.align.config import DataSource

    parts = load_parts("tiny-grounding", output_modalities=[])
    eng = parts.llm.engine
    used = [eng._single_id(t) for t in ("<loc_52>", "<loc_120>", "<p>", "</p>", "[grounding]")]
    unused = eng._single_id("<loc_200>")
    emb0 = eng.model.get_input_embeddings().weight.detach().clone()
    cfg = TrainConfig(stage="instruct", preset="tiny-grounding", data=[DataSource(path=str(grounding_rows))],
                      out_dir=str(tmp_path / "run"), max_steps=2, batch_size=5, lr=1e-2, lora_r=2,
                      progress=False, tensorboard=False, log_every=1)
    res = train(cfg, parts)
    rows = res.model.rows
    assert set(eng.tokenizer.convert_ids_to_tokens(rows.ids.tolist())) >= {"<loc_52>", "<loc_255>", "[refer]"}
    held = {int(t): k for k, t in enumerate(rows.ids)}
    after = rows.input_rows.detach()
    for t in used:  # the rows of the tokens in the data moved
        assert (after[held[t]] - emb0[t]).abs().max() > 1e-4, eng.tokenizer.convert_ids_to_tokens(t)
    assert torch.equal(after[held[unused]].to(emb0.dtype), emb0[unused])  # a location never seen did not
    from polymodal.export import read_manifest

    assert "token_rows" in read_manifest(res.export_dir)["parts"]


# ---- the HTTP API over a fake stage ----------------------------------------------------------------
class FakeGroundingStage:
    """Answers with a fixed grounded answer in our tokens, parsed as the real stage parses it."""

    answer = "A <p>cat</p><loc_17><loc_50> sits."

    def __init__(self, preset):
        self.parser = preset.grounding.parser()
        self.calls = []

    def stream(self, turns, *, modalities=(), max_new_tokens=None, temperature=None, top_p=None, seed=None,
               should_cancel=None, system=None, task=None, allowed_modalities=None):
        self.calls.append({"task": task, "turns": turns})
        sizes = [(p.data.shape[1], p.data.shape[0]) for t in turns for p in t.parts
                 if isinstance(p, MediaPart) and p.modality is Modality.IMAGE]
        out = self.parser.parse(self.answer, image_sizes=sizes)
        yield TextDelta(out.text)
        yield LLMResult(text=out.text, groups=(), prompt_tokens=3, completion_tokens=5, finish_reason="stop",
                        boxes=out.boxes)

    def describe(self):
        return {"llm": {"init_state": "random"}}


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 200, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _image_part(w=W, h=H):
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(_png(w, h)).decode()}}


@pytest.fixture(scope="module")
def api():
    from polymodal.presets import get_preset
    from services.ingress import build_app
    from services.local import LocalBackend

    preset = get_preset("tiny-grounding").model_copy(update={"decoders": {}})
    llm = FakeGroundingStage(preset)
    return build_app(LocalBackend(preset, llm, {})), llm


def _call(app, method, path, **kw):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30) as c:
            return await c.request(method, path, **kw)

    return asyncio.run(go())


def _chat(app, content, **fields):
    return _call(app, "POST", "/v1/chat/completions",
                 json={"model": "tiny-grounding", "messages": [{"role": "user", "content": content}], **fields})


def test_api_boxes_and_task(api):
    app, llm = api
    r = _chat(app, [{"type": "text", "text": "where is the cat?"}, _image_part()], task="grounding")
    assert r.status_code == 200, r.text
    msg = r.json()["choices"][0]["message"]
    assert msg["content"] == "A cat sits." and llm.calls[-1]["task"] == "grounding"
    assert msg["boxes"] == [{"phrase": "cat", "box": [40.0, 30.0, 120.0, 120.0], "image_index": 0,
                             "text_span": [2, 5]}]
    # two images: the boxes refer to the last one (here 320 x 160: 16 x 16 cells of 20 x 10 px)
    r = _chat(app, [_image_part(), {"type": "text", "text": "and here?"}, _image_part(320, 160)])
    assert r.json()["choices"][0]["message"]["boxes"] == [
        {"phrase": "cat", "box": [20.0, 10.0, 60.0, 40.0], "image_index": 1, "text_span": [2, 5]}]
    assert llm.calls[-1]["task"] is None
    card = _call(app, "GET", "/v1/models").json()["data"][0]
    assert card["grounding"] == {"format": "loc", "tasks": ["grounding", "refer"]}


def test_api_task_errors(api):
    app, _ = api
    r = _chat(app, "hi", task="detect")
    e = r.json()["error"]
    assert r.status_code == 400 and e["param"] == "task" and "choose from: grounding, refer" in e["message"]
    r = _chat(app, "hi", box_overlay=True)
    assert r.status_code == 400 and r.json()["error"]["param"] == "box_overlay"
    from services.ingress import build_app
    from services.local import LocalBackend
    from tests.serve_fakes import fake_stages

    preset, fake, decs = fake_stages()
    plain = build_app(LocalBackend(preset, fake, decs))
    r = _call(plain, "POST", "/v1/chat/completions",
              json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "task": "grounding"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter"
    assert "boxes" not in _call(plain, "POST", "/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}]}).json()["choices"][0]["message"]


def _overlay_pixels(item):
    png = base64.b64decode(item["image_url"]["url"].split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_api_overlay(api):
    """The overlay is an image like the others: in ``images``, referenced at the end of ``content``, marked
    ``overlay`` in ``parts``; its artifact serves the same PNG."""
    app, _ = api
    r = _chat(app, [{"type": "text", "text": "where?"}, _image_part()], task="refer", box_overlay=True)
    assert r.status_code == 200, r.text
    msg = r.json()["choices"][0]["message"]
    parts = msg["parts"]
    assert [p["type"] for p in parts] == ["text", "image_url"] and parts[0]["text"] == "A cat sits."
    part = parts[1]
    assert part["overlay"] is True and part["image_index"] == 0 and part["mime_type"] == "image/png"
    assert msg["content"] == f"A cat sits.\n\n![image 1]({part['image_url']['url']})"
    assert msg["boxes"][0]["text_span"] == [2, 5] and msg["content"][2:5] == "cat"
    px = _overlay_pixels(msg["images"][0])
    assert px.shape == (H, W, 3)
    assert (px[75, 40] != 200).any() and (px[75, 80] == 200).all() and (px[300, 300] == 200).all()
    stored = _call(app, "GET", part["image_url"]["url"].replace("http://test", ""))
    assert stored.status_code == 200 and stored.content == base64.b64decode(
        msg["images"][0]["image_url"]["url"].split(",", 1)[1])


def test_api_streaming_final_chunk_has_the_boxes(api):
    app, _ = api
    r = _chat(app, [{"type": "text", "text": "where?"}, _image_part()], task="grounding", box_overlay=True,
              stream=True)
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    content = "".join(d.get("content", "") for d in deltas)
    assert content.startswith("A cat sits.\n\n![image 1](http://") and content.endswith(".png)")
    assert "/v1/artifacts/art_" in content
    images = [d["images"][0] for d in deltas if "images" in d]
    assert len(images) == 1 and _overlay_pixels(images[0]).shape == (H, W, 3)
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] == "stop" and last["delta"]["boxes"][0]["box"] == [40.0, 30.0, 120.0, 120.0]
