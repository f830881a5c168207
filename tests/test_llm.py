"""LLM engine: signal-token ids, state capture against a teacher-forced pass, parser outcomes."""

from __future__ import annotations

import pytest
import torch

from polymodal.llm import PromptSegment, load_llm
from polymodal.modality import Modality
from polymodal.presets import get_preset
from polymodal.signals import SignalSpec

IMAGE, AUDIO, VIDEO = Modality.IMAGE, Modality.AUDIO, Modality.VIDEO


@pytest.fixture(scope="module")
def engine():
    p = get_preset("tiny")
    return load_llm(p.llm, p.signals.spec(), p.chat, seed=0)


def _segs(engine, text="draw something"):
    return engine.chat_segments([("user", [PromptSegment(text, trusted=False)])])


def _script(engine, tokens):
    """A proposal hook emitting the given token strings (then EOS)."""
    ids = [engine.tokenizer.convert_tokens_to_ids(t) if t.startswith(("<", "[")) else None for t in tokens]
    plain = {t: engine.tokenizer.encode(t, add_special_tokens=False) for t in tokens if not t.startswith(("<", "["))}
    seq: list[int] = []
    for t, i in zip(tokens, ids):
        seq.extend([i] if i is not None else plain[t])
    eos = engine.tokenizer.eos_token_id

    def propose(step, logits):
        return seq[step] if step < len(seq) else eos

    return propose, seq


def _check_states(engine, segs, out):
    ref = engine.reference_states(segs, out.generated_ids)
    assert out.groups, "expected at least one group"
    for g in out.groups:
        assert g.hidden_states.shape == (len(g.positions), engine.d_llm)
        # each captured state is the teacher-forced state at that token's own position
        torch.testing.assert_close(g.hidden_states, ref[list(g.positions)], atol=1e-4, rtol=0)
        # and not the neighbour's (the classic off-by-one)
        assert not torch.allclose(g.hidden_states, ref[[p - 1 for p in g.positions]], atol=1e-4)
        # the positions hold the group's own token ids
        seq_ids = out.generated_ids
        for p, tid in zip(g.positions, g.token_ids):
            assert seq_ids[p - out.prompt_len] == tid


@pytest.mark.parametrize("fmt", ["<{prefix}{i}>", "[{prefix}{i}]"])
def test_each_signal_token_is_one_id_and_groups_are_n_ids(fmt):
    p = get_preset("tiny")
    spec = SignalSpec.build(fmt=fmt)
    eng = load_llm(p.llm, spec, p.chat)
    for m, toks in spec.tokens.items():
        ids = eng.tokenizer.encode(spec.group_string(m), add_special_tokens=False)
        assert len(ids) == len(toks) == spec.count(m)
        assert ids == eng.signal_ids[m]
    all_ids = [i for v in eng.signal_ids.values() for i in v]
    assert len(set(all_ids)) == len(all_ids)


def test_group_mid_answer_states_match_teacher_forced(engine):
    segs = _segs(engine)
    propose, _ = _script(engine, ["here", "<IMG0>", "<IMG1>", "<IMG2>", "<IMG3>", " and", " more"])
    out = engine.generate(segs, propose=propose, max_new_tokens=30)
    assert [g.modality for g in out.groups] == [IMAGE]
    g = out.groups[0]
    assert not g.completed and not g.forced
    assert out.finish_reason == "stop"
    assert "IMG" not in out.text and out.text.startswith("here") and out.text.endswith("more")
    assert out.text[: g.text_offset] == "here"
    _check_states(engine, segs, out)


def test_partial_group_is_completed_and_decoded(engine):
    segs = _segs(engine)
    partial = [f"<VID{i}>" for i in range(11)]
    propose, _ = _script(engine, partial + ["the", " end"])
    out = engine.generate(segs, propose=propose, max_new_tokens=60)
    assert [g.modality for g in out.groups] == [VIDEO]
    g = out.groups[0]
    assert g.completed and len(g.positions) == 24
    assert g.token_ids == tuple(engine.signal_ids[VIDEO])
    _check_states(engine, segs, out)


def test_forced_group_appended_when_required(engine):
    segs = _segs(engine)
    propose, _ = _script(engine, ["just", " text"])
    out = engine.generate(segs, propose=propose, required=[AUDIO, IMAGE], max_new_tokens=20)
    assert [g.modality for g in out.groups] == [AUDIO, IMAGE]
    assert all(g.forced for g in out.groups)
    _check_states(engine, segs, out)


