"""Speech synthesis: named voices over text-to-speech backends, spoken sentence by sentence.

Backends (:data:`TTS_BACKENDS`, name -> class):

- ``flite`` (Debian ``flite``, CMU Flite 2.2): the default. Its voices ``slt`` (US female), ``rms`` (US male),
  ``awb`` (Scottish male), ``kal16`` / ``kal`` (US male diphone, 16 / 8 kHz) are the most intelligible offline
  voices measured here: 100 held-out sentences, spoken and transcribed back by pocketsphinx's generic English
  model, come back at a few percent word error rate (``bench/speech.py``; espeak-ng's come back near 80%).
  Speed: ``duration_stretch = 1 / speed`` (any value); pitch: ``int_f0_target_mean`` (mean F0 in Hz).
- ``espeak-ng`` (Debian ``espeak-ng``): formant synthesis, many languages, robotic. Speed: words per minute
  ``175 * speed``, which espeak-ng clamps below at 80 (so speeds under ~0.46 sound as 0.46).
- ``transformers``: a VITS / MMS-TTS model (``VitsModel`` + ``VitsTokenizer``) by hub id or folder, loaded strictly
  (:class:`skills.base.SkillLoadError` on missing / unexpected weights); for GPU users (``facebook/mms-tts-eng``).
  Its noise is seeded per sentence (from the sentence's text), so the same text gives the same samples.

Voices (:class:`Voice`) are named. Every backend's own voices are ``<backend>:<voice>`` (``flite:slt``,
``espeak-ng:en-us+f3``, ``vits:0``); OpenAI's voice names (:data:`OPENAI_VOICE_NAMES`: ``alloy``, ``echo``,
``fable``, ``onyx``, ``nova``, ``shimmer``, ``ash``, ``ballad``, ``coral``, ``sage``, ``verse``, ``marin``,
``cedar``) map onto the first configured backend's voices, several sharing one voice at another pitch (flite has
one female voice: ``alloy``, ``coral``, ``marin``, ``nova``, ``sage``, ``shimmer`` are ``slt`` from 145 to 210 Hz).
An unknown name raises :class:`UnknownVoice` (a ``ValueError`` listing the choices).

Sentence by sentence: :func:`polymodal.sentences.split_sentences` cuts the text; each sentence is synthesised on
its own, resampled (soxr) to the synthesizer's rate and yielded as a :class:`SpeechChunk`
(:meth:`Synthesizer.synthesize_stream`). The whole answer (:meth:`Synthesizer.synthesize`) is the concatenation of
the same chunks, so a stream joins to exactly the samples of the whole answer for the same text, voice and speed.
:class:`~polymodal.sentences.SentenceStream` cuts text that arrives in pieces (an LLM's deltas) into the same
sentences, so speech made as an answer is written equals the speech of the whole answer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import Field, field_validator

from polymodal.sentences import (  # noqa: F401 (MAX_SENTENCE_CHARS, SentenceStream: re-exported)
    MAX_SENTENCE_CHARS,
    SPEAKABLE,
    SentenceStream,
    split_sentences,
)
from polymodal.types import MediaPart
from skills.base import Skill, SkillError, SkillLoadError, SkillParams, SkillResult

SPEECH_SAMPLE_RATE_HZ = 24000
"""The rate speech leaves the synthesizer by default (OpenAI's ``pcm``: 16-bit mono at 24 kHz)."""

MAX_INPUT_CHARS = 4096
"""Longest text one call speaks (OpenAI's limit for ``/v1/audio/speech``)."""

MIN_SPEED, MAX_SPEED = 0.25, 4.0
"""The range of ``speed`` (OpenAI's)."""

OPENAI_VOICE_NAMES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer",
                      "verse", "marin", "cedar")

DEFAULT_VOICE = "echo"
"""The voice of calls that name none: flite ``rms``, the most intelligible voice measured (``bench/speech.py``: 5.8%
word error rate through pocketsphinx on 100 held-out sentences; ``alloy``, flite ``slt``, 10.6%)."""

SUBPROCESS_TIMEOUT_S = 60.0


class UnknownVoice(ValueError):
    """A voice name the synthesizer does not have.

    Attributes:
        voice: the name asked for. choices: the names it has.
    """

    def __init__(self, voice: str, choices: Sequence[str]):
        self.voice = voice
        self.choices = tuple(choices)
        super().__init__(f"unknown voice {voice!r}; choose from: {', '.join(self.choices) or 'none (no TTS backend)'}")


