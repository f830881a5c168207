"""The toy-3d recipe's requests (issue #29): 3D request phrasings with disjoint training and held-out banks, read
by the same ``requests`` as the toy three, scored on shape and colour (chance 1/20); adding them changed none of the
toy modalities' draws (their digests were recorded before 3D had phrasings)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pytest

from polymodal.modality import Modality
from training.toyworld import checkers, evaluate, phrasings
from training.toyworld.object3d import Object3DReading

OBJECT3D = Modality.parse("object3d")

# sha256 (16 hex) of json.dumps(requests(m, n, heldout=h, seed=s)), of the sorted held-out prompts, and of the
# plain training questions, recorded on the code before 3D had phrasings (main at 2ceb697)
BEFORE_3D = {
    "audio-False-1000-1": "f5c573814aabea19",
    "audio-False-200-0": "52a18f3f847e0472",
    "audio-False-48-3": "85b18f31e6621e29",
    "audio-False-7-0": "f6125e41bfa08a8b",
    "audio-True-1000-1": "370b333fc3c9d278",
    "audio-True-200-0": "5dba254b73864b97",
    "audio-True-48-3": "b58464f2c061b47a",
    "audio-True-7-0": "f9950f30d9d5147d",
    "audio-all": "d6c70254d499dd6b",
    "image-False-1000-1": "fe5654036c9e0c5d",
    "image-False-200-0": "c207ba562f7ec6d5",
    "image-False-48-3": "4ca1a768c0044d69",
    "image-False-7-0": "9683ecded7ffef45",
    "image-True-1000-1": "909c0aeef287eb0f",
    "image-True-200-0": "58f864d51cf98688",
    "image-True-48-3": "abf0e948c8a24145",
    "image-True-7-0": "0afce136dc45f1db",
    "image-all": "1ef525a0c3178a83",
    "plain-train": "cce842893f743845",
    "video-False-1000-1": "e03d7a02b677edfe",
    "video-False-200-0": "7e3e0f581b3addcf",
    "video-False-48-3": "4cebd719bb5d6b60",
    "video-False-7-0": "ea9c4716519db241",
    "video-True-1000-1": "b9acf709e4e81c94",
    "video-True-200-0": "4614a44f67736b71",
    "video-True-48-3": "0dd80e565e797999",
    "video-True-7-0": "39e2494644c72015",
    "video-all": "164b34ded234b629"
}


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


@pytest.mark.parametrize("modality", ["image", "audio", "video"])
def test_the_toy_modalities_draws_are_byte_identical(modality):
    for heldout in (False, True):
        for n, seed in ((7, 0), (48, 3), (200, 0), (1000, 1)):
            got = _digest(phrasings.requests(modality, n, heldout=heldout, seed=seed))
            assert got == BEFORE_3D[f"{modality}-{heldout}-{n}-{seed}"], (modality, heldout, n, seed)
    assert _digest(sorted(phrasings.all_prompts(modality, heldout=True))) == BEFORE_3D[f"{modality}-all"]


def test_the_plain_training_questions_are_unchanged_and_disjoint_from_3d_requests():
    assert _digest(phrasings.plain_training_questions()) == BEFORE_3D["plain-train"]


def test_3d_requests_cover_every_combination_and_the_banks_are_disjoint():
    held = phrasings.requests("object3d", 200, heldout=True)
    train = phrasings.requests(OBJECT3D, 400, heldout=False, seed=1)
    assert len(held) == 200 and len(phrasings.ATTRIBUTE_COMBOS[OBJECT3D]) == 40  # 5 shapes x 4 colours x 2 sizes
    asked = Counter((a["shape"], a["colour"]) for _, _, a in held)  # every caption states shape and colour
    assert len(asked) == 20 and set(asked.values()) == {10}
    assert held == phrasings.requests("object3d", 200, heldout=True)  # seeded
    phrasings.assert_disjoint([r for r, _, _ in held], [r for r, _, _ in train])
    phrasings.assert_disjoint(phrasings.all_prompts(OBJECT3D, heldout=True),
                              phrasings.all_prompts(OBJECT3D, heldout=False))
    for m in (Modality.IMAGE, Modality.AUDIO, Modality.VIDEO):  # nor another modality's training request
        phrasings.assert_disjoint(phrasings.all_prompts(OBJECT3D, heldout=True), phrasings.all_prompts(m, heldout=False))
    assert all(caption in request for request, caption, _ in held)


def test_register_requests_refuses_overlap_and_a_second_registration():
    with pytest.raises(ValueError, match="has request phrasings already"):
        phrasings.register_requests(OBJECT3D, captions=("a {colour} x",), train=("{caption}",),
                                    heldout=("Give me {caption}.",), lead_ins=("{caption}",), combos=[{"colour": "red"}])


def test_3d_readings_are_scored_on_shape_and_colour():
    assert evaluate.SCORED[OBJECT3D] == ("shape", "colour")
    asked = [{"shape": "cube", "colour": "red", "size": "large"}, {"shape": "torus", "colour": "blue"},
             {"shape": "sphere", "colour": "green"}]
    readings = [Object3DReading("cube", "red", "small"),  # the size is reported, not scored
                Object3DReading("torus", "green"), evaluate.empty_reading("object3d")]
    s = evaluate.score_readings("object3d", readings, asked)
    assert (s.correct, s.total, s.per_attribute) == (1, 3, {"shape": 2, "colour": 1})
    assert evaluate.empty_reading(OBJECT3D) == Object3DReading(None, None)
    assert evaluate.empty_reading("video") == checkers.VideoReading(None)  # the others' unchanged
    prompts = evaluate.toy_prompts("object3d", 40)  # the decoder-alone prompts: every one asks shape and colour
    assert all(a["shape"] in p and a["colour"] in p for p, a in prompts)
