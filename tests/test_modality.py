"""The modality registry (issue #19): ``Modality`` an open, interned ``str`` type with one ``ModalitySpec`` each;
the built-ins' facts, pickling, pydantic / YAML, registration rules, and the facts the rest of the code reads from
the specs (signal tokens, MIME types, content parts, option fields)."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest
from pydantic import BaseModel

from polymodal.config import DecoderDefaults, PresetConfig
from polymodal.media_io import MediaCodec, modality_of_mime, sniff_modality
from polymodal.modality import (
    Modality,
    ModalitySpec,
    modality_of_content_part,
    modality_spec,
    register_modality,
    specs,
    unregister_modality,
)
from polymodal.signals import SignalSpec

BUILTIN = (Modality.IMAGE, Modality.AUDIO, Modality.VIDEO, Modality.OBJECT3D)  # polymodal.media's, in its order
NEXTGPT = BUILTIN[:3]  # NExT-GPT's three (3D: tests/test_object3d.py)


def test_builtins_are_interned_in_registration_order():
    assert list(Modality) == list(BUILTIN) and len(Modality) == 4
    assert [s.name for s in specs()] == ["image", "audio", "video", "object3d"]
    for m in BUILTIN:
        assert Modality(m.value) is m is Modality.parse(f" {m.value.upper()} ") is Modality(m)
        assert m == m.value and str(m) == m.value == f"{m}" and m.name == m.value.upper()
        assert repr(m) == f"Modality.{m.name}" and m in Modality and m.value in Modality
        assert m.spec is modality_spec(m.value) and m.spec.name == m.value
    assert "text" not in Modality and 3 not in Modality
    assert {Modality.IMAGE: 1}["image"] == 1  # a str key: the wire name finds it


def test_unknown_names_list_the_choices():
    for bad in ("hologram", "", "IMAGE"):  # the constructor is exact; parse() folds case
        with pytest.raises(ValueError, match=r"unknown modality .*choose from: image, audio, video, object3d"):
            Modality(bad)
    with pytest.raises(ValueError, match="choose from: image, audio, video, object3d"):
        Modality.parse("hologram")
    with pytest.raises(AttributeError):
        Modality.HOLOGRAM  # noqa: B018
    assert Modality.parse_list("image, Audio,image,,video,OBJECT3D") == list(BUILTIN)


def test_pickle_and_copy_give_the_interned_instance():
    import copy

    for m in BUILTIN:
        assert pickle.loads(pickle.dumps(m)) is m
        assert copy.copy(m) is m and copy.deepcopy(m) is m
    assert pickle.loads(pickle.dumps({Modality.AUDIO: [Modality.VIDEO]})) == {Modality.AUDIO: [Modality.VIDEO]}


def test_pydantic_validates_from_and_serialises_to_strings():
    class M(BaseModel):
        one: Modality
        many: dict[Modality, int] = {}

    got = M.model_validate({"one": "video", "many": {"image": 1, "audio": 2}})
    assert got.one is Modality.VIDEO and list(got.many) == [Modality.IMAGE, Modality.AUDIO]
    assert all(type(k) is Modality for k in got.many)
    dumped = got.model_dump(mode="json")
    assert dumped == {"one": "video", "many": {"image": 1, "audio": 2}}
    assert all(type(k) is str for k in dumped["many"]) and type(dumped["one"]) is str
    assert json.loads(got.model_dump_json()) == dumped
    schema = M.model_json_schema()
    assert schema["properties"]["one"] == {"type": "string", "enum": ["image", "audio", "video", "object3d"],
                                           "title": "One"}
    with pytest.raises(ValueError, match="unknown modality 'hologram'"):
        M.model_validate({"one": "hologram"})
    with pytest.raises(ValueError, match="a modality is a string"):
        M.model_validate({"one": 3})


def test_presets_yaml_keys_are_plain_names():
    from polymodal.presets import get_preset

    for name in ("tiny", "nextgpt-7b-random"):
        p = get_preset(name)
        text = p.to_yaml()
        assert "decoders:\n  image:" in text and "!!python" not in text
        assert PresetConfig.from_yaml(text) == p


def test_builtin_facts_feed_the_signal_tokens():
    spec = SignalSpec.build()
    assert {m: m.spec.default_signal_count for m in BUILTIN} \
        == {Modality.IMAGE: 4, Modality.AUDIO: 8, Modality.VIDEO: 24, Modality.OBJECT3D: 4}  # NExT-GPT's + 3D
    # by default NExT-GPT's three; 3D (added later) only where a preset lists or decodes it
    assert {m: spec.count(m) for m in spec.modalities} == {Modality.IMAGE: 4, Modality.AUDIO: 8, Modality.VIDEO: 24}
    assert spec.tokens[Modality.AUDIO][:2] == ("<AUD0>", "<AUD1>")
    assert spec.input_markers[Modality.VIDEO] == ("<Video>", "</Video>")
    assert SignalSpec.build({"image": 2}, "[{prefix}{i}]").tokens == {Modality.IMAGE: ("[IMG0]", "[IMG1]")}


def test_a_preset_that_decodes_an_unlisted_modality_gets_its_default_count():
    from polymodal.presets import get_preset

    data = get_preset("tiny").model_dump()
    data["signals"]["counts"] = {Modality.VIDEO: 2}
    p = PresetConfig.model_validate(data)
    assert p.signals.counts == {Modality.VIDEO: 2, Modality.IMAGE: 4, Modality.AUDIO: 8}  # listed ones first


def test_mime_types_content_parts_and_sniffing_come_from_the_specs():
    assert modality_of_mime("image/png") is Modality.IMAGE and modality_of_mime("Audio/X-WAV") is Modality.AUDIO
    assert modality_of_mime("video/mp4; codecs=avc1") is Modality.VIDEO and modality_of_mime("text/plain") is None
    for m in BUILTIN:
        assert modality_of_content_part(m.spec.content_part) is m
    assert modality_of_content_part("input_audio") is None
    assert sniff_modality(b"\x89PNG\r\n\x1a\n" + bytes(8)) is Modality.IMAGE
    assert sniff_modality(b"\x00\x00\x00\x18ftypM4A " + bytes(8)) is Modality.AUDIO  # before video's catch-all
    assert sniff_modality(b"\x00\x00\x00\x18ftypheic" + bytes(8)) is Modality.IMAGE
    assert sniff_modality(b"\x00\x00\x00\x18ftypisom" + bytes(8)) is Modality.VIDEO


def test_answer_references_and_fields():
    assert Modality.IMAGE.spec.reference(1, "u") == "![image 1](u)"
    assert Modality.AUDIO.spec.reference(2, "u") == "[audio 2](u)"
    assert [m.spec.answer_field for m in BUILTIN] == ["images", "audios", "videos", "objects3d"]
    assert [m.spec.message_slot for m in BUILTIN] == [None, "audio", None, None]
    assert [m.spec.normalize_cond for m in BUILTIN] == [False, True, False, False]
    assert [m.spec.tag for m in BUILTIN] == ["Image", "Audio", "Video", "Object3d"]
    assert [(m.spec.codec.mime_type, m.spec.codec.ext) for m in BUILTIN] == [
        ("image/png", "png"), ("audio/wav", "wav"), ("video/mp4", "mp4"), ("application/ply", "ply")]


def test_option_fields_match_the_request_schemas():
    """A modality's ``option_fields`` are exactly the DecoderDefaults fields its chat-request options model has."""
    from services.schemas import ChatCompletionRequest

    # every modality registered when the schema is built has its options field, 3D included (from its spec)
    assert Modality.OBJECT3D.value in ChatCompletionRequest.model_fields
    for m in (*NEXTGPT, Modality.OBJECT3D):
        model = ChatCompletionRequest.model_fields[m.value].annotation.__args__[0]
        assert set(model.model_fields) & set(DecoderDefaults.model_fields) == set(m.spec.option_fields), m