class NothingToSay(ValueError):
    """The text has no letter or digit to speak (empty, blank or only punctuation)."""


class TTSUnavailable(RuntimeError):
    """No backend can speak (none configured, or their programs are not installed)."""


class TTSFailed(RuntimeError):
    """A backend failed on a sentence (the program crashed or timed out, the model raised)."""


@dataclass(frozen=True)
class Voice:
    """One named voice.

    Attributes:
        name: what a request sends (``alloy``, ``flite:slt``).
        backend: a :data:`TTS_BACKENDS` key.
        native: the backend's own voice id (flite ``slt``, espeak-ng ``en-us+f3``, VITS speaker index ``"0"``).
        f0_hz: flite only: the mean pitch (``int_f0_target_mean``); ``None``: the voice's own.
        description: language, accent, sex, engine.
    """

    name: str
    backend: str
    native: str
    f0_hz: float | None = None
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "backend": self.backend, "native": self.native, "f0_hz": self.f0_hz,
                "description": self.description}


@dataclass(frozen=True, eq=False)
class SpeechChunk:
    """One sentence of speech.

    Attributes:
        index: position in the stream (0-based).
        text: the sentence spoken.
        samples: float32 (S,) mono in [-1, 1] at ``sample_rate_hz``.
        sample_rate_hz: the synthesizer's rate.
        voice: the voice's name.
    """

    index: int
    text: str
    samples: np.ndarray
    sample_rate_hz: int
    voice: str

    @property
    def duration_s(self) -> float:
        return len(self.samples) / float(self.sample_rate_hz)


# ---- backends --------------------------------------------------------------------------------------------------
def _read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    samples, sample_rate_hz = sf.read(str(path), dtype="float32", always_2d=True)
    return np.ascontiguousarray(samples.mean(axis=1), dtype=np.float32), int(sample_rate_hz)


def _run(cmd: list[str], what: str, stdin: bytes | None = None) -> None:
    try:
        out = subprocess.run(cmd, input=stdin, capture_output=True, timeout=SUBPROCESS_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise TTSFailed(f"{what} did not finish within {SUBPROCESS_TIMEOUT_S:g} s") from None
    except OSError as e:
        raise TTSFailed(f"{what} could not start: {e}") from None
    if out.returncode != 0:
        err = out.stderr.decode(errors="replace").strip().splitlines()
        raise TTSFailed(f"{what} exited with status {out.returncode}: {err[-1] if err else 'no message'}")


class TTSBackend:
    """A text-to-speech engine: its voices and one sentence -> samples.

    Subclasses set ``name`` and implement :meth:`native_voices`, :meth:`openai_voices` and :meth:`speak`.
    ``speak`` may be called from several threads at once.
    """

    name: ClassVar[str]

    def native_voices(self) -> tuple[Voice, ...]:
        """The engine's own voices, named ``<backend>:<voice>``."""
        raise NotImplementedError

    def openai_voices(self) -> tuple[Voice, ...]:
        """OpenAI's voice names (:data:`OPENAI_VOICE_NAMES`) as voices of this engine."""
        raise NotImplementedError

    def speak(self, text: str, voice: Voice, speed: float) -> tuple[np.ndarray, int]:
        """One sentence -> (float32 (S,) mono samples, their sample rate in Hz).

        Raises:
            TTSFailed: the engine failed on it.
        """
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name}


class _ProgramTTS(TTSBackend):
    """A TTS program on the PATH (Debian package ``package``)."""

    program: ClassVar[str]
    package: ClassVar[str]

    def __init__(self, binary: str | None = None):
        """Raises:
            TTSUnavailable: the program is not installed (says which Debian package has it)."""
        found = binary or shutil.which(self.program)
        if not found or not os.access(found, os.X_OK):
            raise TTSUnavailable(f"{self.name}: the {self.program!r} program is not installed "
                                 f"(Debian/Ubuntu: apt-get install -y {self.package})")
        self.binary = found

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "program": self.binary}


