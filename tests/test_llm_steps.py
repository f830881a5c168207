"""LLMEngine.stream in named steps: same decode as before the split, token constraints, the ceiling of
``allowed_modalities``, and log-probabilities."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.llm_golden import CASES, _script, engines, record, segments
from polymodal.llm import BannedTokens, PromptSegment, TokenConstraint
from polymodal.modality import Modality

IMAGE, AUDIO, VIDEO = Modality.IMAGE, Modality.AUDIO, Modality.VIDEO
GOLDEN = json.loads((Path(__file__).parent / "data" / "llm_stream_golden.json").read_text())["cases"]


@pytest.fixture(scope="module")
def engine():
    return engines()["tiny"]


def _segs(engine, text="draw something"):
    return engine.chat_segments([("user", [PromptSegment(text, trusted=False)])])


def _ids(engine, pieces):
    out = []
    for t in pieces:
        if t in engine.tokenizer.get_vocab():
            out.append(engine.tokenizer.convert_tokens_to_ids(t))
        else:
            out.extend(engine.tokenizer.encode(t, add_special_tokens=False))
    return out


def _signal_ids(engine, *modalities):
    return {i for m in (modalities or tuple(engine.signal_ids)) for i in engine.signal_ids[m]}


# ---- no change of behaviour ------------------------------------------------------------------------
def test_golden_recording_covers_every_outcome():
    """The recorded cases exercise what the split must keep: groups made by the model, completed and
    forced groups, strays, a signal loop, stop strings, held-back tails, the length limit."""
    outputs = [rows[-1] for rows in GOLDEN.values()]
    groups = [r for rows in GOLDEN.values() for r in rows if r[0] == "group"]
    assert {o[4] for o in outputs} == {"stop", "length", "signal_loop"}
    assert {(g[5], g[6]) for g in groups} == {(False, False), (True, False), (False, True)}
    assert {g[1] for g in groups} == {"image", "audio", "video"}
    assert any("stray" in n for o in outputs for n in o[5])
    assert set(GOLDEN) == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_stream_matches_the_decode_before_the_split(name):
    got, want = record(name), GOLDEN[name]
    assert [r[0] for r in got] == [r[0] for r in want]
    for g, w in zip(got, want):
        if g[0] == "group":  # everything exact but the float checksums of the states
            assert g[:7] == w[:7]
            assert g[7:] == pytest.approx(w[7:], abs=1e-3)
        else:
            assert g == w


# ---- allowed_modalities: the ceiling ---------------------------------------------------------------
def test_banned_modality_proposed_by_force_never_makes_a_group(engine):
    """``propose`` forces whole image and video groups (start, middle, end of the answer): with only audio
    allowed, every one of their tokens is refused and the model's own (masked) choice taken instead."""
    segs = _segs(engine)
    img = [f"<IMG{i}>" for i in range(4)]
    vid = [f"<VID{i}>" for i in range(24)]
    aud = [f"<AUD{i}>" for i in range(8)]
    seq = _ids(engine, [*img, "one", *vid, " two", *aud, " three", *img])
    eos = engine.tokenizer.eos_token_id
    banned = sorted(_signal_ids(engine, IMAGE, VIDEO))
    asked = []

    def propose(step, logits):
        assert torch.isneginf(logits[banned]).all()  # masked at every step, inside the audio group too
        asked.append(step)
        return seq[step] if step < len(seq) else eos

    out = engine.generate(segs, propose=propose, max_new_tokens=len(seq), allowed_modalities=[AUDIO])
    assert [g.modality for g in out.groups] == [AUDIO]
    assert not set(out.generated_ids) & set(banned)
    assert sum("is banned here" in n for n in out.notes) == len(img) * 2 + len(vid)
    assert len(asked) == len(seq)
    # the same script without the ceiling makes all three (control: the refusal is what removed them)
    free = engine.generate(segs, propose=lambda s, _l: seq[s] if s < len(seq) else eos, max_new_tokens=len(seq))
    assert {g.modality for g in free.groups} == {IMAGE, VIDEO, AUDIO}


