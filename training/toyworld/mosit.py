"""The toy world's MosIT dialogue writer: no model, milliseconds per dialogue, toy-world phrasings only.

Use it in a MosIT config (``training/toyworld/mosit.yaml``)::

    llm: {kind: factory, factory: "training.toyworld.mosit:ToyDialogueWriter", strategy: whole,
          options: {catalog: /abs/path/catalog.jsonl}}

``polymodal mosit build`` with ``strategy: whole`` asks its LLM for one whole ``Human: / GPT:`` dialogue per
prompt ("Write a new dialogue about <topic> with exactly N exchanges ... The Human's messages contain no media
tags. GPT's messages contain, in this order: one image. ..."; :func:`mosit.writer.write_whole`). This writer
answers that prompt with:

- per output medium, a request from the *training* bank (:data:`phrasings.TRAIN_REQUESTS`, e.g. ``Draw a blue
  triangle.``) and the answer: a lead-in (:data:`phrasings.LEAD_INS`) and the placeholder,
  ``Here is a drawing of a blue triangle. <Image> a drawing of a blue triangle </Image>``;
- per input medium, ``<Image> one red circle </Image> What is in this picture?`` -> ``It is a red circle.``;
- other exchanges: an opener before the media ("Hi!") or a question about an attribute the last medium's
  caption states ("What colour is it?" -> "It is blue.");
- with ``edits=True`` (issue #27), an exchange where the human shares an image and the assistant shows one is an
  edit: ``<Image> a red triangle </Image> Colour the triangle green.`` -> ``Here it is: a green triangle. <Image>
  a green triangle </Image>`` (a recolour or a reshape, instruction from :data:`phrasings.TRAIN_EDITS`; the
  edited caption a catalog caption, so the answer's image target is the edited image's caption); a share
  :data:`phrasings.EDIT_GROUP_FIRST_SHARE` of the answers is the edited image alone (no lead-in), as
  ``/v1/images/edits`` asks the toy for it.

Skill use (issue #25, mode :data:`SKILL_USE_MODE`): :func:`write_skill_use_dialogues` writes LLaVA-Plus's four turns
over toy scenes (``<Image> scene.png </Image> Where is the red circle?`` -> the skill_use turn -> ``locate model
outputs: {...}`` -> the answer) as MosIT records directly: a scene is rendered with its question and truth
(:mod:`training.toyworld.skilluse`), not retrieved from the catalog by caption, and its turns are rendered by the
serving code (the ``llava-plus`` tool format, the skill loop's result text, the real toy skills).

Placeholder captions are captions of ``catalog`` (the ``catalog.jsonl`` the build reads), drawn item by item,
so the build's retrieval finds an item with exactly that caption. With ``retrieval.threshold: 0.999`` nothing
else can match: the closest two distinct toy captions ("a video of a yellow triangle moving left" / "... right")
have all-MiniLM-L6-v2 cosine 0.990. A request's caption is another phrasing (:data:`phrasings.CAPTION_TEMPLATES`)
of exactly the attributes the placeholder caption states, so what is asked for is what is shown.

Deterministic: every choice comes from ``sha256(messages, seed)``. ``per_turn`` prompts are refused
(ValueError): the job's per-turn question prompt does not say which medium the assistant will produce, so a
toy request cannot be written for it.

This module does not import :mod:`mosit` (imports flow mosit -> polymodal): it reads the prompt text.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from polymodal.modality import Modality
from training.toyworld.phrasings import (
    ATTRIBUTE_COMBOS,
    CAPTION_TEMPLATES,
    EDIT_ATTRIBUTE,
    EDIT_GROUP_FIRST_SHARE,
    EDIT_KINDS,
    EDIT_LEAD_INS,
    LEAD_INS,
    TRAIN_REQUESTS,
    caption_attributes,
    edit_instruction,
)

IMAGE, AUDIO, VIDEO = Modality.IMAGE, Modality.AUDIO, Modality.VIDEO

# comprehension: a question about a medium the human shares, and the answer's forms ({caption}: a phrasing of
# exactly the attributes the shared medium's caption states)
ASK_ABOUT: dict[Modality, tuple[str, ...]] = {
    IMAGE: ("What is in this picture?", "What do you see in this image?", "Describe this picture.",
            "What is this?"),
    AUDIO: ("What do you hear?", "What is this sound?", "Describe this sound.", "What is this?"),
    VIDEO: ("What happens in this video?", "What do you see in this clip?", "Describe this video.",
            "What is this?"),
}
DESCRIBE: dict[Modality, tuple[str, ...]] = {
    IMAGE: ("It is {caption}.", "This is {caption}.", "I see {caption}."),
    AUDIO: ("It is {caption}.", "This is {caption}.", "I hear {caption}."),
    VIDEO: ("It is {caption}.", "This is {caption}.", "I see {caption}."),
}
# follow-ups about an attribute the last medium's caption states: (question, answer with {value}); a question
# names no attribute value, so every attribute word of a dialogue describes its medium
FOLLOW_UPS: dict[str, tuple[tuple[str, str], ...]] = {
    "colour": (("What colour is it?", "It is {value}."), ("Which colour does it have?", "It is {value}.")),
    "shape": (("What shape is it?", "It is a {value}."), ("Which shape is that?", "That is a {value}.")),
    "direction": (("Which way does it move?", "It moves {value}."),
                  ("In which direction does it go?", "It goes {value}.")),
    "pitch": (("Which pitch does it have?", "It is a {value} tone."), ("What pitch is it?", "Its pitch is {value}.")),
    "timbre": (("What kind of wave is it?", "It is a {value} wave."),
               ("What does the tone sound like?", "It is a {value} tone.")),
}
THANKS: tuple[tuple[str, str], ...] = (("Thanks!", "You're welcome."), ("Thank you.", "Glad to help."),
                                       ("Nice, thanks.", "Happy to help."))
OPENERS: tuple[tuple[str, str], ...] = (
    ("Hi!", "Hello! I can draw shapes, play tones and animate moving shapes."),
    ("Hello, what can you do?", "I can draw coloured shapes, play tones and show shapes that move."),
    ("Hi there.", "Hi! Ask me for a picture, a tone or a moving shape."),
)

# the parts of mosit.writer.write_whole's prompt that this writer reads
_EXCHANGES = re.compile(r"with exactly (\d+) exchanges")
_MEDIA = re.compile(r"(The Human|GPT)'s messages contain(?: no media tags|, in this order: ([^.]+))\.")
_ONE = re.compile(r"^one (\w+)$")


@dataclass(frozen=True)
class ToyCaption:
    """A caption of the catalog and the attributes it states (``stated``: e.g. ``{"colour": "blue", "shape":
    "triangle"}``; a template may leave some of the item's attributes out)."""

    modality: Modality
    caption: str
    stated: tuple[tuple[str, str], ...]

    @property
    def attributes(self) -> dict[str, str]:
        return dict(self.stated)


@dataclass(frozen=True)
class WholePrompt:
    """What a ``strategy: whole`` prompt asks for: exchanges and the human / assistant media in order."""

    num_turns: int
    inputs: tuple[Modality, ...]
    outputs: tuple[Modality, ...]


def caption_table(modality: Modality) -> dict[str, dict[str, str]]:
    """Every caption the toy templates can make for ``modality`` -> the attributes it states.

    Raises:
        ValueError: two templates make the same string with different attributes (an ambiguous template set).
    """
    out: dict[str, dict[str, str]] = {}
    for template in CAPTION_TEMPLATES[modality]:
        for attrs in ATTRIBUTE_COMBOS[modality]:
            text, stated = template.format(**attrs), caption_attributes(template, attrs)
            if out.setdefault(text, stated) != stated:
                raise ValueError(f"ambiguous toy caption {text!r}: states {out[text]} and {stated}")
    return out


def parse_caption(modality: Modality | str, caption: str) -> dict[str, str] | None:
    """The attributes a toy caption states, or None when ``caption`` is no toy caption of ``modality``."""
    modality = Modality.parse(modality)
    return _TABLES[modality].get(" ".join(caption.split()))


_TABLES: dict[Modality, dict[str, dict[str, str]]] = {m: caption_table(m) for m in CAPTION_TEMPLATES}


def parse_whole_prompt(text: str) -> WholePrompt:
    """Read the exchange count and the media of ``mosit.writer.write_whole``'s prompt.

    Raises:
        ValueError: the text is not such a prompt (e.g. a ``per_turn`` prompt), or names an unknown medium.
    """
    n = _EXCHANGES.search(text)
    media = {who: spec for who, spec in _MEDIA.findall(text)}
    if not n or set(media) != {"The Human", "GPT"}:
        raise ValueError("ToyDialogueWriter writes whole dialogues: set llm.strategy: whole in the MosIT config "
                         f"(got a prompt it cannot read: {text[-160:]!r})")

    def seq(spec: str) -> tuple[Modality, ...]:
        out = []
        for part in spec.split(", then ") if spec else ():
            m = _ONE.match(part.strip())
            if not m:
                raise ValueError(f"cannot read the media list {spec!r} of the prompt")
            out.append(Modality.parse(m.group(1)))
        return tuple(out)

    return WholePrompt(int(n.group(1)), seq(media["The Human"]), seq(media["GPT"]))


def load_toy_captions(catalog: str | Path) -> dict[Modality, list[ToyCaption]]:
    """One :class:`ToyCaption` per catalog line (file order; repeated captions repeat, so drawing a line
    uniformly follows the catalog's caption distribution).

    Raises:
        FileNotFoundError: no such catalog.
        ValueError: a line whose caption is no toy caption of its modality, or whose stated attributes
            disagree with its ``attributes``.
    """
    from training.toyworld.data import read_catalog

    path = Path(os.path.expandvars(str(catalog))).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"toy catalog not found: {path} (write one with `polymodal toyworld data --out DIR`)")
    out: dict[Modality, list[ToyCaption]] = {m: [] for m in Modality}
    for row in read_catalog(path):
        m = Modality.parse(row["modality"])
        stated = parse_caption(m, row["caption"])
        if stated is None:
            raise ValueError(f"{path}: item {row.get('id')!r}: {row['caption']!r} is not a toy {m.value} caption")
        attrs = row.get("attributes") or {}
        wrong = {k: v for k, v in stated.items() if attrs.get(k) != v}
        if wrong:
            raise ValueError(f"{path}: item {row.get('id')!r}: its caption states {wrong} but its attributes are "
                             f"{ {k: attrs.get(k) for k in wrong} }")
        out[m].append(ToyCaption(m, " ".join(row["caption"].split()), tuple(sorted(stated.items()))))
    return out


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _placeholder(modality: Modality, caption: str) -> str:
    return f"<{modality.spec.tag}> {caption} </{modality.spec.tag}>"


