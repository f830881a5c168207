"""MosIT validation rules, dialogue parsing, config errors (no models: fast)."""

from __future__ import annotations

import pytest

from mosit.config import ConfigError, load_config, parse_config
from mosit.dialogue import find_placeholders, parse_dialogue, placeholder_problems
from mosit.modes import MODES, get_mode
from mosit.validate import RULES, Rules, validate_dialogue

T_I, I_T, T_A_I, I_A = (get_mode(n) for n in ("T_I", "I_T", "T_A_I", "I_A"))
RULES_3 = Rules(min_turns=2, max_turns=3, word_limit=60)

GOOD = {
    "T_I": (T_I, """Human: What does a rocket look like before launch?
GPT: It stands upright on the pad. <Image> a rocket on its launch pad </Image>
Human: How fast does it fly?
GPT: About 28,000 km/h to reach orbit."""),
    "I_T": (I_T, """Human: I took this. <Image> the cratered surface of the moon </Image> What are these circles?
GPT: Craters made by meteorites.
Human: Why do they last?
GPT: There is no wind or rain on the moon."""),
    "T_A_I": (T_A_I, """Human: What does a cafe sound like?
GPT: Like this. <Audio> a customer ordering coffee </Audio>
Human: And the coffee?
GPT: Here it is. <Image> a cup of espresso on a saucer </Image>"""),
}

# one hand-written dialogue per rule; each breaks that rule and (as far as possible) only that rule
BAD = {
    "empty_message": (T_I, "Human: Show me a rocket.\nGPT: <Image> a rocket </Image>\nHuman:   \nGPT: Sure."),
    "speaker": (T_I, None),  # built below: a speaker name that parse_dialogue cannot produce
    "starts_with_human": (T_I, "GPT: Hello!\nHuman: Show me a rocket.\nGPT: Here. <Image> a rocket </Image>\n"
                               "Human: Thanks.\nGPT: Welcome."),
    "ends_with_assistant": (T_I, "Human: Show me a rocket.\nGPT: Here. <Image> a rocket </Image>\nHuman: Thanks."),
    "speaker_alternation": (T_I, "Human: Show me a rocket.\nHuman: A big one.\nGPT: Here. <Image> a rocket </Image>\n"
                                 "Human: Thanks.\nGPT: Welcome."),
    "turn_count": (T_I, "Human: Show me a rocket.\nGPT: Here. <Image> a rocket </Image>"),
    "word_limit": (T_I, "Human: Show me a rocket. " + "very " * 60 + "\nGPT: Here. <Image> a rocket </Image>\n"
                        "Human: Thanks.\nGPT: Welcome."),
    "malformed_placeholder": (T_I, "Human: Show me a rocket.\nGPT: Here. <Image> a rocket </Image> <image> a pad "
                                   "</Image>\nHuman: Thanks.\nGPT: Welcome."),
    "placeholder_not_allowed": (T_I, "Human: Look. <Image> my cat </Image> Show me a rocket.\nGPT: Here. "
                                     "<Image> a rocket </Image>\nHuman: Thanks.\nGPT: Welcome."),
    "repeated_message": (T_I, "Human: Show me a rocket on the pad please.\nGPT: Here. <Image> a rocket </Image>\n"
                              "Human: Show me a rocket on the pad, please!\nGPT: Welcome."),
    "refusal": (T_I, "Human: Show me a rocket.\nGPT: As an AI, I cannot show images. <Image> a rocket </Image>\n"
                     "Human: Thanks.\nGPT: Welcome."),
    "modality_mismatch": (T_I, "Human: Show me a rocket.\nGPT: Here. <Image> a rocket </Image> <Audio> a launch "
                               "</Audio>\nHuman: Thanks.\nGPT: Welcome."),
}


def test_every_rule_has_a_bad_example():
    assert set(BAD) | {"empty_dialogue"} == set(RULES)


@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_dialogues_pass(name):
    mode, text = GOOD[name]
    d = parse_dialogue(text, id="g", mode=mode.name)
    assert validate_dialogue(d, mode, RULES_3) == []


@pytest.mark.parametrize("rule", sorted(BAD))
def test_each_rule_rejects_its_bad_dialogue(rule):
    mode, text = BAD[rule]
    if rule == "speaker":
        from mosit.dialogue import Dialogue, Message

        good = parse_dialogue(GOOD["T_I"][1], id="b", mode="T_I")
        d = Dialogue("b", "T_I", "", good.messages[:2] + (Message("narrator", "Meanwhile..."),) + good.messages[2:])
    else:
        d = parse_dialogue(text, id="b", mode=mode.name)
    rules = {v.rule for v in validate_dialogue(d, mode, RULES_3)}
    assert rule in rules, rules


def test_empty_dialogue():
    from mosit.dialogue import Dialogue

    assert [v.rule for v in validate_dialogue(Dialogue("e", "T_I", "", ()), T_I)] == ["empty_dialogue"]


