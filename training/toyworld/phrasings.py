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
from pathlib import Path
from collections.abc import Iterable, Sequence

import numpy as np

from polymodal.modality import Modality
from training.toyworld.data import COLOURS, DIRECTIONS, PITCHES_HZ, SHAPES, TEMPLATES, TIMBRES

IMAGE, AUDIO, VIDEO = Modality.IMAGE, Modality.AUDIO, Modality.VIDEO

CAPTION_TEMPLATES: dict[Modality, tuple[str, ...]] = dict(TEMPLATES)  # a copy: the other recipes' are added

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


def register_requests(modality: Modality | str, *, captions: Sequence[str], train: Sequence[str],
                      heldout: Sequence[str], lead_ins: Sequence[str], combos: Sequence[dict[str, str]]) -> None:
    """Add a toy recipe's phrasings (a modality beyond :mod:`training.toyworld.data`'s three) to the tables:
    caption templates, training and held-out request wrappers, lead-ins, attribute combinations. The existing
    modalities' draws do not change (:func:`requests` seeds by the modality's registration index).

    Raises:
        ValueError: the modality has phrasings already, a bank is empty, or a held-out prompt is a training one.
    """
    modality = Modality.parse(modality)
    if modality in TRAIN_REQUESTS:
        raise ValueError(f"{modality.value} has request phrasings already")
    if not (captions and train and heldout and lead_ins and combos):
        raise ValueError(f"{modality.value}: every bank (captions, train, heldout, lead_ins, combos) needs an entry")
    prompts = {split: {w.format(caption=t.format(**a)) for w in bank for t in captions for a in combos}
               for split, bank in (("train", train), ("heldout", heldout))}
    common = sorted(prompts["train"] & prompts["heldout"])
    if common:
        raise ValueError(f"{modality.value}: {len(common)} held-out requests are training ones, e.g. {common[:3]}")
    CAPTION_TEMPLATES[modality] = tuple(captions)
    TRAIN_REQUESTS[modality] = tuple(train)
    HELDOUT_REQUESTS[modality] = tuple(heldout)
    LEAD_INS[modality] = tuple(lead_ins)
    ATTRIBUTE_COMBOS[modality] = [dict(a) for a in combos]


def _register_recipes() -> None:
    """The other toy recipes' phrasings (:data:`training.toyworld.checkers.RECIPE_PHRASINGS`: 3D), after the three."""
    from training.toyworld.checkers import RECIPE_PHRASINGS

    for m, phrasings in RECIPE_PHRASINGS.items():
        register_requests(m, **phrasings)


_register_recipes()



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
    # Wide on purpose: with the first 7 phrasings per kind, held-out wordings unlike them ("Could you swap the circle
    # for a square?") were answered with the source's shape (README "Editing"). Each kind mixes verbs, sentence
    # shapes, the old value named before the new one, and lowercase unpunctuated requests; no held-out frame ("make
    # the ...", "give ... a ... colour", "would like", "swap ... for") is among them (tests/test_toyworld_edits.py).
    "recolour": ("Colour the {shape} {colour}.", "Turn the {shape} {colour}.", "Change its colour to {colour}.",
                 "Paint the {shape} {colour}.", "Recolour it {colour}.", "Now in {colour}, please.",
                 "Can you make it {colour} instead of {old_colour}?", "Switch the colour to {colour}.",
                 "I want it in {colour}.", "Fill the {shape} with {colour}.", "The {shape} should be {colour} now.",
                 "Redo it in {colour}.", "Same {shape}, but {colour}, please.", "Could it be {colour} instead?",
                 "Change the {old_colour} to {colour}.", "Let me see it in {colour}.", "colour it {colour}",
                 "paint the {shape} {colour}", "Use {colour} instead of {old_colour}.",
                 "Please recolour the {old_colour} {shape} to {colour}.", "How about a {colour} one?",
                 "Go with {colour} for the {shape}.", "Turn this {old_colour} {shape} {colour}."),
    "reshape": ("Turn it into a {shape}.", "Change it to a {shape}.", "Change its shape to a {shape}.",
                "Now as a {shape}, please.", "Reshape it into a {shape}.", "Replace the {old_shape} with a {shape}.",
                "Can you make it a {shape} instead of a {old_shape}?", "Transform it into a {shape}.",
                "Redraw it as a {shape}.", "Same colour, but a {shape}, please.", "Could it be a {shape} instead?",
                "I want a {shape}, not a {old_shape}.", "Put a {shape} in its place.",
                "Change the {old_shape} into a {shape}.", "The {old_shape} should become a {shape}.",
                "Instead of the {old_shape}, draw a {shape}.", "Let me see it as a {shape}.",
                "turn it into a {shape}", "Convert the {old_shape} to a {shape}.", "How about a {shape} instead?",
                "Use a {shape} instead of the {old_shape}.", "Reshape the {old_colour} {old_shape} into a {shape}.",
                "change it to a {shape}"),
}
HELDOUT_EDITS: dict[str, tuple[str, ...]] = {
    "recolour": ("make the {shape} {colour}", "Could you give the {shape} a {colour} colour?",
                 "I would like the {shape} to be {colour}."),
    "reshape": ("make it a {shape}", "Could you swap the {old_shape} for a {shape}?",
                "I would like a {shape} there instead."),
}
# the assistant's answer before the edited image (then the image; its caption states the edited attributes)
EDIT_LEAD_INS: tuple[str, ...] = ("Here it is: {caption}.", "Done, here is {caption}.", "Sure, now it is {caption}.")
EDIT_GROUP_FIRST_SHARE = 0.5
"""The share of edit answers that open with the edited image (no lead-in): ``POST /v1/images/edits`` on the toy preset
forces the image group at the answer's start (``prompt_lead_in_tokens: 0``), so its signal states must come from the
instruction and the source alone, as these answers train them."""


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
    return edit_phrasing(kind, heldout=heldout, choice=choice).format(old_colour=source["colour"],
                                                                      old_shape=source["shape"], **target)


