"""The chat request's per-medium options come from the modality specs (one mechanism: ``services.schemas.MEDIUM_OPTIONS``,
from each spec's ``option_fields``), and an option nothing would read is refused with 400, never ignored."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from polymodal.modality import DECODER_OPTION_FIELDS, Modality, specs
from services import schemas
from tests.test_ingress import AUDIO, IMAGE, VIDEO, chat, err, make, user

OBJECT3D = Modality.parse("object3d")


def test_every_registered_modality_has_an_options_field_made_from_its_spec():
    assert set(schemas.OPTION_FIELDS) == set(DECODER_OPTION_FIELDS)  # every option a spec may declare
    for spec in specs():
        model = schemas.MEDIUM_OPTIONS[spec.name]
        extra = list(schemas.SPOKEN_FIELDS) if spec.message_slot is not None else []
        assert list(model.model_fields) == [*spec.option_fields, *extra], spec.name
        assert spec.name in schemas.ChatCompletionRequest.model_fields
    assert (schemas.ImageOptions, schemas.AudioOptions, schemas.VideoOptions) == tuple(
        schemas.MEDIUM_OPTIONS[m] for m in ("image", "audio", "video"))


def test_the_3d_options_are_read_and_checked():
    req = schemas.ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "object3d": {"num_inference_steps": 3}})
    assert req.object3d.num_inference_steps == 3 and req.object3d.guidance_scale is None
    for bad in ({"height_px": 64}, {"num_inference_steps": 0}, {"bogus": 1}):  # 3D has no size; bounds; typos
        with pytest.raises(ValidationError):
            schemas.ChatCompletionRequest.model_validate(
                {"model": "m", "messages": [{"role": "user", "content": "x"}], "object3d": bad})


@pytest.fixture(scope="module")
def audio_only():
    app, llm, _ = make(modalities=(AUDIO,))
    return app, llm


@pytest.mark.parametrize("field,options,param", [
    ("object3d", {"num_inference_steps": 3}, "object3d.num_inference_steps"),
    ("image", {"height_px": 48}, "image.height_px"),
    ("video", {"fps": 4}, "video.fps"),
])
def test_options_of_a_medium_the_server_cannot_make_are_400(audio_only, field, options, param):
    app, llm = audio_only
    before = len(llm.calls)
    r = chat(app, user("x"), **{field: options})
    assert r.status_code == 400, r.text
    e = err(r)
    assert e["param"] == param and e["code"] == "unsupported_parameter" and field in e["message"]
    assert len(llm.calls) == before  # refused before any model work


def test_a_typo_in_the_3d_options_is_400_naming_it(audio_only):
    app, _ = audio_only
    r = chat(app, user("x"), object3d={"steps": 3})
    assert r.status_code == 400 and err(r)["param"] == "object3d.steps"


def test_options_of_a_served_medium_still_apply_and_voice_alone_is_not_a_decoder_option():
    app, _, decs = make(modalities=(IMAGE, VIDEO))
    r = chat(app, user("x"), modalities=["image"], image={"height_px": 48}, video={"fps": 4})
    assert r.status_code == 200, r.text
    assert decs[IMAGE].calls[-1]["options"].height_px == 48
    # audio's spoken-answer fields (voice, format) are not decoder options: not refused as unread ones here
    r = chat(app, user("x"), audio={"format": "wav"})
    assert r.status_code == 200, r.text