def _spec(**changes) -> ModalitySpec:
    base = dict(name="hologram", label="hologram", noun="hologram", signal_prefix="HOL", default_signal_count=2,
                input_markers=("<Hologram>", "</Hologram>"), content_part="hologram_url", answer_field="holograms",
                codec=MediaCodec())
    return ModalitySpec(**{**base, **changes})


def test_registration_rules():
    spec = _spec()
    m = register_modality(spec)
    try:
        assert m is Modality("hologram") is Modality.HOLOGRAM and list(Modality)[-1] is m
        assert register_modality(_spec()) is m  # the identical spec again: a no-op
        assert Modality.register(spec) is m
        with pytest.raises(ValueError, match="already registered with another spec"):
            register_modality(_spec(default_signal_count=3))
        assert m.spec.codec.modality is m
        with pytest.raises(Exception, match="not read from files"):
            m.spec.codec.decode(b"x", limits=None, options=None)
    finally:
        unregister_modality(m)
    assert list(Modality) == list(BUILTIN)
    with pytest.raises(ValueError, match="unknown modality"):
        Modality("hologram")
    for clash, value in (("signal_prefix", "IMG"), ("content_part", "audio_url"), ("answer_field", "videos")):
        with pytest.raises(ValueError, match=f"{clash} .* is already"):
            register_modality(_spec(**{clash: value}))
    assert list(Modality) == list(BUILTIN)
    with pytest.raises(TypeError):
        register_modality({"name": "hologram"})


@pytest.mark.parametrize(("field", "value", "says"), [
    ("name", "Hologram", "lower-case identifier"), ("name", "text", "other than 'text'"),
    ("signal_prefix", "H-L", "alphanumeric"), ("default_signal_count", 0, ">= 1"),
    ("input_markers", ("<H>",), "pair"), ("option_fields", ("height_px", "size"), "unknown option fields"),
])
def test_a_malformed_spec_is_refused(field, value, says):
    with pytest.raises(ValueError, match=says):
        _spec(**{field: value})


def test_specs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Modality.IMAGE.spec.default_signal_count = 5
