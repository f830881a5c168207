"""``bench/toyworld.py``'s scoring helpers (no model, no cluster).

The whole ``--quick`` run (Ray cluster + the toy preset's three decoders + the in-process control) takes about
5 minutes on 2 cores on top of a toy build, so it is not run here; these tests cover what decides its figures:
held-out requests, chance, the answer word match and the input images.
"""

from __future__ import annotations

import io
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import toyworld as TW

from training.toyworld import checkers
from training.toyworld.phrasings import all_prompts, assert_disjoint


@pytest.mark.parametrize("modality", TW.MODALITIES)
def test_requests_are_heldout_and_mixed(modality):
    reqs = TW.draw_requests(modality, 12, seed=0)
    assert len(reqs) == 12
    info = TW.check_heldout(modality, [r for r, _, _ in reqs])
    assert info["common"] == 0 and info["training_prompts"] > 0
    # cut from whole shuffled cycles: a small N still mixes the first attribute (video: not all "left")
    first = {"image": "colour", "audio": "pitch", "video": "direction"}[modality]
    assert len({a[first] for _, _, a in reqs}) > 1
    with pytest.raises(AssertionError):  # the check can fail: a training prompt is caught
        TW.check_heldout(modality, [next(iter(all_prompts(modality, heldout=False)))])


def test_input_questions_are_not_training_questions():
    train = TW.training_questions()
    assert "What do you see in this image?" in train and "Describe this image briefly." in train
    assert_disjoint(TW.INPUT_QUESTIONS, train)


def test_chance_per_modality():
    assert TW.hit_probability("image", {"colour": "red", "shape": "circle"}) == pytest.approx(1 / 12)
    assert TW.hit_probability("audio", {"pitch": "low"}) == pytest.approx(1 / 3)
    assert TW.hit_probability("audio", {"pitch": "low", "timbre": "sine"}) == pytest.approx(1 / 6)
    assert TW.hit_probability("video", {"direction": "up", "colour": "red", "shape": "circle"}) == pytest.approx(1 / 4)
    # 3D: shape and colour scored (5 x 4), the size asked but not scored
    assert TW.hit_probability("object3d", {"size": "large", "colour": "red", "shape": "torus"}) == pytest.approx(1 / 20)
    c = TW.chance([0.25] * 100)
    assert c["chance"] == pytest.approx(0.25)
    assert c["chance_plus_3_sigma"] == pytest.approx(0.25 + 3 * math.sqrt(100 * 0.25 * 0.75) / 100)


def test_answer_word_match():
    want = {"colour": "blue", "shape": "circle"}
    assert TW.name_hits("It is a Blue circle.", want) == {"colour": True, "shape": True, "both": True}
    assert TW.name_hits("The shape is a circle.", want) == {"colour": False, "shape": True, "both": False}
    # naming every word does not count: another colour named too is a miss
    assert TW.name_hits("red, blue, green circles", want)["colour"] is False
    assert TW.name_hits("", want)["both"] is False
    assert TW.name_hits("a bluebird encircled", want) == {"colour": False, "shape": False, "both": False}


def test_input_images_balanced_and_readable():
    images = TW.input_images(24)
    assert Counter((a["colour"], a["shape"]) for _, a in images) == Counter(
        {(c, s): 2 for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle")})
    read = 0
    for png, attrs in images:
        arr = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        assert arr.shape == (64, 64, 3)
        read += checkers.matches(checkers.check_image(arr), attrs)
    assert read >= 22  # the checker reads what the bench scores the answers against
    assert checkers.check_bytes("image", images[0][0]) == checkers.check_image(
        np.asarray(Image.open(io.BytesIO(images[0][0])).convert("RGB")))


def test_data_url_bytes():
    assert TW.data_url_bytes("data:image/png;base64,aGk=") == b"hi"
    with pytest.raises(ValueError, match="data URL"):
        TW.data_url_bytes("http://example.com/x.png")


def test_plain_questions_are_plain_heldout_and_distinct():
    from training.toyworld.phrasings import plain_questions

    qs = plain_questions(200)
    assert len(qs) == len(set(qs)) == 200 and qs == plain_questions(200)
    kinds = Counter("capital" if "capital of" in q else "define" if ("Define" in q or "mean?" in q)
                    else "arithmetic" if any(c.isdigit() for c in q) else "fact" for q in qs)
    assert min(kinds.values()) >= 30, kinds  # a mix, not one template
    for m in TW.MODALITIES:  # none is a request of the toy world (train or held-out bank)
        assert_disjoint(qs, all_prompts(m, heldout=False) | all_prompts(m, heldout=True))
    assert_disjoint(qs, TW.training_questions())
    with pytest.raises(AssertionError):
        plain_questions(201)


def test_answer_media_counts_the_generated_media_of_an_answer():
    message = {"content": "Here ![image 1](u) [audio 1](a) ![image 2](o)",
               "images": [{"type": "image_url", "image_url": {"url": "u"}},
                          {"type": "image_url", "image_url": {"url": "o"}, "overlay": True}],
               "audios": [{"type": "audio_url", "audio_url": {"url": "a"}}], "audio": {"data": "x"}}
    assert TW.answer_media(message) == ["image", "audio"]
    assert TW.answer_media({"content": "4"}) == [] and TW.answer_media({"content": "4", "audio": None}) == []


def test_benches_read_media_and_text_from_a_real_answer():
    """The benches' answer readers (``bench/_common.py``) against an answer of the ingress itself (fake stages):
    the medium's bytes from ``images`` / ``audios``, the words without the media references."""
    import _common as C

    from tests.test_ingress import chat, data_of, make, user

    app, _, _ = make()
    message = chat(app, user("draw and sing"), modalities=["image", "audio"], seed=3).json()["choices"][0]["message"]
    assert "![image 1](" in message["content"] and C.answer_text(message) == "Seen 0 media. DRAW AND SING"
    png = data_of(C.answer_media(message, "image")[0])
    assert Image.open(io.BytesIO(png)).format == "PNG"
    assert data_of(C.answer_media(message, "audio")[0])[:4] == b"RIFF" and C.answer_media(message, "video") == []