class FliteTTS(_ProgramTTS):
    """CMU Flite 2.2 (``flite``): clustergen / diphone voices built into the program."""

    name = "flite"
    program = "flite"
    package = "flite"
    # native voice -> description (16 kHz unless said)
    VOICES: ClassVar[dict[str, str]] = {
        "slt": "US English, female (flite slt, clustergen)",
        "rms": "US English, male (flite rms, clustergen)",
        "awb": "Scottish English, male (flite awb, clustergen)",
        "kal16": "US English, male (flite kal16, diphone)",
        "kal": "US English, male (flite kal, diphone, 8 kHz)",
    }
    # OpenAI name -> (native voice, mean pitch in Hz or None for the voice's own: slt ~172, rms ~101, awb ~131,
    # kal16 ~89 Hz measured)
    OPENAI: ClassVar[dict[str, tuple[str, float | None]]] = {
        "alloy": ("slt", None), "coral": ("slt", 190.0), "marin": ("slt", 180.0), "nova": ("slt", 210.0),
        "sage": ("slt", 160.0), "shimmer": ("slt", 145.0),
        "echo": ("rms", None), "ash": ("rms", 90.0), "verse": ("rms", 120.0),
        "fable": ("awb", None), "ballad": ("awb", 150.0),
        "onyx": ("kal16", 78.0), "cedar": ("kal16", None),
    }

    def native_voices(self) -> tuple[Voice, ...]:
        return tuple(Voice(f"flite:{v}", self.name, v, None, d) for v, d in self.VOICES.items())

    def openai_voices(self) -> tuple[Voice, ...]:
        out = []
        for name, (native, f0) in self.OPENAI.items():
            pitch = "its own pitch" if f0 is None else f"mean pitch {f0:g} Hz"
            out.append(Voice(name, self.name, native, f0, f"{self.VOICES[native]}, {pitch}"))
        return tuple(out)

    def speak(self, text: str, voice: Voice, speed: float) -> tuple[np.ndarray, int]:
        with tempfile.TemporaryDirectory(prefix="pm-flite-") as tmp:
            out = Path(tmp) / "speech.wav"
            cmd = [self.binary, "-voice", voice.native, "--setf", f"duration_stretch={1.0 / speed:.6f}"]
            if voice.f0_hz is not None:
                cmd += ["--setf", f"int_f0_target_mean={voice.f0_hz:g}"]
            cmd += ["-o", str(out), "-t", text]
            _run(cmd, f"flite (voice {voice.native})")
            return _read_wav(out)


class EspeakTTS(_ProgramTTS):
    """eSpeak NG (``espeak-ng``): formant synthesis; voice ``<language>[+<variant>]``."""

    name = "espeak-ng"
    program = "espeak-ng"
    package = "espeak-ng"
    WORDS_PER_MINUTE = 175  # espeak-ng's default rate (speed 1.0)
    MIN_WPM, MAX_WPM = 80, 1000
    VOICES: ClassVar[dict[str, str]] = {
        "en-us": "US English, male (espeak-ng)",
        "en-us+f3": "US English, female variant f3 (espeak-ng)",
        "en-us+m3": "US English, male variant m3 (espeak-ng)",
        "en-gb": "British English, male (espeak-ng)",
        "en-gb-x-rp": "British English, received pronunciation (espeak-ng)",
        "en-us+f4": "US English, female variant f4 (espeak-ng)",
        "en-us+m7": "US English, male variant m7 (espeak-ng)",
    }
    OPENAI: ClassVar[dict[str, str]] = {
        "alloy": "en-us", "ash": "en-us+m3", "ballad": "en-gb-x-rp", "coral": "en-us+f4", "echo": "en-us+m3",
        "fable": "en-gb", "onyx": "en-us+m7", "nova": "en-us+f3", "sage": "en-us+f4", "shimmer": "en-us+f3",
        "verse": "en-gb-x-rp", "marin": "en-us+f3", "cedar": "en-us+m7",
    }

    def native_voices(self) -> tuple[Voice, ...]:
        return tuple(Voice(f"espeak-ng:{v}", self.name, v, None, d) for v, d in self.VOICES.items())

    def openai_voices(self) -> tuple[Voice, ...]:
        return tuple(Voice(n, self.name, v, None, self.VOICES[v]) for n, v in self.OPENAI.items())

    def speak(self, text: str, voice: Voice, speed: float) -> tuple[np.ndarray, int]:
        wpm = int(min(self.MAX_WPM, max(self.MIN_WPM, round(self.WORDS_PER_MINUTE * speed))))
        with tempfile.TemporaryDirectory(prefix="pm-espeak-") as tmp:
            out = Path(tmp) / "speech.wav"
            # text on stdin (never parsed as options), UTF-8 (-b 1)
            _run([self.binary, "-v", voice.native, "-s", str(wpm), "-b", "1", "-w", str(out)],
                 f"espeak-ng (voice {voice.native})", stdin=text.encode("utf-8"))
            return _read_wav(out)


