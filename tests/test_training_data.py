"""Training data readers: NExT-GPT's on-disk formats (records shaped as in its repository's data/
folder), MosIT records, JSONL and caption lists; stage conversion; clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from polymodal.modality import Modality
from training.align import TrainConfig
from training.align.config import DataSource
from training.align.data import (
    CaptionPair,
    DataFormatError,
    DataSpec,
    Dialogue,
    MediaRef,
    MissingMediaError,
    check_media,
    detect_format,
    parse_data_arg,
    read_records,
)
from training.align.stages import stage_spec

IMAGE, AUDIO, VIDEO = Modality.IMAGE, Modality.AUDIO, Modality.VIDEO


def _write(path: Path, body) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body) if not isinstance(body, str) else body)
    return path


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_pair_json_of_each_dataset(tmp_path):
    cc3m = _write(tmp_path / "cc3m" / "cc3m.json", [
        {"caption": "players wait for a conversion", "id": "001319946", "image_name": "001319946.jpg"},
        {"caption": "rugby player during the match .", "id": "001315729", "image_name": "001315729.jpg"}])
    _touch(tmp_path / "cc3m" / "images" / "001319946.jpg")
    audio = _write(tmp_path / "audiocap" / "audiocap.json", [
        {"audio_id": 106158, "audio_name": "106158.wav", "caption": "A train running and then a horn honking"}])
    video = _write(tmp_path / "webvid" / "webvid.json", [
        {"caption": "Roses on the garden in the afternoon", "id": 12949985, "video_name": "00169473.mp4"}])
    recs = read_records(DataSpec(str(cc3m)))
    assert [type(r) for r in recs] == [CaptionPair, CaptionPair]
    assert recs[0].media == MediaRef(IMAGE, tmp_path / "cc3m" / "images" / "001319946.jpg",
                                     "players wait for a conversion")
    assert recs[1].source.endswith("cc3m.json row 1")
    (a,) = read_records(DataSpec(str(audio)))
    (v,) = read_records(DataSpec(str(video), format="webvid"))
    assert (a.modality, a.media.path.name) == (AUDIO, "106158.wav")
    assert a.caption == "A train running and then a horn honking"
    assert (v.modality, v.media.path.parent.name) == (VIDEO, "videos")
    check_media(recs[:1], inputs=True, outputs=False)
    with pytest.raises(MissingMediaError, match=r"cc3m.json row 1: image file not found: .*001315729.jpg"):
        check_media(recs, inputs=True, outputs=False)


def test_comprehension_and_generation_json(tmp_path):
    comp = _write(tmp_path / "cc3m_comprehension.json", [{
        "input_image": "001312382.jpg",
        "conversations": [{"from": "human", "value": "<image>\nWhat's the image really about?"},
                          {"from": "gpt", "value": "cricket player was named award category"}]}])
    gen = _write(tmp_path / "cc3m_generation.json", [{
        "output_image": "001312382.jpg", "image_captions": "players wait for a conversion",
        "image_caption_embeddings": "001312382.jpg.npy",
        "conversations": [{"from": "human", "value": "illustrate a vision where players wait for a conversion"},
                          {"from": "gpt", "value": "how about this? <image>"}]}])
    (tmp_path / "embed").mkdir()
    np.save(tmp_path / "embed" / "001312382.jpg.npy", np.zeros((8, 32), np.float32))
    assert detect_format(comp) == "comprehension" and detect_format(gen) == "generation"
    (c,) = read_records(DataSpec(str(comp)))
    user, answer = c.messages
    assert user.role == "user" and isinstance(user.parts[0], MediaRef)
    assert user.parts[1] == "What's the image really about?"
    assert answer.parts == ("cricket player was named award category",)
    (g,) = read_records(DataSpec(str(gen)))
    out = g.messages[1].parts
    assert out[0] == "how about this?" and out[1].caption == "players wait for a conversion"
    assert out[1].embedding_path == tmp_path / "embed" / "001312382.jpg.npy"
    # stage conversion: comprehension is encode data, generation is decode data
    cfg = TrainConfig(stage="decode", data=[DataSource(path="builtin")], out_dir=str(tmp_path))
    assert stage_spec("encode").to_dialogue(c, cfg) is c and stage_spec("decode").to_dialogue(c, cfg) is None
    assert stage_spec("decode").to_dialogue(g, cfg) is g and stage_spec("encode").to_dialogue(g, cfg) is None


def test_text_to_x_instruction_json(tmp_path):
    t2x = _write(tmp_path / "audio_t2x.json", [{
        "audio_captions": ["A vehicle engine works at regular pace and a man speeches"],
        "audio_caption_embeddings": ["34706.wav.npy"],
        "conversations": [
            {"from": "human", "value": "I need the sound of an engine and a speech.", "input_modality": "text"},
            {"from": "gpt", "value": "Absolutely! Here it is: <audio>",
             "caption": "A vehicle engine works at regular pace and a man speeches", "output_modality": "audio"}]}])
    assert detect_format(t2x) == "t2x"
    (d,) = read_records(DataSpec(str(t2x)))
    text, medium = d.messages[1].parts
    assert text == "Absolutely! Here it is:" and medium.modality is AUDIO and medium.path is None
    assert medium.caption == "A vehicle engine works at regular pace and a man speeches"
    check_media([d], inputs=True, outputs=False)  # no user media, no output files needed
    with pytest.raises(MissingMediaError, match="has no file"):
        check_media([d], inputs=False, outputs=True)


def test_mosit_records_refer_to_media_by_name(tmp_path):
    rec = {
        "image_list": [{"name": "cat.png", "data_source": "skimage", "caption": "a cat"}],
        "audio_list": [{"name": "purr.wav", "data_source": "espeak", "caption": "a cat purrs"}],
        "video_list": [],
        "conversation": [
            {"from": "human", "value": "Look at my cat <Image>cat.png</Image> what is it doing?"},
            {"from": "gpt", "value": "It sits. It might sound like this: <Audio> purr.wav </Audio>"},
        ],
    }
    path = _write(tmp_path / "mosit" / "mosit.json", [rec])
    _touch(tmp_path / "mosit" / "images" / "cat.png")
    assert detect_format(path) == "mosit"
    (d,) = read_records(DataSpec(str(path)))
    u, a = d.messages
    assert u.parts[0] == "Look at my cat" and u.parts[2] == "what is it doing?"
    assert u.parts[1] == MediaRef(IMAGE, tmp_path / "mosit" / "images" / "cat.png", "a cat")
    assert a.parts[0] == "It sits. It might sound like this:" and a.parts[1].modality is AUDIO
    assert [m.modality for m in d.media("user")] == [IMAGE] and [m.modality for m in d.media("assistant")] == [AUDIO]
    check_media([d], inputs=True, outputs=False)
    cfg = TrainConfig(stage="instruct", data=[DataSource(path="builtin")], out_dir=str(tmp_path), modalities=[IMAGE])
    assert stage_spec("instruct").to_dialogue(d, cfg) is None  # an audio output outside --modalities


def test_jsonl_captions_and_builtin(tmp_path):
    jl = _write(tmp_path / "d.jsonl", json.dumps({"path": "a.png", "caption": " a dog ", "modality": "image"}) + "\n\n"
                + json.dumps({"caption": "rain on a roof"}) + "\n")
    with pytest.raises(DataFormatError, match=r"d.jsonl line 3: no 'modality' field"):
        read_records(DataSpec(str(jl)))
    recs = read_records(DataSpec(str(jl), modality=AUDIO))
    assert [(r.modality, r.caption, r.media.path) for r in recs] == [(IMAGE, "a dog", tmp_path / "a.png"),
                                                                     (AUDIO, "rain on a roof", None)]
    csv = _write(tmp_path / "audiocaps_val.csv", "audiocap_id,youtube_id,start_time,caption\n"
                 "1,abc,0,A dog barks\n2,def,10,Rain falls\n3,ghi,20,A dog barks\n")
    caps = read_records(parse_data_arg(str(csv), modality=AUDIO))
    assert [c.caption for c in caps] == ["A dog barks", "Rain falls"]
    with pytest.raises(DataFormatError, match="needs a modality"):
        read_records(DataSpec(str(csv)))
    builtin = read_records(parse_data_arg("builtin:video"))
    assert len(builtin) >= 30 and {b.modality for b in builtin} == {VIDEO}
    assert {b.modality for b in read_records(parse_data_arg("builtin"))} == {IMAGE, AUDIO, VIDEO}
    spec = parse_data_arg(f"cc3m:{tmp_path / 'x.json'}")
    assert (spec.format, spec.path) == ("cc3m", str(tmp_path / "x.json"))


def test_bad_files_name_the_problem(tmp_path):
    with pytest.raises(DataFormatError, match="data file not found"):
        read_records(DataSpec(str(tmp_path / "nope.json")))
    bad = _write(tmp_path / "bad.json", "[{")
    with pytest.raises(DataFormatError, match="not valid JSON"):
        read_records(DataSpec(str(bad)))
    odd = _write(tmp_path / "odd.json", [{"foo": 1}])
    with pytest.raises(DataFormatError, match="cannot tell its format"):
        read_records(DataSpec(str(odd)))
    with pytest.raises(ValueError, match="unknown data format 'xml'; choose from: auto, pairs"):
        read_records(DataSpec(str(odd), format="xml"))
    gen = _write(tmp_path / "g.json", [{"output_image": "x.jpg", "image_captions": "c",
                                        "conversations": [{"from": "robot", "value": "hi"}]}])
    with pytest.raises(DataFormatError, match=r"g.json row 0: message 0 must be"):
        read_records(DataSpec(str(gen)))
    ph = _write(tmp_path / "p.json", [{"output_image": "x.jpg", "image_captions": "c",
                                       "conversations": [{"from": "human", "value": "hi"},
                                                         {"from": "gpt", "value": "<video>"}]}])
    with pytest.raises(DataFormatError, match="placeholder <video> has no video"):
        read_records(DataSpec(str(ph)))


def test_stage_registry_and_config_validation(tmp_path):
    with pytest.raises(ValueError, match="unknown stage 'x'; choose from: encode, decode, instruct"):
        stage_spec("x")
    with pytest.raises(ValueError, match=r"\{caption\}"):
        TrainConfig(stage="decode", data=[DataSource(path="builtin")], out_dir="o", prompt_template="draw it")
    a = TrainConfig(stage="decode", data=[DataSource(path="builtin")], out_dir="o", stop_after=3)
    b = a.model_copy(update={"out_dir": "elsewhere", "stop_after": None, "resume": True})
    c = a.model_copy(update={"lr": 0.5})
    assert a.fingerprint() == b.fingerprint() and a.fingerprint() != c.fingerprint()
    assert c.differing_fields(a.model_dump(mode="json")) == ["lr"]
    pair = CaptionPair(MediaRef(IMAGE, None, "a red kite"), "x")
    d = stage_spec("decode").to_dialogue(pair, a)
    assert isinstance(d, Dialogue) and d.messages[0].parts == ("a red kite",)
    assert d.messages[1].parts[0].caption == "a red kite"
    e = stage_spec("encode").to_dialogue(pair, a.model_copy(update={"stage": "encode"}))
    assert e.messages[0].parts[1] == "Describe this image briefly." and e.messages[1].parts == ("a red kite",)
