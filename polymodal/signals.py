"""Signal tokens and the chat format: both belong to a preset.

NExT-GPT (Wu et al., 2023, arXiv 2309.05519, sec. 3-4) extends the LLM vocabulary with signal tokens
(``<IMG0>..<IMG3>``, ``<AUD0>..<AUD7>``, ``<VID0>..<VID23>``); the last-layer hidden states at those tokens
are projected into a diffusion decoder's conditioning space. The released checkpoint spells them
``[IMG0]..`` and uses the ``### Human: ... ### Assistant:`` template: token strings, their order, the chat
template and the stop strings are therefore part of :class:`SignalSpec` / :class:`ChatFormat`, which a
preset carries, never constants in code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from polymodal.modality import Modality



def default_counts() -> dict[Modality, int]:
    """Tokens per group of every registered modality whose spec is ``in_default_signals``, from its spec (NExT-GPT:
    image 4, audio 8, video 24); a later modality (3D) joins a preset only by being listed or decoded."""
    return {m: m.spec.default_signal_count for m in Modality if m.spec.in_default_signals}


def default_markers(counts: dict[Modality, int] | None = None) -> dict[Modality, tuple[str, str]]:
    """The (begin, end) input markers, from the specs (``<Image>``, ``</Image>``), of every registered modality that
    is ``in_default_signals`` or has signal tokens in ``counts``: a later modality's markers are not added to the
    vocabulary of a preset that does not use it (its token rows, random init and sampled decodes stay the same)."""
    return {m: m.spec.input_markers for m in Modality if m.spec.in_default_signals or m in (counts or {})}


@dataclass(frozen=True)
class SignalSpec:
    """Signal tokens per output modality and begin/end markers around input media.

    Attributes:
        tokens: per modality, the ordered token strings of one group (N tokens, e.g. 4 for images).
        input_markers: per modality, the (begin, end) marker strings placed around an input medium's
            embeddings in the prompt.
    """

    tokens: dict[Modality, tuple[str, ...]]
    input_markers: dict[Modality, tuple[str, str]] = field(default_factory=default_markers)

    @classmethod
    def build(
        cls,
        counts: dict[Modality, int] | None = None,
        fmt: str = "<{prefix}{i}>",
        input_markers: dict[Modality, tuple[str, str]] | None = None,
    ) -> "SignalSpec":
        """Make the usual spec: ``fmt.format(prefix=spec.signal_prefix, i=i)`` (``<IMG0>`` etc.).

        Args:
            counts: tokens per group (default: every registered modality's ``default_signal_count``).
            fmt: token format, ``"<{prefix}{i}>"`` (ours) or ``"[{prefix}{i}]"`` (the released checkpoint).
            input_markers: (begin, end) per modality (default: the specs' ``input_markers``).
        Raises:
            ValueError: a count below 1; an unregistered modality.
        """
        counts = default_counts() if counts is None else {Modality.parse(m): n for m, n in counts.items()}
        for m, n in counts.items():
            if n < 1:
                raise ValueError(f"signal token count for {m.value} must be >= 1, got {n}")
        tokens = {m: tuple(fmt.format(prefix=m.spec.signal_prefix, i=i) for i in range(n)) for m, n in counts.items()}
        return cls(tokens=tokens, input_markers=dict(input_markers or default_markers(counts)))

    @property
    def modalities(self) -> list[Modality]:
        return list(self.tokens)

    def count(self, modality: Modality) -> int:
        return len(self.tokens[modality])

    def all_signal_tokens(self) -> list[str]:
        return [t for toks in self.tokens.values() for t in toks]

    def all_marker_tokens(self) -> list[str]:
        return [t for pair in self.input_markers.values() for t in pair]

    def group_string(self, modality: Modality) -> str:
        """The group as text, tokens joined without spaces (each token stays one id)."""
        return "".join(self.tokens[modality])


@dataclass(frozen=True)
class ChatFormat:
    """A plain-string chat template (no Jinja) so media embeddings can be spliced between text segments.

    A prompt is ``system_prefix + system + system_suffix`` then, per turn,
    ``user_prefix + <user content> + user_suffix`` and ``assistant_prefix + <answer> + assistant_suffix``;
    generation starts after the last ``assistant_prefix``. Generation stops at EOS or any ``stop`` string
    (never inside grammar-constrained output: see :mod:`polymodal.llm`).

    Tool calling (OpenAI's ``tools``; issue #22): ``tool_format`` names the preset's tool-call format in
    :data:`polymodal.constrained.TOOL_CALL_FORMATS` (``hermes``: ``<tool_call>{...}</tool_call>`` blocks, results
    in ``<tool_response>`` blocks of a user turn; ``vicuna-hermes``: the same for NExT-GPT's Vicuna template).
    ``tools_system``: the system text that lists the tools, ``{tools}`` standing for one JSON line per tool
    (``None``: the format's own); it follows the system text (the preset's or the request's).
    """

    system: str = ""
    system_prefix: str = ""
    system_suffix: str = ""
    user_prefix: str = "User: "
    user_suffix: str = "\n"
    assistant_prefix: str = "Assistant:"
    assistant_suffix: str = "\n"
    stop: tuple[str, ...] = ()
    add_bos: bool = False
    tool_format: str = "hermes"
    tools_system: str | None = None

    @classmethod
    def chatml(cls, system: str) -> "ChatFormat":
        """ChatML, as SmolLM2-Instruct's tokenizer template writes it."""
        return cls(
            system=system,
            system_prefix="<|im_start|>system\n",
            system_suffix="<|im_end|>\n",
            user_prefix="<|im_start|>user\n",
            user_suffix="<|im_end|>\n",
            assistant_prefix="<|im_start|>assistant\n",
            assistant_suffix="<|im_end|>\n",
            stop=("<|im_end|>",),
        )

    @classmethod
    def vicuna_v0(cls) -> "ChatFormat":
        """NExT-GPT's ``### Human: ... ### Assistant:`` template; stops on ``###``. A system text (a request's, or
        the tool listing) stands on its own line after BOS; tool calls in the ``vicuna-hermes`` format."""
        return cls(
            system="",
            system_suffix="\n",
            user_prefix="### Human: ",
            user_suffix="\n",
            assistant_prefix="### Assistant:",
            assistant_suffix="\n###",
            stop=("###",),
            add_bos=True,
            tool_format="vicuna-hermes",
        )