def test_modality_mismatch_reports_missing_and_extra():
    # T_A_I wants audio then image from the assistant: image only -> audio missing
    d = parse_dialogue("Human: Hi\nGPT: Look. <Image> a cup </Image>\nHuman: Nice\nGPT: Yes.", mode="T_A_I")
    msgs = [v.message for v in validate_dialogue(d, T_A_I, RULES_3) if v.rule == "modality_mismatch"]
    assert msgs and "missing 1 audio" in msgs[0]
    # I_A: the human must carry one image; two images -> extra
    d = parse_dialogue("Human: <Image> a </Image> <Image> b </Image> hear?\nGPT: <Audio> c </Audio>\nHuman: ok\n"
                       "GPT: ok", mode="I_A")
    msgs = [v.message for v in validate_dialogue(d, I_A, RULES_3) if v.rule == "modality_mismatch"]
    assert msgs and "extra 1 image" in msgs[0]


def test_comprehension_mode_rejects_assistant_media():
    d = parse_dialogue("Human: Look <Image> the moon </Image> what?\nGPT: Craters. <Image> a crater </Image>\n"
                       "Human: ok\nGPT: ok", mode="I_T")
    assert "placeholder_not_allowed" in {v.rule for v in validate_dialogue(d, I_T, RULES_3)}


@pytest.mark.parametrize("text,problem", [
    ("<Image> a cat", "never closed"),
    ("a cat </Image>", "without an opening"),
    ("<Image> a cat </Audio>", "closed by"),
    ("<Image>   </Image>", "empty"),
    ("<IMAGE> a cat </IMAGE>", "should be written"),
    ("<Image> a <Audio> b </Audio>", "not closed before"),
])
def test_placeholder_problems(text, problem):
    probs = placeholder_problems(text)
    assert any(problem in p for p in probs), probs


def test_find_placeholders_spans_and_captions():
    text = "Here <Image>  a red   kite </Image> and <Audio>waves</Audio>."
    ps = find_placeholders(text)
    assert [(p.modality.value, p.caption) for p in ps] == [("image", "a red kite"), ("audio", "waves")]
    assert text[ps[1].start:ps[1].end] == "<Audio>waves</Audio>"
    assert placeholder_problems(text) == []


def test_parse_dialogue_aliases_and_continuations():
    d = parse_dialogue("intro line\nUser: one\ncontinued\nAssistant：two\nhuman: three\ngpt: four")
    assert [(m.speaker, m.value) for m in d.messages] == [("human", "one\ncontinued"), ("gpt", "two"),
                                                            ("human", "three"), ("gpt", "four")]
    with pytest.raises(ValueError, match="no 'Human:'"):
        parse_dialogue("just prose")


def test_unknown_mode_lists_choices():
    with pytest.raises(ValueError, match="T_I_V_A"):
        get_mode("T_X")
    assert {"T_I", "T_A", "T_V", "T_I_V_A", "T_A_I", "T_V_I", "T_A_V", "I_T", "A_T", "V_T"} <= set(MODES)


def _cfg(**over):
    base = {"num_dialogues": 2, "topics": ["cats"], "modes": {"T_I": {}}, "catalog": {"path": "c.jsonl"}}
    base.update(over)
    return base


@pytest.mark.parametrize("over,needle", [
    ({"min_turns": 5, "max_turns": 3}, "min_turns"),
    ({"modes": {"T_X": {}}}, "unknown dialogue mode"),
    ({"modes": {"custom": {"inputs": [], "outputs": []}}}, "no media"),
    ({"modes": {"T_I": {"demonstrations": ["Human: hi\nGPT: no image here"]}}}, "breaks its own mode"),
    ({"llm": {"kind": "gpt5"}}, "unknown llm kind"),
    ({"llm": {"kind": "openai"}}, "base_url and model"),
    ({"catalog": {"path": "c.txt"}}, ".jsonl or .csv"),
    ({"topics": []}, "topics"),
    ({"retrieval": {"threshold": 2}}, "retrieval.threshold"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_config_messages(over, needle):
    with pytest.raises(ConfigError) as e:
        parse_config(_cfg(**over))
    assert needle in str(e.value)


def test_custom_mode_and_paths(tmp_path):
    cfg = parse_config(_cfg(modes={"V_I": {"inputs": ["video"], "outputs": ["image"]}}), tmp_path)
    m = cfg.resolved_modes()["V_I"]
    assert [x.value for x in m.inputs] == ["video"] and [x.value for x in m.outputs] == ["image"]
    assert cfg.catalog.path == str(tmp_path / "c.jsonl")
    assert cfg.fingerprint() == parse_config(_cfg(modes={"V_I": {"inputs": ["video"], "outputs": ["image"]}}),
                                             tmp_path).fingerprint()


def test_example_config_is_valid():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parent.parent / "examples" / "mosit" / "config.yaml")
    assert cfg.catalog.recipe and Path(cfg.catalog.recipe).is_file()
    assert cfg.llm.kind == "preset" and cfg.llm.preset == "smol"


def test_cli_bad_config_exits_nonzero(tmp_path):
    from typer.testing import CliRunner

    from mosit.cli import app

    bad = tmp_path / "bad.yaml"
    bad.write_text("num_dialogues: 3\ntopics: [cats]\nmodes: {T_Q: {}}\ncatalog: {path: c.jsonl}\n")
    r = CliRunner().invoke(app, ["build", "--config", str(bad), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "unknown dialogue mode 'T_Q'" in r.output
    r = CliRunner().invoke(app, ["build", "--config", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and "not found" in r.output
    assert not (tmp_path / "o").exists()
