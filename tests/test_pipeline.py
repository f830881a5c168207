"""AnyToAnyPipeline on the tiny preset: output path end to end, input spans, conversations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polymodal.modality import Modality
from polymodal.pipeline import AnyToAnyPipeline, interleave
from polymodal.types import MediaPart, SignalGroup, TextPart, Turn
from tests.media_fixtures import photo

IMAGE, AUDIO, VIDEO = Modality.IMAGE, Modality.AUDIO, Modality.VIDEO


@pytest.fixture(scope="module")
def pipe():
    return AnyToAnyPipeline.from_preset("tiny")


def _user(*parts) -> Turn:
    return Turn("user", tuple(TextPart(p) if isinstance(p, str) else p for p in parts))


def _img(name: str) -> MediaPart:
    return MediaPart(IMAGE, photo(name, 64), name=name)


def test_generate_all_modalities_in_order(pipe):
    ans = pipe.generate("make a picture, a sound and a clip", modalities=[IMAGE, AUDIO, VIDEO], seed=11)
    media = ans.media
    assert [m.modality for m in media] == [IMAGE, AUDIO, VIDEO]
    img, aud, vid = media
    assert img.data.dtype == np.uint8 and img.data.shape == (32, 32, 3)
    assert aud.data.dtype == np.float32 and aud.data.ndim == 1 and aud.sample_rate_hz > 0
    assert vid.data.shape[0] == 4 and vid.data.shape[-1] == 3
    # one seed per medium, reported, base + output index
    assert [m.seed for m in media] == [11, 12, 13] == [ans.seeds[i] for i in range(3)]
    d = ans.describe
    assert d["llm"]["init_state"] == "random" and d["decoders"]["image"]["init_state"] == "random"


def test_same_seed_same_answer_and_other_seed_differs(pipe):
    a = pipe.generate("draw", modalities=[IMAGE], seed=5)
    b = pipe.generate("draw", modalities=[IMAGE], seed=5)
    c = pipe.generate("draw", modalities=[IMAGE], seed=6)
    assert np.array_equal(a.media[0].data, b.media[0].data)
    assert not np.array_equal(a.media[0].data, c.media[0].data)


def test_medium_comes_from_the_signal_states(pipe):
    """The decoder stage is driven by the group's states: other states, other image (same seed)."""
    res = pipe.llm_stage.generate([_user("draw")], modalities=[IMAGE], seed=0)
    g = res.groups[0]
    stage = pipe.decoder_stages[IMAGE]
    same = stage.render([g, g], [3, 3])
    other = SignalGroup(IMAGE, g.hidden_states + 1.0, g.token_embeds, 0, 0)
    diff = stage.render([other], [3])
    assert np.array_equal(same[0].data, same[1].data)
    assert not np.array_equal(same[0].data, diff[0].data)


def test_unknown_modality_for_model_is_refused(pipe):
    with pytest.raises(ValueError, match="no image decoder"):
        AnyToAnyPipeline(pipe.preset, pipe.llm_stage, {}).generate("x", modalities=[IMAGE])


def test_interleave_keeps_output_order():
    groups = [SignalGroup(IMAGE, np.zeros((1, 1)), np.zeros((1, 1)), 0, 5),
              SignalGroup(AUDIO, np.zeros((1, 1)), np.zeros((1, 1)), 1, 11)]
    parts = interleave("Here: then more", groups, ["IMG", "AUD"])
    assert parts == [TextPart("Here:"), "IMG", TextPart("then"), "AUD", TextPart("more")]


# ---- input path -----------------------------------------------------------------------------------


def _prompt(pipe, turns):
    segs = pipe.llm_stage.segments(turns)
    embeds, ids = pipe.llm_stage.engine.build_prompt(segs)
    return embeds[0], ids


def _span(pipe, ids, modality, which=0):
    begin, end = pipe.llm_stage.engine.marker_ids[modality]
    starts = [i for i, t in enumerate(ids) if t == begin]
    ends = [i for i, t in enumerate(ids) if t == end]
    return starts[which], ends[which]


def test_changing_one_image_changes_only_its_span(pipe):
    a, ids = _prompt(pipe, [_user("look", _img("astronaut"), "and", _img("coffee"), "compare")])
    b, ids_b = _prompt(pipe, [_user("look", _img("astronaut"), "and", _img("rocket"), "compare")])
    assert ids == ids_b
    s0, e0 = _span(pipe, ids, IMAGE, 0)
    s1, e1 = _span(pipe, ids, IMAGE, 1)
    changed = (a - b).abs().amax(-1) > 1e-6
    assert changed[s1 + 1 : e1].all()
    assert not changed[: s1 + 1].any() and not changed[e1:].any()
    assert e0 - s0 == 2  # one token per medium (linear input projector, NExT-GPT)


def test_swapping_two_media_swaps_their_spans(pipe):
    a, ids = _prompt(pipe, [_user(_img("chelsea"), "vs", _img("rocket"))])
    b, _ = _prompt(pipe, [_user(_img("rocket"), "vs", _img("chelsea"))])
    s0, e0 = _span(pipe, ids, IMAGE, 0)
    s1, e1 = _span(pipe, ids, IMAGE, 1)
    torch.testing.assert_close(a[s0 + 1 : e0], b[s1 + 1 : e1])
    torch.testing.assert_close(a[s1 + 1 : e1], b[s0 + 1 : e0])
    assert not torch.allclose(a[s0 + 1 : e0], a[s1 + 1 : e1])


def test_second_turn_carries_the_first_turns_generated_image(pipe):
    first = pipe.generate([_user("draw a cat")], modalities=[IMAGE], seed=1)
    produced = first.media[0]
    assistant = Turn("assistant", (TextPart(first.text), MediaPart(IMAGE, produced.data)))
    turns = [_user("draw a cat"), assistant, _user("now describe it")]
    emb, ids = _prompt(pipe, turns)
    s, e = _span(pipe, ids, IMAGE, 0)
    expected = pipe.llm_stage.encode_media(MediaPart(IMAGE, produced.data))
    torch.testing.assert_close(emb[s + 1 : e], expected)
    # another image in that turn would give another span
    other = pipe.llm_stage.encode_media(_img("rocket"))
    assert not torch.allclose(emb[s + 1 : e], other)
    ans = pipe.generate(turns, seed=2, max_new_tokens=8)
    assert isinstance(ans.text, str)


def test_summed_inputs_sum_consecutive_media_into_one_span(pipe):
    from polymodal.pipeline import LLMStage

    summed = LLMStage(pipe.preset.model_copy(update={"summed_inputs": True}), pipe.llm_stage.engine,
                      pipe.llm_stage.encoders, pipe.llm_stage.input_projectors)
    a, b, c = _img("astronaut"), _img("coffee"), _img("rocket")
    segs = summed.turn_segments(_user(a, b, "then", c))
    spans = [s.embeds for s in segs if s.embeds is not None]
    assert len(spans) == 2
    enc = pipe.llm_stage.encode_media
    torch.testing.assert_close(spans[0], enc(a) + enc(b))
    torch.testing.assert_close(spans[1], enc(c))