def edit_phrasing(kind: str, *, heldout: bool, choice: int) -> str:
    """The template :func:`edit_instruction` fills for ``kind`` and ``choice`` (e.g. ``"make it a {shape}"``)."""
    bank = (HELDOUT_EDITS if heldout else TRAIN_EDITS)[kind]
    return bank[int(choice) % len(bank)]


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


# ---- plain questions: the training bank (instruct stage), disjoint from the held-out ones ---------------
# Other templates, other countries, other words and other facts than plain_questions draws from, and kinds it
# has none of (advice, small talk, questions about media that ask for none, questions that name a toy
# attribute without asking for a medium: "How many sides does a triangle have?"). The answers are the base
# model's own (training.toyworld.plain): the stage learns that these get words, not signal tokens.
_TRAIN_ARITHMETIC = ("What's {a} plus {b}?", "Calculate {a} multiplied by {b}.", "Subtract {b} from {a}.",
                     "What is {a} divided by {b}?", "Can you add up {a} and {b} for me?", "What is {a} squared?",
                     "Is {a} an even or an odd number?", "What is the sum of {a}, {b} and 10?",
                     "If I have {a} apples and eat {b}, how many are left?", "What is half of {a}?")
_TRAIN_COUNTRIES = ("New Zealand", "South Korea", "Pakistan", "Bangladesh", "Philippines", "Malaysia", "Saudi Arabia",
                    "Iran", "Israel", "Jordan", "Ethiopia", "Ghana", "Tanzania", "Uganda", "South Africa", "Algeria",
                    "Tunisia", "Venezuela", "Ecuador", "Bolivia", "Uruguay", "Romania", "Bulgaria", "Serbia",
                    "Croatia", "Estonia", "Latvia", "Lithuania", "Nepal", "Mongolia", "Jamaica", "Czechia")
_TRAIN_COUNTRY_TEMPLATES = ("Which city is the capital of {c}?", "Name the capital city of {c}.",
                            "On which continent is {c}?", "What language do people speak in {c}?")
_TRAIN_WORDS = ("friendship", "courage", "economy", "telescope", "bacteria", "climate", "electricity", "evolution",
                "philosophy", "poetry", "mathematics", "geography", "history", "chemistry", "biology", "astronomy",
                "volunteer", "neighbour", "library", "hospital", "bridge", "river", "desert", "forest", "ocean",
                "planet", "comet", "galaxy", "battery", "magnet", "computer", "internet", "keyboard", "password",
                "budget", "salary", "holiday", "breakfast", "vitamin", "protein", "muscle", "skeleton", "compass",
                "thunder", "rainbow", "earthquake", "hurricane", "drought", "election", "parliament")
_TRAIN_WORD_TEMPLATES = ("What is {w}?", "Explain {w} to a child.", "Can you tell me what {w} means?",
                         "Describe {w} in a few words.")
