"""Writing dialogues with an LLM.

``per_turn`` (default; small models): the job owns the skeleton - number of exchanges, speakers, where
each medium goes (:func:`plan_dialogue`) - and asks the LLM for the words of each piece with a short
prompt: a question about the topic, a caption for a medium, the assistant's reply. Fixed phrases ("Can
you show me a picture of it?") tie the request to the medium. ``whole`` (large models): one prompt with
the mode's demonstrations; the LLM writes the whole ``Human: / GPT:`` dialogue, placeholders included.

Everything is a function of ``(seed, dialogue index)``: the plan's random choices and every LLM call's
seed, so a shard gives the same dialogues wherever and whenever it runs.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from polymodal.modality import Modality
from mosit.dialogue import GPT, HUMAN, Dialogue, Message, find_placeholders, parse_dialogue, placeholder
from mosit.modes import Mode

# Fixed phrases per medium (by name); a modality without its own phrases gets the templates over its spec's noun.
REQUEST = {
    "image": ("Can you show me a picture of it?", "Could you show me a photo?", "Show me an image, please."),
    "audio": ("Can you play a sound of it?", "Could you let me hear what it sounds like?",
              "Play me a recording, please."),
    "video": ("Can you show me a video of it?", "Could you show me a short clip?", "Show me a video, please."),
}
SHARE_HUMAN = {
    "image": ("Look at this photo.", "I took this picture."),
    "audio": ("Listen to this recording.", "I recorded this sound."),
    "video": ("Watch this clip.", "I filmed this video."),
}
SHARE_GPT = {
    "image": ("Here is a picture.", "Here is a photo for you."),
    "audio": ("Here is a recording.", "Listen to this."),
    "video": ("Here is a video.", "Here is a short clip."),
}
_TEMPLATES = {
    "request": ("Can you show me a {noun} of it?", "Could you show me a {noun}?"),
    "share_human": ("Look at this {noun}.", "I made this {noun}."),
    "share_gpt": ("Here is a {noun}.", "Here is a {noun} for you."),
}
_PHRASES = {"request": REQUEST, "share_human": SHARE_HUMAN, "share_gpt": SHARE_GPT}


def noun(modality: Modality) -> str:
    """The word for one medium in prose (its spec's ``noun``: photo, sound clip, video clip)."""
    return modality.spec.noun


def phrases(kind: str, modality: Modality) -> tuple[str, ...]:
    """The fixed phrases of ``kind`` (``request``, ``share_human``, ``share_gpt``) for ``modality``."""
    own = _PHRASES[kind].get(modality.value)
    return own if own is not None else tuple(t.format(noun=noun(modality)) for t in _TEMPLATES[kind])
SYSTEM = "You are a helpful assistant. Answer briefly and correctly."
WHOLE_SYSTEM = ("You write example dialogues between a Human and an AI assistant called GPT. GPT can show images, "
                "play audio and show videos; a medium is written as a short caption inside tags: "
                "<Image> caption </Image>, <Audio> caption </Audio>, <Video> caption </Video>.")

# Question aspects: the job picks a different one per exchange so a small model does not echo the last turn.
ASPECTS = ("the history of", "how to get started with", "a fun fact about", "the science behind",
           "common mistakes with", "the future of", "the best way to enjoy", "what surprises people about")
P_QUESTION = 'Write one short question about {aspect} "{topic}". Write only the question.'
P_ABOUT_MEDIUM = 'Write one short question about this {noun}: "{caption}". Write only the question.'
P_CAPTION = 'Write a one-sentence caption for a {noun} about "{topic}".'


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from any parts (stable across processes and Python versions)."""
    h = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(h[:4], "big") & 0x7FFFFFFF


@dataclass(frozen=True)
class DialoguePlan:
    """The skeleton of one dialogue.

    Attributes:
        index: dialogue index in the build (0-based); ``id`` is derived from it.
        human_media / gpt_media: per exchange, the media of the human / assistant message.
    """

    index: int
    id: str
    mode: Mode
    topic: str
    num_turns: int
    human_media: tuple[tuple[Modality, ...], ...]
    gpt_media: tuple[tuple[Modality, ...], ...]


def dialogue_id(index: int) -> str:
    return f"mosit-{index:06d}"


def _place(rng: random.Random, media: tuple[Modality, ...], n: int, lo: int = 0) -> list[list[Modality]]:
    """Spread ``media`` (in order) over exchanges ``lo..n-1``: distinct exchanges while they last."""
    slots: list[list[Modality]] = [[] for _ in range(n)]
    if not media:
        return slots
    span = list(range(lo, n))
    k = min(len(media), len(span))
    chosen = sorted(rng.sample(span, k))
    for j, m in enumerate(media):
        slots[chosen[min(j, k - 1)]].append(m)
    return slots


def plan_dialogue(index: int, *, seed: int, modes: dict[str, Mode], weights: dict[str, float], topics: list[str],
                  min_turns: int, max_turns: int) -> DialoguePlan:
    """The skeleton of dialogue ``index``: mode (by weight), topic, exchanges, media positions."""
    rng = random.Random(derive_seed("plan", seed, index))
    names = list(modes)
    mode = modes[rng.choices(names, weights=[weights[n] for n in names])[0]]
    topic = rng.choice(topics)
    n = rng.randint(min_turns, max_turns)
    human = _place(rng, mode.inputs, n)
    first_in = next((t for t in range(n) if human[t]), 0)
    gpt = _place(rng, mode.outputs, n, lo=first_in)
    return DialoguePlan(index, dialogue_id(index), mode, topic, n, tuple(map(tuple, human)), tuple(map(tuple, gpt)))


_LABEL = re.compile(r"^\s*(?:question|follow-up question|answer|caption|reply|response|user|human|assistant|gpt|"
                    r"the person (?:asks|says)|description)\s*[:：]\s*", re.IGNORECASE)
_SENT = re.compile(r"(?<=[.!?])\s+")


def clean_text(text: str, *, max_sentences: int = 1, max_words: int = 30) -> str:
    """The first line of an LLM answer without labels or wrapping quotes, cut to whole sentences (an
    unfinished last sentence is dropped when a finished one precedes it) and a word cap."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    t = lines[0] if lines else ""
    for _ in range(2):
        t = _LABEL.sub("", t).strip().strip('"“”').strip()
    sentences = _SENT.split(t)
    if len(sentences) > 1 and not sentences[-1].rstrip('"\')”').endswith((".", "!", "?")):
        sentences = sentences[:-1]
    t = " ".join(sentences[:max_sentences])
    words = t.split()
    if len(words) > max_words:
        t = " ".join(words[:max_words]).rstrip(",;:") + "."
    return t


def _flat(value: str) -> str:
    """Placeholders replaced by '(a photo: caption)' so a small LLM reads plain prose."""
    out, cursor = [], 0
    for p in find_placeholders(value):
        out.append(value[cursor:p.start])
        out.append(f"(a {noun(p.modality)}: {p.caption})")
        cursor = p.end
    out.append(value[cursor:])
    return " ".join("".join(out).split())


@dataclass
class WriterSettings:
    max_new_tokens: int = 40  # replies (per_turn) or the whole dialogue (whole)
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    short_max_new_tokens: int = 24  # questions and captions (per_turn)


class _Calls:
    """Numbered LLM calls of one dialogue (call k of dialogue i has seed derive_seed(seed, i, k))."""

    def __init__(self, llm, settings: WriterSettings, index: int):
        self.llm, self.s, self.index, self.k = llm, settings, index, 0

    def __call__(self, messages: list[dict[str, str]], max_new_tokens: int | None = None) -> str:
        self.k += 1
        return self.llm.chat(messages, max_new_tokens=max_new_tokens or self.s.max_new_tokens,
                             temperature=self.s.temperature, top_p=self.s.top_p,
                             seed=derive_seed("call", self.s.seed, self.index, self.k))

    def ask(self, prompt: str) -> str:
        return self([{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
                    max_new_tokens=self.s.short_max_new_tokens)


def write_per_turn(plan: DialoguePlan, llm, settings: WriterSettings) -> Dialogue:
    """Write ``plan`` piece by piece (see the module docstring).

    Human message: [share phrase + <medium> for each input medium] + question (about the shared medium,
    else about an aspect of the topic) + [a request phrase per medium the assistant will produce].
    Assistant message: the LLM's reply to the question (it never sees the request phrase, so it does not
    refuse) + a <medium> with an LLM-written caption per output medium.
    """
    rng = random.Random(derive_seed("phrases", settings.seed, plan.index))
    aspects = rng.sample(ASPECTS, k=len(ASPECTS))
    call = _Calls(llm, settings, plan.index)
    messages: list[Message] = []
    chat_history: list[dict[str, str]] = [{"role": "system", "content": SYSTEM}]
    for t in range(plan.num_turns):
        parts: list[str] = []
        question = ""
        for m in plan.human_media[t]:
            cap = clean_text(call.ask(P_CAPTION.format(noun=noun(m), topic=plan.topic)), max_words=25)
            parts += [rng.choice(phrases("share_human", m)), placeholder(m, cap)]
            question = clean_text(call.ask(P_ABOUT_MEDIUM.format(noun=noun(m), caption=cap)))
        if not plan.human_media[t]:
            question = clean_text(call.ask(P_QUESTION.format(aspect=aspects[t % len(aspects)], topic=plan.topic)))
        parts.append(question)
        human_context = _flat(" ".join(p for p in parts if p))
        for m in plan.gpt_media[t]:
            parts.append(rng.choice(phrases("request", m)))
        messages.append(Message(HUMAN, " ".join(p for p in parts if p)))
        chat_history.append({"role": "user", "content": human_context})
        reply = clean_text(call(chat_history), max_sentences=2, max_words=45)
        gparts = [reply]
        for m in plan.gpt_media[t]:
            cap = clean_text(call.ask(P_CAPTION.format(noun=noun(m), topic=plan.topic)), max_words=25)
            if not reply:
                gparts.append(rng.choice(phrases("share_gpt", m)))
            gparts.append(placeholder(m, cap))
        gpt_value = " ".join(p for p in gparts if p)
        messages.append(Message(GPT, gpt_value))
        chat_history.append({"role": "assistant", "content": _flat(gpt_value)})
    return Dialogue(plan.id, plan.mode.name, plan.topic, tuple(messages))


def _media_sentence(who: str, media: tuple[Modality, ...]) -> str:
    if not media:
        return f"{who}'s messages contain no media tags."
    return f"{who}'s messages contain, in this order: " + ", then ".join(f"one {m.value}" for m in media) + "."


def write_whole(plan: DialoguePlan, llm, settings: WriterSettings, demonstrations: list[str]) -> Dialogue:
    """One prompt with the mode's demonstrations; the LLM writes the whole dialogue. An answer without
    ``Human:`` / ``GPT:`` lines gives an empty dialogue (rejected by validation)."""
    call = _Calls(llm, settings, plan.index)
    demos = "\n---\n".join(d.strip() for d in demonstrations)
    user = ((f"Examples:\n{demos}\n\n" if demos else "")
            + f"Write a new dialogue about {plan.topic} with exactly {plan.num_turns} exchanges (each 'Human:' "
              f"line followed by one 'GPT:' line). {_media_sentence('The Human', plan.mode.inputs)} "
              f"{_media_sentence('GPT', plan.mode.outputs)} Write only the dialogue.")
    text = call([{"role": "system", "content": WHOLE_SYSTEM}, {"role": "user", "content": user}])
    try:
        d = parse_dialogue(text, id=plan.id, mode=plan.mode.name, topic=plan.topic)
    except ValueError:
        return Dialogue(plan.id, plan.mode.name, plan.topic, ())
    return d