def _spread(media: tuple[Modality, ...], start: int, n: int) -> list[list[Modality]]:
    """One medium per exchange from ``start`` on; what does not fit goes to the last exchange."""
    slots: list[list[Modality]] = [[] for _ in range(n)]
    for j, m in enumerate(media):
        slots[min(start + j, n - 1)].append(m)
    return slots


class ToyDialogueWriter:
    """A ChatLLM (``chat(messages, *, max_new_tokens, temperature, top_p, seed) -> str``) that writes toy-world
    dialogues for ``strategy: whole`` prompts (see the module docstring).

    Args:
        catalog: the toy ``catalog.jsonl`` the build retrieves from (``$VARS`` and ``~`` expanded; a relative
            path is relative to the working directory). Placeholder captions are drawn from its lines.
        max_concurrency: dialogues a shard writes at once (the writer is thread-safe; 1 is fastest on one core).
        edits: an exchange where the human shares one image and the assistant shows one (a mode with ``inputs:
            [image]``, ``outputs: [image]``) is an *edit* (issue #27): ``<Image> {source caption} </Image> {a
            training-bank edit instruction}`` -> ``{edit lead-in} <Image> {edited caption} </Image>``, the edited
            caption a catalog caption that differs from the source's in the asked attribute alone (recolour:
            the colour; reshape: the shape). Off (default): such an exchange is a request beside a shared image.

    Raises:
        FileNotFoundError / ValueError: see :func:`load_toy_captions`; ValueError when a modality the build
            asks for has no catalog item, or (edits) no two catalog images one edit apart (raised by ``chat``).
    """

    def __init__(self, catalog: str | Path, max_concurrency: int = 1, edits: bool = False):
        self.captions = load_toy_captions(catalog)
        self.max_concurrency = int(max_concurrency)
        self.edits = bool(edits)

    def chat(self, messages: list[dict[str, str]], *, max_new_tokens: int = 128, temperature: float = 0.7,
             top_p: float = 0.9, seed: int | None = None) -> str:
        """The dialogue as ``Human: ...`` / ``GPT: ...`` lines (sampling settings are ignored)."""
        last = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
        prompt = parse_whole_prompt(last)
        key = hashlib.sha256(repr((messages, seed)).encode()).digest()
        rng = random.Random(int.from_bytes(key[:8], "big"))
        return "\n".join(f"{'Human' if k % 2 == 0 else 'GPT'}: {v}"
                         for k, v in enumerate(self.write(prompt, rng)))

    def _draw(self, rng: random.Random, modality: Modality) -> ToyCaption:
        pool = self.captions[modality]
        if not pool:
            raise ValueError(f"the toy catalog has no {modality.value} item; write one with all modalities")
        return pool[rng.randrange(len(pool))]

    @staticmethod
    def _rephrase(rng: random.Random, c: ToyCaption) -> str:
        """Another toy phrasing of exactly the attributes ``c`` states."""
        attrs = c.attributes
        fits = [t for t in CAPTION_TEMPLATES[c.modality] if set(re.findall(r"{(\w+)}", t)) == set(attrs)]
        return rng.choice(fits).format(**attrs)

    def write(self, prompt: WholePrompt, rng: random.Random) -> list[str]:
        """Messages (human first, alternating) for ``prompt``: exchanges with media at a random start (openers
        before them), follow-up questions after them."""
        n = max(1, prompt.num_turns)
        media_turns = min(n, max(len(prompt.inputs), len(prompt.outputs), 1))
        start = rng.randint(0, n - media_turns)
        human_media, gpt_media = _spread(prompt.inputs, start, n), _spread(prompt.outputs, start, n)
        openers = rng.sample(OPENERS, k=len(OPENERS))
        messages: list[str] = []
        last: ToyCaption | None = None
        asked: set[str] = set()
        for t in range(n):
            if not human_media[t] and not gpt_media[t]:
                if last is None:
                    human, gpt = openers[t % len(openers)]
                else:
                    human, gpt = self._follow_up(rng, last, asked)
                messages += [human, gpt]
                continue
            if self.edits and human_media[t] == [IMAGE] and gpt_media[t] == [IMAGE]:
                human, gpt, last = self._edit(rng)
                asked = set()
                messages += [human, gpt]
                continue
            human_parts, gpt_parts = [], []
            for m in human_media[t]:
                c = self._draw(rng, m)
                human_parts.append(_placeholder(m, c.caption))
                if not gpt_media[t]:
                    human_parts.append(rng.choice(ASK_ABOUT[m]))
                    gpt_parts.append(rng.choice(DESCRIBE[m]).format(caption=self._rephrase(rng, c)))
                last, asked = c, set()
            for m in gpt_media[t]:
                c = self._draw(rng, m)
                human_parts.append(rng.choice(TRAIN_REQUESTS[m]).format(caption=self._rephrase(rng, c)))
                gpt_parts += [rng.choice(LEAD_INS[m]).format(caption=c.caption), _placeholder(m, c.caption)]
                last, asked = c, set()
            messages += [" ".join(human_parts), _cap(" ".join(gpt_parts))]
        return messages

    def _edit(self, rng: random.Random) -> tuple[str, str, ToyCaption]:
        """One edit exchange (human message, assistant message, the edited image's caption): a source drawn from
        the catalog, an edit kind for which the catalog holds a caption one attribute away, that caption.

        Raises:
            ValueError: no catalog image has another one edit away (after 64 draws).
        """
        pool = self.captions[IMAGE]
        for _ in range(64):
            src = self._draw(rng, IMAGE)
            s = src.attributes
            for kind in rng.sample(EDIT_KINDS, k=len(EDIT_KINDS)):
                attr = EDIT_ATTRIBUTE[kind]
                targets = [c for c in pool if set(c.attributes) == set(s) and c.attributes[attr] != s[attr]
                           and all(c.attributes[k] == v for k, v in s.items() if k != attr)]
                if not targets:
                    continue
                tgt = targets[rng.randrange(len(targets))]
                instruction = edit_instruction(kind, s, tgt.attributes, heldout=False, choice=rng.randrange(1 << 16))
                answer = _placeholder(IMAGE, tgt.caption)
                if rng.random() >= EDIT_GROUP_FIRST_SHARE:
                    answer = f"{_cap(rng.choice(EDIT_LEAD_INS).format(caption=tgt.caption))} {answer}"
                return f"{_placeholder(IMAGE, src.caption)} {instruction}", answer, tgt
        raise ValueError("edits: the toy catalog has no two images that differ in one attribute (colour or shape)")

    @staticmethod
    def _follow_up(rng: random.Random, c: ToyCaption, asked: set[str]) -> tuple[str, str]:
        """A question about an attribute ``c`` states and has not been asked about yet, else thanks."""
        keys = [k for k, _ in c.stated if k not in asked]
        if not keys:
            return rng.choice(THANKS)
        key = rng.choice(keys)
        asked.add(key)
        question, answer = rng.choice(FOLLOW_UPS[key])
        return question, answer.format(value=c.attributes[key])