# config.json model_type -> (transformers model class, tokenizer class)
TTS_MODELS: dict[str, tuple[str, str]] = {
    "vits": ("VitsModel", "VitsTokenizer"),
}


def _text_seed(text: str, seed: int) -> int:
    return (zlib.crc32(text.encode("utf-8")) ^ seed) & 0x7FFFFFFF


class TransformersTTS(TTSBackend):
    """A transformers text-to-speech model (VITS / MMS-TTS) by hub id or folder, loaded strictly.

    Args:
        path: a folder (``config.json``, weights, ``vocab.json`` / tokenizer files) or a hub id
            (``facebook/mms-tts-eng``; fetched only when the hub is reachable).
        device: torch device. dtype: ``auto`` (float32 on CPU, float16 elsewhere), ``float32``, ``bfloat16``.
        seed: base of the per-sentence noise seed.

    Raises:
        SkillLoadError: missing folder, a ``model_type`` outside :data:`TTS_MODELS`, missing / unexpected /
            mismatched weights, a tokenizer that cannot be built (e.g. it wants the ``phonemizer`` package).
    """

    name = "transformers"

    def __init__(self, path: str, *, device: str = "cpu", dtype: str = "auto", seed: int = 0):
        self.path, self.device, self.seed = path, device, seed
        self.model, self.tokenizer, self.model_type = _load_tts_model(path, device=device, dtype=dtype)
        self.sample_rate_hz = int(self.model.config.sampling_rate)
        self.num_speakers = max(1, int(getattr(self.model.config, "num_speakers", 1) or 1))
        self._lock = threading.Lock()

    def native_voices(self) -> tuple[Voice, ...]:
        return tuple(Voice(f"{self.model_type}:{k}", self.name, str(k), None,
                           f"{self.model_type} model {self.path}, speaker {k}") for k in range(self.num_speakers))

    def openai_voices(self) -> tuple[Voice, ...]:
        return tuple(Voice(n, self.name, str(i % self.num_speakers), None,
                           f"{self.model_type} model {self.path}, speaker {i % self.num_speakers}")
                     for i, n in enumerate(OPENAI_VOICE_NAMES))

    def speak(self, text: str, voice: Voice, speed: float) -> tuple[np.ndarray, int]:
        import torch

        enc = self.tokenizer(text, return_tensors="pt")
        if enc["input_ids"].shape[-1] == 0:
            return np.zeros(0, np.float32), self.sample_rate_hz
        inputs = {k: v.to(self.device) for k, v in enc.items()}
        if self.num_speakers > 1:
            inputs["speaker_id"] = int(voice.native)
        devices = [torch.device(self.device).index or 0] if str(self.device).startswith("cuda") else []
        with self._lock, torch.inference_mode(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(_text_seed(text, self.seed))  # the noise of this sentence: same text, same samples
            self.model.speaking_rate = float(speed)
            try:
                waveform = self.model(**inputs).waveform
            except (RuntimeError, ValueError, IndexError) as e:
                raise TTSFailed(f"{self.model_type} failed on a sentence: {type(e).__name__}: {e}") from e
        return np.ascontiguousarray(waveform[0].float().cpu().numpy(), dtype=np.float32), self.sample_rate_hz

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "model_type": self.model_type, "path": self.path, "device": self.device,
                "sample_rate_hz": self.sample_rate_hz, "speakers": self.num_speakers}


TTS_BACKENDS: dict[str, type[TTSBackend]] = {
    FliteTTS.name: FliteTTS,
    EspeakTTS.name: EspeakTTS,
    TransformersTTS.name: TransformersTTS,
}


