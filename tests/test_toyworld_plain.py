"""The plain-question training bank and its dialogues (``training.toyworld.plain``), without a model: the bank is
disjoint from every held-out prompt, answers become training targets only when whole, and the dialogues read as
text-only instruct examples."""

from __future__ import annotations

import json

import pytest

from training.toyworld import phrasings
from training.toyworld.phrasings import all_prompts, plain_questions, plain_training_questions
from training.toyworld.plain import ANSWERS, dialogue_records, distill_answers, trim_answer, write_dialogues


def test_training_bank_is_varied_and_disjoint_from_every_held_out_prompt():
    bank = plain_training_questions()
    assert len(bank) == len(set(bank)) >= 300 and bank == plain_training_questions()
    assert not set(bank) & set(plain_questions(200))
    for m in phrasings.HELDOUT_REQUESTS:
        assert not set(bank) & all_prompts(m, heldout=True)
    # kinds the held-out set has none of: small talk, advice, media named without asking, toy words named
    for q in ("Hello!", "How can I sleep better?", "What is a photograph?", "How many sides does a triangle have?"):
        assert q in bank
    assert sum(q.startswith(("What's ", "Calculate ", "Subtract ")) for q in bank) >= 20  # arithmetic


def test_training_bank_check_catches_a_held_out_question(monkeypatch):
    held_out = plain_questions(200)[3]
    monkeypatch.setattr(phrasings, "_TRAIN_SMALL_TALK", (*phrasings._TRAIN_SMALL_TALK, held_out))
    with pytest.raises(AssertionError, match="benchmark prompts are training prompts"):
        plain_training_questions()


def test_trim_answer_keeps_whole_sentences_only():
    assert trim_answer(" Paris is the capital. ", "stop") == "Paris is the capital."
    assert trim_answer("It is 4. Then we add 3 and", "length") == "It is 4."
    assert trim_answer("e.g. 3.5 is a number! And then", "length") == "e.g. 3.5 is a number!"
    assert trim_answer("no sentence end here", "length") is None
    assert trim_answer("", "stop") is None
    assert trim_answer("Here is one: <image> enjoy.", "stop") is None  # the t2x reader would take it for a medium


def test_dialogues_cycle_and_read_as_text_only_instruct_examples(tmp_path):
    from training.align.data import DataSpec, Dialogue, read_records

    rows = [{"question": "Hello!", "answer": "Hi! How can I help?"},
            {"question": "What is 3 squared?", "answer": None},
            {"question": "Who was Napoleon?", "answer": "A French emperor."}]
    records = dialogue_records(rows, 5)
    assert [r["conversations"][0]["value"] for r in records] == ["Hello!", "Who was Napoleon?"] * 2 + ["Hello!"]
    assert dialogue_records(rows, 0) == []
    with pytest.raises(ValueError):
        dialogue_records(rows, -1)
    with pytest.raises(ValueError, match="no plain question"):
        dialogue_records([{"question": "x", "answer": None}], 1)

    path = write_dialogues(tmp_path / "plain.json", rows, 3)
    dialogues = read_records(DataSpec(path=str(path), format="t2x"))
    assert len(dialogues) == 3 and all(isinstance(d, Dialogue) for d in dialogues)
    assert all(not d.media() for d in dialogues)
    assert dialogues[2].messages[1].parts == ("Hi! How can I help?",)


def test_distill_answers_are_served_from_the_cache(tmp_path, monkeypatch):
    """Answers cached for these questions and settings are read back without generating again; other settings
    miss the cache (the model and its batches are stand-ins here)."""
    from training.toyworld import plain

    qs = ["Hello!", "Who was Napoleon?"]
    calls = []

    def fake_batch(engine, questions, max_new_tokens):
        calls.append(list(questions))
        return [{"question": q, "text": f"{q} yes.", "finish_reason": "stop", "completion_tokens": 3,
                 "answer": f"{q} yes."} for q in questions]

    class FakePipe:
        class llm_stage:  # noqa: N801 - mimics the attribute path
            engine = None

    import polymodal.pipeline as pipeline_mod

    monkeypatch.setattr(plain, "_greedy_batch", fake_batch)
    monkeypatch.setattr(pipeline_mod.AnyToAnyPipeline, "from_preset", classmethod(lambda cls, preset: FakePipe()))
    rows = distill_answers(qs, tmp_path, batch_size=1, progress=False)
    assert [r["answer"] for r in rows] == ["Hello! yes.", "Who was Napoleon? yes."]
    assert len(calls) == 2 and json.loads((tmp_path / ANSWERS).read_text())["rows"] == rows
    assert distill_answers(qs, tmp_path, batch_size=1, progress=False) == rows and len(calls) == 2  # cached
    # answers are kept per question: a smaller list is served, a larger one generates only what is new
    assert distill_answers(qs[:1], tmp_path, batch_size=1, progress=False) == rows[:1] and len(calls) == 2
    more = distill_answers([*qs, "Why is the sky blue?"], tmp_path, batch_size=1, progress=False)
    assert more[:2] == rows and calls[2:] == [["Why is the sky blue?"]]
    assert len(json.loads((tmp_path / ANSWERS).read_text())["rows"]) == 3
    distill_answers(qs, tmp_path, batch_size=1, max_new_tokens=8, progress=False)  # other settings: redone
    assert len(calls) == 5