# ------------------------------------------------------------------------------------------------------------------
# skill use (issue #25): LLaVA-Plus's four turns over toy scenes

SKILL_USE_MODE = "I_S"
"""The MosIT mode of the toy skill-use dialogues: the human shares a toy scene and asks what a skill answers."""
SKILL_USE_SKILLS: tuple[str, ...] = ("locate", "count")
"""The skills listed in the dialogues' system text, in this order (as a request ``skills: ["locate", "count"]`` lists
them: ``bench/skilluse.py``)."""
SKILL_USE_FILE = "skilluse.json"

_USE_THOUGHTS = {
    "locate": ("The question asks for the box of the {colour} {shape}; the locate skill finds it.",
               "I need the pixel box of the {colour} {shape}, so I use locate."),
    "count": ("The question asks how many {colour} shapes there are; the count skill counts them.",
              "I need the number of {colour} shapes, so I use count."),
}
# The answer turns name the result's value within a few words of their start, after an opener that never depends on
# the question: with the first toy-skills build's "The picture holds {n} ..." / "The box of the {label} is ...",
# held-out questions ("Tell me the count of ...") were echoed in place of the value (20 of 21 count misses).
_ANSWERS = {
    "locate": ("The {label} is at {box}.", "Its box is {box}."),
    "locate-none": ("I found no {label} in the picture.",),
    "count": ("There {be} {n} {label}.", "I count {n} {label}."),
}


