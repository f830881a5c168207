"""Dialogue modes (one registry): which media the human turns carry and which the assistant produces.

Names follow NExT-GPT's MosIT demonstrations (``T_I``: text in, image out; ``T_I_V_A``: image, video and
audio out over the dialogue). Comprehension modes (``I_T``, ``A_T``, ``V_T``) put the medium in a human
turn and the assistant answers in text; mixed modes (``I_A``, ``A_I``, ``V_A``) do both. A config may also
declare its own mode with explicit ``inputs`` / ``outputs``.
"""

from __future__ import annotations

from dataclasses import dataclass

from polymodal.modality import Modality

I, A, V = Modality.IMAGE, Modality.AUDIO, Modality.VIDEO


@dataclass(frozen=True)
class Mode:
    """A dialogue mode.

    Attributes:
        name: registry key, e.g. ``"T_I"``.
        inputs: media the human turns carry, in dialogue order (placeholders in human turns).
        outputs: media the assistant produces, in dialogue order (placeholders in assistant turns).
        description: one line for reports.
    """

    name: str
    inputs: tuple[Modality, ...]
    outputs: tuple[Modality, ...]
    description: str = ""

    @property
    def modalities(self) -> tuple[Modality, ...]:
        return self.inputs + self.outputs


def _m(name: str, inputs: tuple, outputs: tuple, description: str) -> Mode:
    return Mode(name, tuple(inputs), tuple(outputs), description)


MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        _m("T_I", (), (I,), "text in; the assistant shows an image"),
        _m("T_A", (), (A,), "text in; the assistant plays a sound"),
        _m("T_V", (), (V,), "text in; the assistant shows a video"),
        _m("T_I_V_A", (), (I, V, A), "text in; the assistant shows an image, then a video, then a sound"),
        _m("T_A_I", (), (A, I), "text in; the assistant plays a sound, then shows an image"),
        _m("T_V_I", (), (V, I), "text in; the assistant shows a video, then an image"),
        _m("T_A_V", (), (A, V), "text in; the assistant plays a sound, then shows a video"),
        _m("I_T", (I,), (), "the human shares an image; the assistant answers in text"),
        _m("A_T", (A,), (), "the human shares a sound; the assistant answers in text"),
        _m("V_T", (V,), (), "the human shares a video; the assistant answers in text"),
        _m("I_A", (I,), (A,), "the human shares an image; the assistant plays a matching sound"),
        _m("A_I", (A,), (I,), "the human shares a sound; the assistant shows a matching image"),
        _m("V_A", (V,), (A,), "the human shares a video; the assistant plays a matching sound"),
    )
}


def get_mode(name: str) -> Mode:
    """The registered mode ``name``.

    Raises:
        ValueError: unknown name (lists the choices).
    """
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(f"unknown dialogue mode {name!r}; choose from: {', '.join(MODES)} "
                         "(or declare inputs/outputs for a custom mode)") from None