def _load_tts_model(path: str, *, device: str, dtype: str):
    """``(model, tokenizer, model_type)`` from a folder or hub id, loaded strictly (see :class:`TransformersTTS`)."""
    from skills.hf_loading import load_strict, read_model_type

    model_type = read_model_type(path, "TTS", example="facebook/mms-tts-eng")
    if model_type not in TTS_MODELS:
        raise SkillLoadError(f"TTS: {path!r} holds a {model_type!r} model; choose a folder of: {', '.join(TTS_MODELS)}")
    model_name, tokenizer_name = TTS_MODELS[model_type]
    model = load_strict(model_name, path, device=device, dtype=dtype, what="TTS")
    import transformers

    try:
        tokenizer = getattr(transformers, tokenizer_name).from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
        raise SkillLoadError(f"TTS: cannot load {tokenizer_name} from {path!r}: {e}") from e
    if getattr(tokenizer, "phonemize", False):
        try:
            import phonemizer  # noqa: F401
        except ImportError:
            raise SkillLoadError(f"TTS: the tokenizer of {path!r} phonemizes its input and needs the `phonemizer` "
                                 "package (and espeak-ng): pip install phonemizer") from None
    return model, tokenizer, model_type


# ---- the synthesizer -------------------------------------------------------------------------------------------
@dataclass
class Synthesizer:
    """Named voices over backends; text -> speech, sentence by sentence, at ``sample_rate_hz``.

    Args:
        backends: the engines, in order of preference: OpenAI's voice names map onto the first one's voices.
        sample_rate_hz: the rate of every chunk (sentences are resampled with soxr, each on its own).
        default_voice: the voice used when a call names none (default: :data:`DEFAULT_VOICE` when a backend has it,
            else the first voice).
        unavailable: backends asked for but not usable here, with the reason (reported by :meth:`describe`).

    Raises:
        UnknownVoice: ``default_voice`` is not one of the voices.
    """

    backends: Sequence[TTSBackend]
    sample_rate_hz: int = SPEECH_SAMPLE_RATE_HZ
    default_voice: str | None = None
    unavailable: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._voices: dict[str, Voice] = {}
        self._engines = {b.name: b for b in self.backends}
        for b in self.backends:  # OpenAI's names from the first backend that has them
            for v in b.openai_voices():
                self._voices.setdefault(v.name, v)
        for b in self.backends:
            for v in b.native_voices():
                self._voices.setdefault(v.name, v)
        if self.default_voice is None and self._voices:
            self.default_voice = DEFAULT_VOICE if DEFAULT_VOICE in self._voices else next(iter(self._voices))
        if self.default_voice is not None:
            self.voice(self.default_voice)

    def voices(self) -> list[Voice]:
        """Every voice a call may name (OpenAI's names first, then each backend's own)."""
        return list(self._voices.values())

    def voice(self, name: str | None) -> Voice:
        """The voice called ``name`` (``None``: the default).

        Raises:
            UnknownVoice: no such voice (lists the choices). TTSUnavailable: no backend at all.
        """
        if not self._voices:
            reasons = "; ".join(f"{k}: {v}" for k, v in self.unavailable.items()) or "none configured"
            raise TTSUnavailable(f"speech synthesis is not available on this server ({reasons})")
        key = self.default_voice if name is None else name
        try:
            return self._voices[key]
        except KeyError:
            raise UnknownVoice(str(name), list(self._voices)) from None

    def check(self, text: str, voice: str | None = None, speed: float = 1.0) -> tuple[list[str], Voice]:
        """Validate a call: (its sentences, its voice).

        Raises:
            UnknownVoice, TTSUnavailable: see :meth:`voice`. NothingToSay: no speakable sentence.
            ValueError: ``speed`` outside [0.25, 4.0] or the text longer than :data:`MAX_INPUT_CHARS`.
        """
        v = self.voice(voice)
        if not MIN_SPEED <= float(speed) <= MAX_SPEED:
            raise ValueError(f"speed must be within [{MIN_SPEED}, {MAX_SPEED}], got {speed}")
        if len(text) > MAX_INPUT_CHARS:
            raise ValueError(f"the text is {len(text)} characters; the limit is {MAX_INPUT_CHARS}")
        sentences = split_sentences(text)
        if not sentences:
            raise NothingToSay("the input has nothing to speak (no letter or digit)")
        return sentences, v

    def synthesize_stream(self, text: str, voice: str | None = None, speed: float = 1.0, *,
                          should_cancel: Callable[[], bool] | None = None,
                          start_index: int = 0) -> Iterator[SpeechChunk]:
        """Speak ``text`` sentence by sentence: one :class:`SpeechChunk` per sentence, as each is ready.

        Validation (:meth:`check`) happens before the first chunk. ``should_cancel`` is checked before every
        sentence (the stream ends quietly once it returns True). ``start_index``: index of the first chunk (a
        caller speaking a text in several calls, sentence by sentence, numbers its chunks on).

        Raises:
            UnknownVoice, NothingToSay, TTSUnavailable, ValueError: see :meth:`check`. TTSFailed: an engine failed.
        """
        sentences, v = self.check(text, voice, speed)
        for k, sentence in enumerate(sentences):
            if should_cancel is not None and should_cancel():
                return
            yield self.speak_sentence(start_index + k, sentence, v, speed)

    def synthesize(self, text: str, voice: str | None = None, speed: float = 1.0) -> np.ndarray:
        """The whole speech of ``text``: float32 (S,) at ``sample_rate_hz``, the concatenation of
        :meth:`synthesize_stream`'s chunks (so the two agree sample for sample).

        Raises:
            as :meth:`synthesize_stream`.
        """
        chunks = [c.samples for c in self.synthesize_stream(text, voice, speed)]
        return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)

    def speak_sentence(self, index: int, sentence: str, voice: Voice, speed: float = 1.0) -> SpeechChunk:
        """One sentence (one of :meth:`check`'s) -> its chunk: the engine's samples resampled to
        ``sample_rate_hz`` (soxr HQ) and clipped to [-1, 1]. The step both :meth:`synthesize_stream` and a caller
        pacing the sentences itself (a server interleaving streams) run, so they agree sample for sample.

        Raises:
            TTSFailed: the engine failed or returned non-finite samples.
        """
        import soxr

        engine = self._engines[voice.backend]
        samples, rate = engine.speak(sentence, voice, float(speed))
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if not np.all(np.isfinite(samples)):
            raise TTSFailed(f"{engine.name} returned non-finite samples")
        if rate != self.sample_rate_hz and len(samples):
            samples = soxr.resample(samples, rate, self.sample_rate_hz, quality="HQ").astype(np.float32)
        return SpeechChunk(index, sentence, np.clip(samples, -1.0, 1.0), self.sample_rate_hz, voice.name)

    def describe(self) -> dict[str, Any]:
        return {"backends": [b.describe() for b in self.backends], "unavailable": dict(self.unavailable),
                "default_voice": self.default_voice, "voices": len(self._voices),
                "sample_rate_hz": self.sample_rate_hz}