def skill_use_turns(task, *, call_id: str = "call_0") -> tuple[str, str, str, str]:
    """The four turns of one skill-use dialogue over ``task`` (a :class:`training.toyworld.skilluse.SkillTask`):
    (human question, assistant skill_use, human skill_result, assistant answer), the image not included.

    Rendered by the serving code, so training and serving agree: the skill_use turn by the ``llava-plus``
    :class:`~polymodal.constrained.tools.ToolCallFormat` (``assistant_text``: thoughts, then ``"actions🚀"
    [{"API_name": ..., "API_params": ...}]`` and ``"value👉"``), the skill_result turn as the service's skill loop
    hands a result to that format (:func:`services.ingress.skill_loop.result_text` in ``results_text``), the answer
    by :func:`~polymodal.constrained.tools.llava_plus_answer`. The result is what the real toy skill
    (:mod:`skills.toy`) returns on the scene, and the answer states what the result says (not the scene's truth).
    """
    from polymodal.constrained.tools import LLAVA_PLUS_THOUGHTS, ToolResult, llava_plus, llava_plus_answer
    from polymodal.types import ToolCall
    from services.ingress.skill_loop import SkillCall, result_text
    from services.protocol import SkillOutput
    from skills import build_skill, images

    fmt = llava_plus()
    rng = random.Random(f"{task.family}|{task.question}|{task.arguments}")
    args = dict(task.arguments)
    call = ToolCall(call_id, task.skill, json.dumps(args))
    result = build_skill(task.skill).run(args, images(task.scene.image))
    if not result.ok:
        raise ValueError(f"the toy skill {task.skill!r} failed on a scene: {result.error}")
    words = {"shape": args.get("shape", ""), "colour": args.get("colour", "")}
    skill_use = fmt.assistant_text(LLAVA_PLUS_THOUGHTS + rng.choice(_USE_THOUGHTS[task.skill]).format(**words), [call])
    fed = result_text(SkillCall(call, SkillOutput(result, result.to_dict()), (), 0, None))
    skill_result = fmt.results_text([ToolResult(call_id, task.skill, fed)])
    if task.skill == "locate":
        label = f"{args['colour']} {args['shape']}"
        found = result.data.get("found") or []
        if found:
            box = "[" + ", ".join(str(int(v)) for v in found[0]["box_px"]) + "]"
            answer = rng.choice(_ANSWERS["locate"]).format(label=label, box=box)
        else:
            answer = rng.choice(_ANSWERS["locate-none"]).format(label=label)
    else:
        n = int(result.data["count"])
        label = f"{args['colour']} shape" + ("" if n == 1 else "s")
        answer = rng.choice(_ANSWERS["count"]).format(n=n, label=label, be="is" if n == 1 else "are")
    return task.question, skill_use, skill_result, llava_plus_answer(f"{task.skill} returned: {result.text}.", answer)


