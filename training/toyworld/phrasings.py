"""How people ask the toy world for media: request wrappers, split into a training and a held-out bank.

A request is a wrapper around a caption phrasing (:data:`training.toyworld.data.IMAGE_TEMPLATES` ...):
``"Draw {caption}."`` with ``caption = "a blue triangle"``. Alignment data (decode, instruct, the toy MosIT
writer) uses only :data:`TRAIN_REQUESTS`; the benchmark uses only :data:`HELDOUT_REQUESTS`, so no benchmark
prompt is a training prompt (:func:`assert_disjoint` checks whole prompt strings). Answers before a medium
(the instruct stage's lead-ins) come from :data:`LEAD_INS`.

Attribute lists are shared with :mod:`training.toyworld.data`; nothing here maps words to media (the
decoders and the aligned LLM do).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import numpy as np

from polymodal.modality import Modality
from training.toyworld.data import COLOURS, DIRECTIONS, PITCHES_HZ, SHAPES, TEMPLATES, TIMBRES

IMAGE, AUDIO, VIDEO = Modality.IMAGE, Modality.AUDIO, Modality.VIDEO

CAPTION_TEMPLATES: dict[Modality, tuple[str, ...]] = TEMPLATES

TRAIN_REQUESTS: dict[Modality, tuple[str, ...]] = {
    IMAGE: ("{caption}", "Draw {caption}.", "Show me {caption}.", "Please generate {caption}.",
            "Can you make {caption}?", "I want to see {caption}.", "Create {caption}.", "Paint {caption}."),
    AUDIO: ("{caption}", "Play {caption}.", "Generate {caption}.", "Let me hear {caption}.",
            "Can you make {caption}?", "Please produce {caption}.", "I want to hear {caption}.",
            "Create {caption}."),
    VIDEO: ("{caption}", "Show me {caption}.", "Generate {caption}.", "Animate {caption}.",
            "Can you make {caption}?", "Please produce {caption}.", "I want to see {caption}.",
            "Create {caption}."),
}

HELDOUT_REQUESTS: dict[Modality, tuple[str, ...]] = {
    IMAGE: ("Could you draw {caption} for me?", "I would like {caption}.", "Make me {caption}, please.",
            "Give me {caption}."),
    AUDIO: ("Could you play {caption} for me?", "I would like {caption}.", "Make me {caption}, please.",
            "Give me {caption}."),
    VIDEO: ("Could you show {caption} for me?", "I would like {caption}.", "Make me {caption}, please.",
            "Give me {caption}."),
}

LEAD_INS: dict[Modality, tuple[str, ...]] = {
    IMAGE: ("Here is {caption}.", "Sure, here is {caption}.", "This is {caption}."),
    AUDIO: ("Here is {caption}.", "Sure, listen to {caption}.", "This is {caption}."),
    VIDEO: ("Here is {caption}.", "Sure, watch {caption}.", "This is {caption}."),
}

# what a request asks for (the scored attributes are a subset: training.toyworld.evaluate.SCORED)
ATTRIBUTE_COMBOS: dict[Modality, list[dict[str, str]]] = {
    IMAGE: [{"colour": c, "shape": s} for c, s in itertools.product(COLOURS, SHAPES)],
    AUDIO: [{"pitch": p, "timbre": t} for p, t in itertools.product(PITCHES_HZ, TIMBRES)],
    VIDEO: [{"direction": d, "colour": c, "shape": s} for d, c, s in itertools.product(DIRECTIONS, COLOURS, SHAPES)],
}


def caption_attributes(template: str, attrs: dict[str, str]) -> dict[str, str]:
    """The attributes a caption made from ``template`` actually states (a template may leave some out)."""
    return {k: v for k, v in attrs.items() if "{" + k + "}" in template}


def requests(modality: Modality | str, n: int, *, heldout: bool, seed: int = 0) -> list[tuple[str, str, dict]]:
    """``n`` (request, caption, stated attributes) triples drawn from the train or held-out bank.

    Every attribute combination comes equally often (cycled; then shuffled with ``seed``); a last, partial
    cycle takes a random subset of the combinations (not the first ones: those share their first attribute,
    e.g. 8 video requests would all move left); wrapper and caption template are drawn per item.
    """
    modality = Modality.parse(modality)
    bank = (HELDOUT_REQUESTS if heldout else TRAIN_REQUESTS)[modality]
    combos = ATTRIBUTE_COMBOS[modality]
    key = [seed, 1 if heldout else 0, list(Modality).index(modality)]
    rng = np.random.default_rng(key)
    whole = n - n % len(combos)
    partial = np.random.default_rng(key + [2]).permutation(len(combos))  # own stream: whole cycles unchanged
    out = []
    for i in range(n):
        attrs = combos[i % len(combos) if i < whole else int(partial[i - whole])]
        template = CAPTION_TEMPLATES[modality][rng.integers(len(CAPTION_TEMPLATES[modality]))]
        caption = template.format(**attrs)
        wrapper = bank[rng.integers(len(bank))]
        out.append((wrapper.format(caption=caption), caption, caption_attributes(template, attrs)))
    order = rng.permutation(n)
    return [out[i] for i in order]


def all_prompts(modality: Modality | str, *, heldout: bool) -> set[str]:
    """Every request string a bank can produce (every wrapper x template x attribute combination)."""
    modality = Modality.parse(modality)
    bank = (HELDOUT_REQUESTS if heldout else TRAIN_REQUESTS)[modality]
    return {w.format(caption=t.format(**a)) for w in bank for t in CAPTION_TEMPLATES[modality]
            for a in ATTRIBUTE_COMBOS[modality]}


def assert_disjoint(benchmark_prompts: Iterable[str], training_prompts: Sequence[str] | set[str]) -> None:
    """Raises:
        AssertionError: a benchmark prompt also occurs among the training prompts (names a few)."""
    train = set(training_prompts)
    common = sorted(set(benchmark_prompts) & train)
    if common:
        raise AssertionError(f"{len(common)} benchmark prompts are training prompts, e.g. {common[:3]}")


# ---- edits (issue #27): change one attribute of a shared image ------------------------------------------
# An edit instruction changes one attribute of the image the human shares: ``recolour`` its colour (the shape
# kept), ``reshape`` its shape (the colour kept). ``{shape}`` / ``{colour}`` are the *target* values; ``{old_shape}``
# / ``{old_colour}`` the source's. The toy MosIT writer (``edits=True``) uses only TRAIN_EDITS; bench/editing.py's
# quality mode only HELDOUT_EDITS (the issue's own phrasings "make the triangle green" / "make it a circle" are
# held out); no instruction string is in both (:func:`all_edit_prompts`, :func:`assert_disjoint`).
EDIT_KINDS: tuple[str, ...] = ("recolour", "reshape")
EDIT_ATTRIBUTE: dict[str, str] = {"recolour": "colour", "reshape": "shape"}
TRAIN_EDITS: dict[str, tuple[str, ...]] = {
    "recolour": ("Colour the {shape} {colour}.", "Turn the {shape} {colour}.", "Change its colour to {colour}.",
                 "Paint the {shape} {colour}.", "Recolour it {colour}.", "Now in {colour}, please.",
                 "Can you make it {colour} instead of {old_colour}?"),
    "reshape": ("Turn it into a {shape}.", "Change it to a {shape}.", "Change its shape to a {shape}.",
                "Now as a {shape}, please.", "Reshape it into a {shape}.", "Replace the {old_shape} with a {shape}.",
                "Can you make it a {shape} instead of a {old_shape}?"),
}
HELDOUT_EDITS: dict[str, tuple[str, ...]] = {
    "recolour": ("make the {shape} {colour}", "Could you give the {shape} a {colour} colour?",
                 "I would like the {shape} to be {colour}."),
    "reshape": ("make it a {shape}", "Could you swap the {old_shape} for a {shape}?",
                "I would like a {shape} there instead."),
}
# the assistant's answer before the edited image (then the image; its caption states the edited attributes)
EDIT_LEAD_INS: tuple[str, ...] = ("Here it is: {caption}.", "Done, here is {caption}.", "Sure, now it is {caption}.")


def edit_instruction(kind: str, source: dict[str, str], target: dict[str, str], *, heldout: bool, choice: int) -> str:
    """An instruction of ``kind`` turning ``source`` attributes (``{"colour", "shape"}``) into ``target``, from the
    training or the held-out bank (phrasing ``choice`` modulo the bank's size: the caller's random draw).

    Raises:
        ValueError: an unknown kind (lists them), or a target that does not change exactly the kind's attribute.
    """
    if kind not in EDIT_KINDS:
        raise ValueError(f"unknown edit kind {kind!r}; choose from: {', '.join(EDIT_KINDS)}")
    changed = {k for k in ("colour", "shape") if source[k] != target[k]}
    if changed != {EDIT_ATTRIBUTE[kind]}:
        raise ValueError(f"a {kind} edit changes the {EDIT_ATTRIBUTE[kind]} alone; {source} -> {target} changes "
                         f"{sorted(changed) or 'nothing'}")
    bank = (HELDOUT_EDITS if heldout else TRAIN_EDITS)[kind]
    return bank[int(choice) % len(bank)].format(old_colour=source["colour"], old_shape=source["shape"],
                                                     **target)


def all_edit_prompts(*, heldout: bool) -> set[str]:
    """Every instruction a bank can produce (every phrasing x source x one-attribute target)."""
    out = set()
    for kind in EDIT_KINDS:
        attr = EDIT_ATTRIBUTE[kind]
        for src in ATTRIBUTE_COMBOS[IMAGE]:
            for tgt in ATTRIBUTE_COMBOS[IMAGE]:
                if tgt[attr] != src[attr] and all(tgt[k] == src[k] for k in src if k != attr):
                    out |= {p.format(old_colour=src["colour"], old_shape=src["shape"], **tgt)
                            for p in (HELDOUT_EDITS if heldout else TRAIN_EDITS)[kind]}
    return out


# ---- plain questions: held out, answered in words (no medium is asked for) ------------------------------
# Sent without `modalities` to measure how often the model draws, plays or animates unasked (bench/toyworld.py,
# bench/reliability.py). None states a toy attribute (colour, shape, pitch, timbre, direction; checked by
# plain_questions). A training bank of plain questions, if the instruct stage gets one, must stay disjoint.
_ARITHMETIC = ("What is {a} + {b}?", "What is {a} times {b}?", "How much is {a} minus {b}?",
               "What do you get when you add {a} and {b}?")
_CAPITALS = ("France", "Germany", "Italy", "Spain", "Portugal", "Japan", "China", "India", "Brazil", "Canada",
             "Australia", "Egypt", "Kenya", "Mexico", "Argentina", "Norway", "Sweden", "Finland", "Poland",
             "Greece", "Turkey", "Ireland", "Austria", "Hungary", "Chile", "Peru", "Thailand", "Vietnam",
             "Nigeria", "Morocco", "Denmark", "Belgium", "Netherlands", "Switzerland", "Russia", "Iceland",
             "Cuba", "Colombia", "Ukraine", "Indonesia")
_WORDS = ("democracy", "photosynthesis", "gravity", "metaphor", "inflation", "algorithm", "ecosystem", "entropy",
          "irony", "vaccine", "glacier", "harmony", "justice", "molecule", "nostalgia", "orbit", "paradox",
          "recipe", "satire", "tariff", "umbrella", "volcano", "wisdom", "yeast", "zenith", "alliance", "ballot",
          "census", "dialect", "empathy", "fossil", "grammar", "hypothesis", "island", "journal", "kindness",
          "ledger", "mammal", "novel", "oxygen")
_FACTS = ("How many days are in a week?", "How many hours are in a day?", "Who wrote Hamlet?",
          "What is the boiling point of water in Celsius?", "How many legs does a spider have?",
          "What is the largest planet in our solar system?", "How many continents are there?",
          "What language is spoken in Brazil?", "Who painted the Mona Lisa?", "What is the chemical symbol for gold?",
          "How many minutes are in an hour?", "What is the freezing point of water in Fahrenheit?",
          "Which ocean is the largest?", "How many sides does a hexagon have?", "What gas do plants take in?",
          "Who discovered penicillin?", "What is the tallest mountain on Earth?", "How many bones are in the human body?",
          "What year did the Second World War end?", "Which number times itself gives 81?",
          "What is the opposite of hot?", "What is the plural of mouse?", "How many letters are in the alphabet?",
          "What do bees make?", "Which planet is closest to the sun?", "What is the main ingredient of bread?",
          "How many players are on a football team?", "What is a baby cat called?", "What is ice made of?",
          "Who was the first person to walk on the moon?", "How many weeks are in a year?",
          "What is the longest river in Africa?", "What is the currency of Japan?", "How many strings does a violin have?",
          "What is the hardest natural substance?", "What does a thermometer measure?",
          "What is the largest mammal?", "How many zeros are in one million?", "What is H2O?",
          "What is the capital letter after B?")


def plain_questions(n: int = 200, seed: int = 0) -> list[str]:
    """``n`` held-out plain questions (arithmetic, capitals, definitions, facts), a fixed mix for ``seed``.

    Raises:
        AssertionError: a question names a toy attribute (it would not be plain), or ``n`` is more than the bank.
    """
    rng = np.random.default_rng([seed, 7])
    arithmetic = []
    for k in range(80):
        a, b = (int(x) for x in rng.integers(2, 60, size=2))
        arithmetic.append(_ARITHMETIC[k % len(_ARITHMETIC)].format(a=max(a, b), b=min(a, b)))
    bank = [*arithmetic, *(f"What is the capital of {c}?" for c in _CAPITALS),
            *((f"What does the word '{w}' mean?" if k % 2 else f"Define {w} in one sentence.")
              for k, w in enumerate(_WORDS)), *_FACTS]
    bank = list(dict.fromkeys(bank))
    if n > len(bank):
        raise AssertionError(f"only {len(bank)} plain questions, {n} asked")
    toy_words = {*SHAPES, *COLOURS, *PITCHES_HZ, *TIMBRES, *DIRECTIONS, "draw", "play", "sound", "picture",
                 "image", "video", "tone"}
    for q in bank:
        words = {w.strip("?.,'").lower() for w in q.split()}
        if words & toy_words:
            raise AssertionError(f"plain question {q!r} names {sorted(words & toy_words)}")
    order = rng.permutation(len(bank))[:n]
    return [bank[i] for i in sorted(order)]