_TRAIN_FACTS = (
    "Who wrote Romeo and Juliet?", "What is the speed of light?", "How many planets are in the solar system?",
    "What is the smallest prime number?", "Who invented the light bulb?", "What is the largest desert?",
    "Which animal is known as the king of the jungle?", "How many teeth does an adult human have?",
    "Who was Albert Einstein?", "What do caterpillars turn into?", "How many months have 31 days?",
    "Who painted the ceiling of the Sistine Chapel?", "What is the main language of Mexico?",
    "When did the Titanic sink?", "What is the heart's job?", "Why do we have seasons?", "How do plants make food?",
    "What causes rain?", "Why does the moon change shape?", "What is the closest star to Earth?",
    "How far is the moon from Earth?", "What is DNA?", "Who was Cleopatra?", "What is the Great Wall of China?",
    "How old is the universe?", "What are the three states of matter?", "Why is the ocean salty?",
    "What is the biggest country by area?", "How many people live on Earth?", "Who wrote Pride and Prejudice?",
    "What is the tallest animal?", "How do airplanes fly?", "What is a leap year?", "Why do cats purr?",
    "How many hearts does an octopus have?", "What is the largest bone in the human body?", "Who built the pyramids?",
    "What is the square root of 144?", "What is the smallest country in the world?",
    "What is the fastest land animal?", "What is the Milky Way?", "Why do birds migrate?", "Who was Napoleon?",
    "What is the Eiffel Tower?", "What do pandas eat?", "Why do we yawn?", "How do fish breathe?",
    "What is a black hole?")
_TRAIN_ADVICE = (
    "How can I sleep better?", "How do I stay focused while studying?", "What should I eat before a run?",
    "How can I save money each month?", "How do I start learning a new language?", "What is a good way to relax "
    "after work?", "How can I be more productive in the morning?", "How do I write a good cover letter?",
    "What should I pack for a weekend trip?", "How can I drink more water during the day?",
    "How do I prepare for a job interview?", "How can I keep my houseplants alive?", "What are some tips for "
    "public speaking?", "How do I make friends in a new city?", "How can I improve my handwriting?",
    "How do I cook rice?", "How should I start exercising?", "What can I do when I feel stressed?",
    "How do I keep my laptop battery healthy?", "How can I remember names better?", "How do I boil an egg?",
    "What is a healthy breakfast?", "How do I clean a cast iron pan?", "How can I read more books?",
    "How do I apologise to a friend?", "Any tips for a long flight?", "How can I learn to type faster?",
    "How do I make a budget?", "What should I do if I cannot sleep?", "How can I be a better listener?")
_TRAIN_SMALL_TALK = (
    "Hello!", "Hi there, how are you?", "Good morning!", "What's your name?", "Thank you!", "Thanks for your help.",
    "Tell me a joke.", "Who are you?", "What can you do?", "Goodbye!", "Nice to meet you.", "How is your day going?",
    "Are you a robot?", "What do you like to talk about?", "Can you help me with something?", "I'm bored.",
    "Do you have feelings?", "What is your favourite book?", "Say something nice.", "I had a great day today!",
    "Tell me a fun fact.", "What should we talk about?", "Can you keep a secret?", "Are you smart?",
    "Let's chat for a bit.")
_TRAIN_ABOUT_MEDIA = (  # they name pictures, sounds or videos, and ask for words
    "What is a photograph?", "How does a camera work?", "Who invented the telephone?", "What is a podcast?",
    "How do speakers produce sound?", "What does a film director do?", "Why do online videos buffer?",
    "What file format is best for photos?", "How fast does sound travel?", "What is the difference between an "
    "image and a video?", "How many frames per second does a film usually have?", "What is a pixel?",
    "Who painted The Starry Night?", "What is an audiobook?", "How do I take better photos with my phone?",
    "Why do old movies look grainy?", "What is an echo?", "How does a microphone work?", "What is animation?",
    "Who was Charlie Chaplin?", "What is a music video?", "How do I describe a painting?",
    "What makes a good photograph?", "What is the loudest animal?", "How do bats use sound?",
    "What is a video game?", "What was the first movie ever made?", "What is a sketch?",
    "Why do we hear thunder after lightning?", "What is a documentary?", "How does television work?",
    "What is digital art?", "What does a sound engineer do?", "How do hearing aids work?",
    "Why are some sounds unpleasant?", "What is a camera lens?", "What is the purpose of a storyboard?",
    "How is a cartoon made?", "What is an image file?", "Can you explain what resolution means for a screen?")