def skill_use_system() -> str:
    """The system text of a skill-use dialogue: the toy preset's, then the ``llava-plus`` listing of
    :data:`SKILL_USE_SKILLS` (each skill's JSON schema and description, as the skill loop offers them: the text the
    served model reads when a request enables those skills)."""
    from polymodal.constrained.tools import Tool, llava_plus
    from polymodal.presets.builtin import SMOL_SYSTEM
    from skills import build_skill

    specs = [build_skill(n).spec() for n in SKILL_USE_SKILLS]
    return llava_plus().system_text([Tool(s.name, s.parameters, s.description) for s in specs], base=SMOL_SYSTEM)


def write_skill_use_dialogues(out_dir: str | Path, count: int, *, seed: int = 0) -> Path:
    """Write ``count`` skill-use dialogues (mode :data:`SKILL_USE_MODE`, families alternating) as MosIT records ->
    ``OUT/skilluse.json`` (scenes in ``OUT/images/``; read with the ``mosit`` data format).

    Each record: ``image_list`` (the scene's PNG), ``conversation`` (the four turns of :func:`skill_use_turns`, the
    scene placeholder before the question, as the toy writer's comprehension exchanges put it), ``system`` (the text
    of :func:`skill_use_system`) and ``mode`` / ``family`` / ``truth``. Scenes and questions come from
    :func:`training.toyworld.skilluse.make_task` with the *training* phrasings (``split="train"``; the bench's held-out
    phrasings are disjoint), indices from 1,000,000 on (the bench draws 0..n-1 of the same seed).

    Raises:
        ValueError: ``count`` < 1; a toy skill that fails on a scene.
    """
    from PIL import Image

    from training.toyworld.skilluse import FAMILIES, make_task

    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        family = FAMILIES[i % len(FAMILIES)]
        task = make_task(family, 1_000_000 + i // len(FAMILIES), seed=seed, split="train")
        name = f"scene-{i:06d}.png"
        Image.fromarray(task.scene.image).save(out / "images" / name)
        question, use, result, answer = skill_use_turns(task)
        truth = list(task.truth) if isinstance(task.truth, tuple) else task.truth
        rows.append({"mode": SKILL_USE_MODE, "family": family, "truth": truth,
                     "image_list": [{"name": name}], "system": skill_use_system(),
                     "conversation": [{"from": "human", "value": f"<Image> {name} </Image> {question}"},
                                      {"from": "gpt", "value": use}, {"from": "human", "value": result},
                                      {"from": "gpt", "value": answer}]})
    path = out / SKILL_USE_FILE
    path.write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    return path