@pytest.mark.parametrize("seed", range(6))
def test_sampled_answers_keep_within_the_ceiling(engine, seed):
    """A random model samples signal tokens freely (the recorded cases show image/audio/video groups and
    strays); with ``allowed_modalities=[IMAGE]`` no audio or video token is ever generated, and with
    ``[]`` none at all, while ``required`` still appends what it asks for."""
    segs = _segs(engine, "make a picture and a sound")
    kw = dict(temperature=1.5, top_p=1.0, seed=seed, max_new_tokens=48)
    out = engine.generate(segs, allowed_modalities=[IMAGE], **kw)
    assert not set(out.generated_ids) & _signal_ids(engine, AUDIO, VIDEO)
    assert {g.modality for g in out.groups} <= {IMAGE}
    none = engine.generate(segs, allowed_modalities=[], **kw)
    assert not set(none.generated_ids) & _signal_ids(engine) and none.groups == []
    req = engine.generate(segs, allowed_modalities=[VIDEO], required=[VIDEO], **kw)
    assert VIDEO in {g.modality for g in req.groups} and {g.modality for g in req.groups} == {VIDEO}


def test_required_outside_allowed_is_an_error(engine):
    with pytest.raises(ValueError, match=r"required modalities \['audio'\] are not among the allowed"):
        engine.generate(_segs(engine), required=[IMAGE, AUDIO], allowed_modalities=[IMAGE, VIDEO])
    with pytest.raises(ValueError, match="logprobs must be >= 0"):
        engine.generate(_segs(engine), logprobs=-1)
    with pytest.raises(TypeError, match="constraints must have"):
        engine.generate(_segs(engine), constraints=[object()])


# ---- a custom constraint ---------------------------------------------------------------------------
class Recorder:
    """Bans ``banned`` at the steps it is asked about; records what it is asked and told."""

    def __init__(self, banned=(), done_after=None):
        self.banned = list(banned)
        self.done_after = done_after
        self.masks = 0
        self.accepted: list[int] = []

    def mask(self, logits):
        self.masks += 1
        logits[self.banned] = -float("inf")

    def accept(self, token_id):
        self.accepted.append(token_id)

    def is_done(self):
        return self.done_after is not None and len(self.accepted) >= self.done_after


def test_constraint_sees_every_text_token_and_no_signal_token(engine):
    """Script: text, an image group, a stray, a partial video group completed at the end. The constraint
    is asked at free steps only and told exactly the answer's text tokens; the groups still come."""
    assert isinstance(Recorder(), TokenConstraint)
    segs = _segs(engine)
    script = _ids(engine, ["here", *[f"<IMG{i}>" for i in range(4)], " and", "<AUD3>", " more", "<VID0>", "<VID1>"])
    rec = Recorder()
    masked_at = []

    def propose(step, logits):
        masked_at.append(step)
        return script[step]

    out = engine.generate(segs, propose=propose, constraints=[rec], max_new_tokens=len(script))
    signal = _signal_ids(engine)
    text_ids = [i for i in out.generated_ids if i not in signal]
    assert rec.accepted == text_ids == _ids(engine, ["here", " and", " more"])
    # free steps: every step but the 3 inside the image group and the 1 inside the video group
    assert rec.masks == len(script) - 3 - 1
    assert [g.modality for g in out.groups] == [IMAGE, VIDEO] and out.groups[1].completed


def test_constraint_mask_is_applied_and_done_ends_the_answer(engine):
    segs = _segs(engine, "hello there")
    kw = dict(temperature=1.0, top_p=1.0, seed=3, max_new_tokens=32, allow_signals=False)
    free = engine.generate(segs, **kw)
    common = sorted(set(free.generated_ids))[:5]  # tokens this seed samples without the constraint
    rec = Recorder(banned=common)
    out = engine.generate(segs, constraints=[rec], **kw)
    assert not set(out.generated_ids) & set(common)
    assert rec.accepted == out.generated_ids  # text only: signals are banned here
    # the same ban as a static BannedTokens gives the same answer (it joins the engine's own bans)
    same = engine.generate(segs, constraints=[BannedTokens(common)], **kw)
    assert same.generated_ids == out.generated_ids
    # done after 3 text tokens: the answer stops there, as at EOS
    done = engine.generate(segs, constraints=[Recorder(done_after=3)], **kw)
    assert done.finish_reason == "stop" and len(done.generated_ids) == 3


def test_a_constraint_that_bans_everything_is_a_clear_error(engine):
    vocab = engine.model.get_output_embeddings().weight.shape[0]
    with pytest.raises(RuntimeError, match="ban every token at step 0"):
        engine.generate(_segs(engine), constraints=[Recorder(banned=range(vocab))], max_new_tokens=4)