def build_synthesizer(backends: Sequence[str] = ("flite", "espeak-ng"), *, model: str | None = None,
                      device: str = "cpu", dtype: str = "auto", default_voice: str | None = None,
                      sample_rate_hz: int = SPEECH_SAMPLE_RATE_HZ, strict: bool = False) -> Synthesizer:
    """A :class:`Synthesizer` over the named backends (in order of preference).

    Args:
        backends: :data:`TTS_BACKENDS` keys. ``transformers`` needs ``model``.
        model: the transformers TTS model (hub id or folder).
        strict: raise when a program backend is not installed (default: leave it out and report why in
            ``Synthesizer.unavailable``).

    Raises:
        ValueError: an unknown backend (lists the choices), ``transformers`` without ``model``, the same backend
            twice. TTSUnavailable: (``strict``) a program that is not installed. SkillLoadError: the model.
            UnknownVoice: ``default_voice``.
    """
    engines: list[TTSBackend] = []
    unavailable: dict[str, str] = {}
    if len(set(backends)) != len(backends):
        raise ValueError(f"TTS backends listed twice: {list(backends)}")
    for name in backends:
        if name not in TTS_BACKENDS:
            raise ValueError(f"unknown TTS backend {name!r}; choose from: {', '.join(TTS_BACKENDS)}")
        if name == TransformersTTS.name:
            if not model:
                raise ValueError("the transformers TTS backend needs a model (a hub id or a folder)")
            engines.append(TransformersTTS(model, device=device, dtype=dtype))
            continue
        try:
            engines.append(TTS_BACKENDS[name]())
        except TTSUnavailable as e:
            if strict:
                raise
            unavailable[name] = str(e)
    return Synthesizer(engines, sample_rate_hz=sample_rate_hz, default_voice=default_voice, unavailable=unavailable)