_TRAIN_TOY_WORDS = (  # toy attributes named, no medium asked for
    "How many sides does a triangle have?", "What is the area of a square with sides of 4 cm?",
    "Why is the sky blue?", "What colour do you get when you mix blue and yellow?",
    "How do you find the circumference of a circle?", "Why are leaves green?", "What does a red traffic light mean?",
    "What is a square number?", "What is a high note in music?", "Why do some people hear a low hum at night?",
    "Which way does the sun move across the sky?", "Is a square a rectangle?", "What is a sine wave?",
    "Why is a tomato red?", "What does moving up a level in a game mean?", "What is a right triangle?",
    "What makes a sound loud or quiet?", "How many degrees are in a circle?", "Why do bananas turn yellow?",
    "What is the green light in a traffic light for?")


def plain_training_questions(seed: int = 0) -> list[str]:
    """The training bank of plain questions (each once, a fixed order for ``seed``): arithmetic, geography,
    definitions, facts, advice, small talk, questions about media that ask for none, and questions that name a
    toy attribute without asking for a medium. Disjoint from every held-out plain question
    (:func:`plain_questions`) and every held-out media request (:func:`all_prompts`), checked here.

    Raises:
        AssertionError: a question is also a held-out one (names a few).
    """
    rng = np.random.default_rng([seed, 11])
    arithmetic = []
    for k in range(100):
        a, b = (int(x) for x in rng.integers(2, 100, size=2))
        arithmetic.append(_TRAIN_ARITHMETIC[k % len(_TRAIN_ARITHMETIC)].format(a=max(a, b), b=max(1, min(a, b))))
    geography = [_TRAIN_COUNTRY_TEMPLATES[k % len(_TRAIN_COUNTRY_TEMPLATES)].format(c=c)
                 for k, c in enumerate(_TRAIN_COUNTRIES)]
    geography += [_TRAIN_COUNTRY_TEMPLATES[(k + 1) % len(_TRAIN_COUNTRY_TEMPLATES)].format(c=c)
                  for k, c in enumerate(_TRAIN_COUNTRIES[::2])]
    words = [_TRAIN_WORD_TEMPLATES[k % len(_TRAIN_WORD_TEMPLATES)].format(w=w) for k, w in enumerate(_TRAIN_WORDS)]
    bank = list(dict.fromkeys([*arithmetic, *geography, *words, *_TRAIN_FACTS, *_TRAIN_ADVICE, *_TRAIN_SMALL_TALK,
                               *_TRAIN_ABOUT_MEDIA, *_TRAIN_TOY_WORDS]))
    assert_disjoint(plain_questions(200), bank)
    for m in HELDOUT_REQUESTS:
        assert_disjoint(all_prompts(m, heldout=True), bank)
    order = rng.permutation(len(bank))
    return [bank[i] for i in order]


SPOKEN_VOCABULARY = "spoken-vocabulary.txt"
"""The toy presets' spoken-input corpus in the shipped build (``polymodal/assets/toy``; :func:`write_spoken_corpus`)."""


def spoken_sentence(text: str) -> str:
    """``text`` as a line of a recogniser's corpus: numbers spelled out (num2words: "47" -> "forty seven"),
    lower-case words, no punctuation (apostrophes kept: "what's")."""
    import re

    from num2words import num2words

    spelled = re.sub(r"\d+", lambda m: f" {num2words(int(m.group()))} ", text).replace("-", " ")
    return " ".join(re.findall(r"[a-z]+(?:'[a-z]+)*", spelled.lower()))


def spoken_corpus() -> list[str]:
    """What a toy user is trained to say, as a recogniser's corpus (issue #26: the ``toy`` presets'
    :attr:`~polymodal.config.PresetConfig.spoken_vocabulary`): every training request of every modality
    (:func:`all_prompts`, ``heldout=False``) and the training bank of plain questions
    (:func:`plain_training_questions`), each through :func:`spoken_sentence`, unique, sorted. No held-out request or
    question is in it (their words may be: the attributes are shared). A line with a word that pocketsphinx's
    dictionary cannot pronounce is left out (5 words today: "torus", "cm", "czechia", "audiobook", "houseplants"; the
    recogniser refuses a corpus with such words)."""
    from skills.asr import dictionary_words

    known = dictionary_words()
    lines = {spoken_sentence(p) for m in TRAIN_REQUESTS for p in all_prompts(m, heldout=False)}
    lines |= {spoken_sentence(q) for q in plain_training_questions()}
    return sorted(ln for ln in lines if ln and set(ln.split()) <= known)


def write_spoken_corpus(path: str | Path) -> Path:
    """Write :func:`spoken_corpus` (a comment line first) to ``path`` (atomically) and return it."""
    import os

    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("# polymodal toy world: training requests and plain questions, as said "
                   "(training.toyworld.phrasings.spoken_corpus)\n" + "\n".join(spoken_corpus()) + "\n",
                   encoding="utf-8")
    os.replace(tmp, path)
    return path