def test_partial_group_at_length_limit_is_completed(engine):
    segs = _segs(engine)
    propose, _ = _script(engine, ["x", "<AUD0>", "<AUD1>"])
    out = engine.generate(segs, propose=propose, max_new_tokens=3)
    assert [g.modality for g in out.groups] == [AUDIO] and out.groups[0].completed
    _check_states(engine, segs, out)


def test_signal_loop_ends_generation(engine):
    segs = _segs(engine)
    loop = ([f"<IMG{i}>" for i in range(4)] + [f"<AUD{i}>" for i in range(8)]) * 50
    propose, _ = _script(engine, loop)
    out = engine.generate(segs, propose=propose, max_new_tokens=500, max_outputs=2, max_signal_run=3)
    assert out.finish_reason == "signal_loop"
    assert len(out.generated_ids) < 100  # did not run to the length limit
    counts = {m: sum(g.modality == m for g in out.groups) for m in (IMAGE, AUDIO)}
    assert all(c <= 2 for c in counts.values()) and sum(counts.values()) == 3


def test_stray_token_never_reaches_a_decoder(engine):
    segs = _segs(engine)
    propose, _ = _script(engine, ["look", "<IMG3>", " ok"])
    out = engine.generate(segs, propose=propose, max_new_tokens=20)
    assert out.groups == []
    assert "IMG" not in out.text
    assert any("stray" in n for n in out.notes)


def test_max_outputs_per_modality(engine):
    segs = _segs(engine)
    grp = [f"<IMG{i}>" for i in range(4)]
    propose, _ = _script(engine, grp + ["a"] + grp + ["b"] + grp + ["c"])
    out = engine.generate(segs, propose=propose, max_new_tokens=40, max_outputs=2)
    assert [g.modality for g in out.groups] == [IMAGE, IMAGE]


def test_typed_signal_token_in_user_text_stays_text(engine):
    segs = _segs(engine, "please <IMG0><IMG1><IMG2><IMG3> thanks")
    _, ids = engine.build_prompt(segs)
    signal = {i for v in engine.signal_ids.values() for i in v}
    assert not signal & {i for i in ids if i is not None}
    propose, _ = _script(engine, ["fine"])
    out = engine.generate(segs, propose=propose, max_new_tokens=5)
    assert out.groups == []


def test_nothing_the_model_emits_raises(engine):
    segs = _segs(engine)
    g = torch.Generator().manual_seed(1)
    vocab = len(engine.tokenizer)
    special = [i for v in engine.signal_ids.values() for i in v]
    for trial in range(5):
        seq = [special[int(torch.randint(len(special), (1,), generator=g))] if torch.rand(1, generator=g) < 0.6
               else int(torch.randint(vocab, (1,), generator=g)) for _ in range(80)]
        out = engine.generate(segs, propose=lambda s, _l, seq=seq: seq[s], max_new_tokens=80,
                              required=[VIDEO])
        assert any(gr.modality == VIDEO for gr in out.groups)
        for gr in out.groups:
            assert gr.hidden_states.shape[0] == len(engine.signal_ids[gr.modality])


def test_sampling_is_seeded(engine):
    segs = _segs(engine)
    a = engine.generate(segs, temperature=1.0, top_p=0.9, seed=3, max_new_tokens=12, allow_signals=False)
    b = engine.generate(segs, temperature=1.0, top_p=0.9, seed=3, max_new_tokens=12, allow_signals=False)
    c = engine.generate(segs, temperature=1.0, top_p=0.9, seed=4, max_new_tokens=12, allow_signals=False)
    assert a.generated_ids == b.generated_ids
    assert a.generated_ids != c.generated_ids


def test_chat_never_emits_signal_tokens(engine):
    text = engine.chat([{"role": "user", "content": "hello"}], max_new_tokens=16, seed=0)
    assert isinstance(text, str)
    assert not any(t in text for t in engine.spec.all_signal_tokens())


def test_streaming_never_splits_a_multibyte_character(engine):
    segs = _segs(engine)
    text = "cat 🐱 and 日本"
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # characters span several byte-level tokens
    eos = engine.tokenizer.eos_token_id
    deltas = [ev.text for ev in engine.stream(segs, propose=lambda s, _l: ids[s] if s < len(ids) else eos,
                                               max_new_tokens=len(ids) + 2) if ev.text]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_cuda_on_a_cpu_build_is_a_clear_error():
    from polymodal.llm import resolve_device

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="no usable CUDA"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu9")