# ---- the skill -------------------------------------------------------------------------------------------------
class SpeakParams(SkillParams):
    """Arguments of ``synthesize_speech``."""

    text: str = Field(min_length=1, max_length=MAX_INPUT_CHARS, description="what to say")
    voice: str | None = Field(None, max_length=64, description="a voice name (none: the server's default)")
    speed: float = Field(1.0, ge=MIN_SPEED, le=MAX_SPEED, description="speaking rate, 1.0 normal")

    @field_validator("text")
    @classmethod
    def _speakable(cls, v: str) -> str:
        if not SPEAKABLE.search(v):
            raise ValueError("text has nothing to speak (no letter or digit)")
        return v


class SynthesizeSpeechSkill(Skill):
    """Text -> speech (audio) with a named voice."""

    name = "synthesize_speech"
    description = ("Say a text aloud: returns speech audio (24 kHz mono) in a named voice (alloy, echo, fable, "
                   "onyx, nova, shimmer, ...). For spoken words, not for sounds or music.")
    Params = SpeakParams
    accepts = ("text",)
    returns = ("text", "audio", "data")
    weight = "heavy"

    def __init__(self, synthesizer: Synthesizer | None = None, **build: Any):
        """``synthesizer``: a ready one; else one is built with :func:`build_synthesizer` (``**build``)."""
        self.synthesizer = synthesizer if synthesizer is not None else build_synthesizer(**build)

    def _run(self, params: SpeakParams, media: tuple[MediaPart, ...]) -> SkillResult:
        from decoders.media import Medium
        from polymodal.modality import Modality

        try:
            chunks = list(self.synthesizer.synthesize_stream(params.text, params.voice, params.speed))
        except (UnknownVoice, NothingToSay) as e:
            raise SkillError(str(e), "invalid_arguments") from None
        except TTSUnavailable as e:
            raise SkillError(str(e), "failed") from None
        samples = np.concatenate([c.samples for c in chunks])
        rate = self.synthesizer.sample_rate_hz
        voice = chunks[0].voice
        medium = Medium(Modality.AUDIO, samples, seed=0, sample_rate_hz=rate)
        return SkillResult(self.name, f"spoke {len(chunks)} sentence(s) in voice {voice!r}: "
                                      f"{len(samples) / rate:.2f} s of audio",
                           media=(medium,), data={"voice": voice, "sentences": [c.text for c in chunks],
                                                  "duration_s": round(len(samples) / rate, 3),
                                                  "sample_rate_hz": rate})


# ---- a tiny random VITS for tests ------------------------------------------------------------------------------
TINY_VITS_CHARS = " abcdefghijklmnopqrstuvwxyz'.,!?-0123456789"


def save_tiny_vits(path: str | Path, *, seed: int = 0, sample_rate_hz: int = 16000, num_speakers: int = 1) -> Path:
    """Write a tiny random VITS (hidden 16, one layer each, 16x upsampling) with a character ``VitsTokenizer``
    (no phonemizer) in the real on-disk layout (``config.json``, ``model.safetensors``, ``vocab.json``,
    ``tokenizer_config.json``). Its speech is noise of the right rate and about the right length. Returns ``path``.
    """
    import torch
    from transformers import VitsConfig, VitsModel, VitsTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(["<pad>", *TINY_VITS_CHARS])}
    (path / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = VitsTokenizer(vocab_file=str(path / "vocab.json"), pad_token="<pad>", unk_token="<pad>",
                              add_blank=True, normalize=True, phonemize=False)
    config = VitsConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32,
        flow_size=16, spectrogram_bins=33, upsample_initial_channel=16, upsample_rates=[4, 4],
        upsample_kernel_sizes=[8, 8], resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]],
        prior_encoder_num_flows=1, prior_encoder_num_wavenet_layers=1, posterior_encoder_num_wavenet_layers=1,
        duration_predictor_num_flows=1, duration_predictor_filter_channels=16, depth_separable_num_layers=1,
        window_size=4, sampling_rate=sample_rate_hz, num_speakers=num_speakers,
        speaker_embedding_size=8 if num_speakers > 1 else 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VitsModel(config).eval()
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path