# ---- log-probabilities -----------------------------------------------------------------------------
def test_greedy_logprobs_chosen_is_top1(engine):
    segs = _segs(engine)
    out = engine.generate(segs, logprobs=5, max_new_tokens=16, allow_signals=False)
    plain = engine.generate(segs, max_new_tokens=16, allow_signals=False)
    assert plain.logprobs is None and out.generated_ids == plain.generated_ids  # asking changes nothing
    assert len(out.logprobs) == len(out.generated_ids) == 16
    for e, tid in zip(out.logprobs, out.generated_ids):
        assert e.token_id == tid and e.logprob <= 0
        assert len(e.top) == 5 and e.top[0][0] == tid and e.top[0][1] == pytest.approx(e.logprob)
        vals = [v for _, v in e.top]
        assert vals == sorted(vals, reverse=True)
        assert not {i for i, _ in e.top} & _signal_ids(engine)  # banned tokens are not alternatives


def test_sampled_logprobs_are_of_the_renormalised_distribution(engine):
    """With top-p the distribution sampled from has few tokens: asking for the whole vocabulary returns
    only those, their probabilities sum to 1, and the chosen token is among them."""
    segs = _segs(engine, "make a picture and a sound")
    vocab = engine.model.get_output_embeddings().weight.shape[0]
    kw = dict(temperature=0.8, top_p=0.5, seed=5, max_new_tokens=24)
    out = engine.generate(segs, logprobs=vocab, **kw)
    assert out.generated_ids == engine.generate(segs, **kw).generated_ids
    assert out.logprobs
    for e in out.logprobs:
        assert math.isfinite(e.logprob) and e.logprob <= 0
        assert 1 <= len(e.top) < vocab
        assert sum(math.exp(v) for _, v in e.top) == pytest.approx(1.0, abs=1e-4)
        assert dict(e.top)[e.token_id] == pytest.approx(e.logprob)
    # text tokens only: signal and stray tokens have no entry
    assert [e.token_id for e in out.logprobs] == [i for i in out.generated_ids if i not in _signal_ids(engine)]


def test_sampled_logprobs_are_after_temperature_and_top_p(engine):
    """Recomputed from the masked logits the loop chose with (seen through a ``propose`` hook that
    proposes nothing): each entry is q_i / q(S), q = softmax(logits / T), S the top-p nucleus of q."""
    segs = _segs(engine, "make a picture and a sound")
    vocab = engine.model.get_output_embeddings().weight.shape[0]
    temperature, top_p = 0.7, 0.6
    seen: list[torch.Tensor] = []

    def watch(step, logits):
        seen.append(logits.clone())
        return None

    out = engine.generate(segs, logprobs=vocab, temperature=temperature, top_p=top_p, seed=2, max_new_tokens=24,
                          propose=watch)
    signal = _signal_ids(engine)
    steps = [k for k, i in enumerate(out.generated_ids[:len(seen)]) if i not in signal]
    assert len(steps) == len(out.logprobs) > 5
    for k, e in zip(steps, out.logprobs):
        q = torch.softmax(seen[k].double() / temperature, -1)
        nucleus = [i for i, _ in e.top]
        mass = float(q[nucleus].sum())
        assert mass >= top_p - 1e-5 and mass - float(q[nucleus].min()) < top_p + 1e-5
        assert float(q[nucleus].min()) >= float(q[[i for i in range(vocab) if i not in set(nucleus)]].max())
        for i, lp in e.top:
            assert lp == pytest.approx(math.log(float(q[i]) / mass), abs=1e-4)


@pytest.mark.parametrize("name", ["vicuna-stop-string", "script-multibyte", "vicuna-sample-s1"])
def test_logprobs_ride_with_the_text_events(name):
    """Concatenated over the events, the entries are the output's, minus those of a stop string's
    tokens (never streamed); an event's entries are those of the tokens whose text it releases."""
    eng, segs = segments(name)
    _, _, kwargs, script = CASES[name]
    if script is not None:
        kwargs = {**kwargs, "propose": _script(eng, script)}
    events = list(eng.stream(segs, logprobs=2, **kwargs))
    out = events[-1].output
    streamed = [e for ev in events if ev.text for e in ev.logprobs]
    assert all(ev.logprobs is None for ev in events if not ev.text)
    assert streamed == out.logprobs[:len(streamed)]
    text_tokens = [i for i in out.generated_ids if i not in _signal_ids(eng)]
    assert [e.token_id for e in out.logprobs] == text_tokens
    if name == "vicuna-stop-string":
        assert out.finish_reason == "stop" and len(streamed) < len(out.logprobs)
    else:
        assert len(streamed) == len(out.logprobs)
