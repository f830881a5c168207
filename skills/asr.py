"""Speech recognition: audio -> a transcript with segment and word times, over a registry of backends.

Backends (:data:`ASR_BACKENDS`, name -> class):

- ``pocketsphinx`` (PyPI ``pocketsphinx==5.1.1``; its generic US English acoustic model, 3-gram language model
  and CMU dictionary ship inside the wheel): the offline default, CPU only, English only. Decoding runs twice
  per call: the first pass (over at most :data:`CMN_ESTIMATE_S`) estimates the recording's cepstral mean, the
  second decodes with it (pocketsphinx's
  live mean normalisation otherwise needs seconds of speech to settle; one pass leaves 2-3x the errors on
  synthetic speech). The decoder's state is reset before every call, so a transcript never depends on the calls
  before it. Word times come from the decoder's segmentation (10 ms frames); a segment ends at a pause of
  :data:`SEGMENT_PAUSE_S` or more. A call may name a *vocabulary*: a sentence corpus (one sentence per line) that
  replaces the generic language model with a 3-gram model built from it (pocketsphinx's ``ArpaBoLM``), plus the
  generic model's :data:`BACKGROUND_WORDS` most frequent words as unigrams so that words outside the corpus can
  still be heard; the ``toy`` preset's spoken chat input uses one (issue #26, ``bench/speech.py`` (b)).
- ``transformers``: a Whisper model (``WhisperForConditionalGeneration`` + ``WhisperProcessor``) by hub id or
  folder, loaded strictly, for GPU users. Audio is decoded in 30 s windows; segment times come from Whisper's
  timestamp tokens when the model emits them (else one segment per window).

Every backend takes float32 mono samples at any rate (resampled with soxr to its own, 16 kHz for both) and
returns a :class:`polymodal.types.Transcript` (segments and words with times; the type the speech stage hands
the ingress). :class:`TranscribeSkill` (``transcribe``) wraps one backend as a skill.
"""

from __future__ import annotations

import logging
import queue
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import Field, field_validator

from polymodal.modality import Modality
from polymodal.types import MediaPart, Transcript, TranscriptSegment, TranscriptWord
from skills.base import Skill, SkillError, SkillLoadError, SkillParams, SkillResult

log = logging.getLogger(__name__)

ASR_SAMPLE_RATE_HZ = 16000
SEGMENT_PAUSE_S = 0.2
"""A pause at least this long between two words starts a new segment (pocketsphinx). Commas pause ~0.1 s,
sentence ends 0.25-0.5 s in flite's speech and in read speech."""

CMN_ESTIMATE_S = 15
"""pocketsphinx's first pass (the recording's cepstral mean) reads at most this many seconds."""

BACKGROUND_WORDS = 3000
"""A vocabulary's language model also holds the generic model's this many most frequent words (unigrams, count 1
each): a word outside the corpus is then heard as itself, not forced onto a corpus word. Measured on 20 spoken
held-out toy requests per modality (audio WER: generic 26 %, corpus alone 11 %, corpus + 1,000 words 7 %, + 3,000
words 6 %)."""


def to_rate(samples: np.ndarray, sample_rate_hz: int, target_hz: int = ASR_SAMPLE_RATE_HZ) -> np.ndarray:
    """float32 (S,) mono at ``sample_rate_hz`` -> float32 (S',) at ``target_hz`` (soxr HQ), clipped to [-1, 1].

    Raises:
        SkillError: (``invalid_input``) not a 1-D float array, a non-positive rate, or non-finite samples.
    """
    import soxr

    a = np.asarray(samples)
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.floating):
        raise SkillError(f"audio must be float (S,) mono, got {a.dtype} {a.shape}", "invalid_input")
    if not sample_rate_hz or sample_rate_hz <= 0:
        raise SkillError(f"audio needs a positive sample rate, got {sample_rate_hz}", "invalid_input")
    if not np.all(np.isfinite(a)):
        raise SkillError("audio has NaN or infinite samples", "invalid_input")
    a = a.astype(np.float32, copy=False)
    if int(sample_rate_hz) != target_hz and len(a):
        a = soxr.resample(a, int(sample_rate_hz), target_hz, quality="HQ").astype(np.float32)
    return np.clip(a, -1.0, 1.0)


def dictionary_words(path: str | Path | None = None) -> set[str]:
    """The words of a pocketsphinx pronunciation dictionary (default: the wheel's ``cmudict-en-us.dict``;
    alternatives such as ``the(2)`` folded): the words a vocabulary corpus may use."""
    if path is None:
        import pocketsphinx

        path = Path(pocketsphinx.get_model_path()) / "en-us" / "cmudict-en-us.dict"
    with open(path, encoding="utf-8", errors="replace") as f:
        return {ln.split(None, 1)[0].split("(", 1)[0] for ln in f if ln.strip()}


class ASRBackend:
    """A speech recogniser: float32 16 kHz samples -> :class:`Transcript`. Thread-safe."""

    name: ClassVar[str]
    languages: tuple[str, ...] = ()  # ISO 639-1 codes it can decode; empty: any its model knows

    def transcribe(self, samples: np.ndarray, *, language: str | None = None, prompt: str | None = None,
                   temperature: float = 0.0, vocabulary: str | None = None) -> Transcript:
        """Transcribe float32 (S,) mono samples at :data:`ASR_SAMPLE_RATE_HZ`.

        ``vocabulary``: a sentence corpus file that restricts the language model (pocketsphinx); a backend
        without one (Whisper: open vocabulary) decodes as usual and says so once in the log.

        Raises:
            SkillError: ``invalid_arguments`` for a language the backend cannot decode; ``failed`` when decoding
                fails.
        """
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name}


def _words_to_segments(words: Sequence[TranscriptWord], pause_s: float) -> tuple[TranscriptSegment, ...]:
    segments: list[TranscriptSegment] = []
    current: list[TranscriptWord] = []
    for w in words:
        if current and w.start_s - current[-1].end_s >= pause_s:
            segments.append(TranscriptSegment(len(segments), current[0].start_s, current[-1].end_s,
                                              " ".join(x.word for x in current), tuple(current)))
            current = []
        current.append(w)
    if current:
        segments.append(TranscriptSegment(len(segments), current[0].start_s, current[-1].end_s,
                                          " ".join(x.word for x in current), tuple(current)))
    return tuple(segments)


class PocketsphinxASR(ASRBackend):
    """CMU PocketSphinx 5 with the wheel's generic US English model (or another model folder).

    Args:
        path: ``None`` (the wheel's ``en-us`` model) or a folder holding an acoustic model directory (with
            ``mdef``), a language model (``*.lm.bin`` / ``*.lm``) and a dictionary (``*.dict``).
        pause_s: a pause this long ends a segment.
        cmn_passes: 2 (estimate the cepstral mean, then decode with it) or 1 (decode from pocketsphinx's initial
            mean; for comparison: ``bench/speech.py`` measures both).

    Raises:
        SkillLoadError: pocketsphinx is not installed, or the folder lacks one of the three parts.
        ValueError: ``cmn_passes`` not 1 or 2.
    """

    name = "pocketsphinx"
    languages = ("en",)
    FRAMES_PER_S = 100  # pocketsphinx's default frame rate (-frate)

    def __init__(self, path: str | None = None, *, pause_s: float = SEGMENT_PAUSE_S, cmn_passes: int = 2):
        if cmn_passes not in (1, 2):
            raise ValueError(f"cmn_passes must be 1 or 2, got {cmn_passes}")
        self.cmn_passes = cmn_passes
        try:
            import pocketsphinx
        except ImportError as e:
            raise SkillLoadError(f"ASR: pocketsphinx is not installed ({e}): pip install pocketsphinx==5.1.1") from e
        self.pause_s = pause_s
        if path is None:
            root = Path(pocketsphinx.get_model_path()) / "en-us"
            self.model_files = {"hmm": root / "en-us", "lm": root / "en-us.lm.bin", "dict": root / "cmudict-en-us.dict"}
            self.model = "pocketsphinx en-us (generic)"
        else:
            self.model_files = self._find_model(Path(path))
            self.model = str(path)
        # one pool of decoders per language model: None = the model's own, else a vocabulary corpus file's
        self._pools: dict[str | None, queue.SimpleQueue] = {None: queue.SimpleQueue()}
        self._vocabulary_lms: dict[str, Path] = {}
        self._lock = threading.Lock()
        self._lm_dir: tempfile.TemporaryDirectory | None = None
        self._pools[None].put(self._new_decoder())  # load once now: a broken model fails here, not on the first call

    @staticmethod
    def _find_model(folder: Path) -> dict[str, Path]:
        if not folder.is_dir():
            raise SkillLoadError(f"ASR: pocketsphinx model folder {str(folder)!r} does not exist")
        hmm = next((p.parent for p in sorted(folder.rglob("mdef"))), None)
        lm = next(iter(sorted(folder.rglob("*.lm.bin")) or sorted(folder.rglob("*.lm"))), None)
        dic = next(iter(sorted(p for p in folder.rglob("*.dict") if "phone" not in p.name)), None)
        found = {"hmm": hmm, "lm": lm, "dict": dic}
        missing = [k for k, v in found.items() if v is None]
        if missing:
            raise SkillLoadError(f"ASR: {str(folder)!r} lacks the pocketsphinx model part(s) {missing} (an acoustic "
                                 "model folder with mdef, a *.lm.bin language model, a *.dict dictionary)")
        return found  # type: ignore[return-value]

    def _new_decoder(self, vocabulary: str | None = None):
        from pocketsphinx import Decoder

        lm = self.model_files["lm"] if vocabulary is None else self._vocabulary_lm(vocabulary)
        try:
            decoder = Decoder(hmm=str(self.model_files["hmm"]), lm=str(lm), dict=str(self.model_files["dict"]),
                              samprate=ASR_SAMPLE_RATE_HZ, loglevel="FATAL")
        except (RuntimeError, ValueError) as e:
            what = self.model if vocabulary is None else f"{self.model} with the vocabulary {vocabulary!r}"
            raise SkillLoadError(f"ASR: pocketsphinx cannot load {what}: {e}") from e
        return decoder, decoder.get_cmn(False)

    def _vocabulary_lm(self, vocabulary: str) -> Path:
        """The ARPA 3-gram model of a sentence corpus file plus :data:`BACKGROUND_WORDS` (built once per file).

        Raises:
            SkillLoadError: the file cannot be read, holds no sentence, or uses words the dictionary lacks (named).
        """
        with self._lock:
            if vocabulary in self._vocabulary_lms:
                return self._vocabulary_lms[vocabulary]
            from pocketsphinx import NGramModel
            from pocketsphinx.lm import ArpaBoLM

            try:
                lines = [ln.strip().lower() for ln in Path(vocabulary).read_text(encoding="utf-8").splitlines()]
            except (OSError, UnicodeDecodeError) as e:
                raise SkillLoadError(f"ASR: cannot read the vocabulary {vocabulary!r}: {e}") from e
            sentences = [ln for ln in lines if ln and not ln.startswith("#")]
            if not sentences:
                raise SkillLoadError(f"ASR: the vocabulary {vocabulary!r} holds no sentence (one per line)")
            known = dictionary_words(self.model_files["dict"])
            unknown = sorted({w for ln in sentences for w in ln.split()} - known)
            if unknown:
                raise SkillLoadError(f"ASR: the vocabulary {vocabulary!r} uses {len(unknown)} word(s) that "
                                     f"{self.model_files['dict'].name} lacks, e.g. {unknown[:8]} (spell numbers "
                                     "out, lower-case, no punctuation)")
            generic = NGramModel.readfile(str(self.model_files["lm"]))
            background = sorted(known, key=lambda w: (-generic.prob([w]), w))[:BACKGROUND_WORDS]
            model = ArpaBoLM(text="\n".join(sentences + background), add_start=True)
            model.compute()
            if self._lm_dir is None:
                self._lm_dir = tempfile.TemporaryDirectory(prefix="polymodal-asr-")
            path = Path(self._lm_dir.name) / f"vocabulary{len(self._vocabulary_lms)}.lm"
            model.write_file(str(path))
            log.info("ASR: vocabulary %s -> a 3-gram model of %d sentences + %d background words", vocabulary,
                     len(sentences), len(background))
            self._vocabulary_lms[vocabulary] = path
            self._pools.setdefault(vocabulary, queue.SimpleQueue())
            return path


    def _decode(self, decoder, pcm: bytes, cmn: str) -> None:
        decoder.set_cmn(cmn)
        decoder.start_utt()
        decoder.process_raw(pcm, no_search=False, full_utt=False)
        decoder.end_utt()

    def transcribe(self, samples: np.ndarray, *, language: str | None = None, prompt: str | None = None,
                   temperature: float = 0.0, vocabulary: str | None = None) -> Transcript:
        if language is not None and language.lower() not in self.languages:
            raise SkillError(f"pocketsphinx decodes English only (language 'en'), not {language!r}",
                             "invalid_arguments")
        t0 = time.perf_counter()
        samples = np.asarray(samples, dtype=np.float32)
        duration_s = len(samples) / ASR_SAMPLE_RATE_HZ
        pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()
        if vocabulary is not None and vocabulary not in self._vocabulary_lms:
            self._vocabulary_lm(vocabulary)
        pool = self._pools[vocabulary]
        try:
            decoder, cmn0 = pool.get_nowait()
        except queue.Empty:
            decoder, cmn0 = self._new_decoder(vocabulary)
        try:
            if not len(samples):
                words: list[TranscriptWord] = []
            else:
                cmn = cmn0
                if self.cmn_passes == 2:  # pass 1: this recording's cepstral mean
                    self._decode(decoder, pcm[:CMN_ESTIMATE_S * ASR_SAMPLE_RATE_HZ * 2], cmn0)
                    cmn = decoder.get_cmn(False)
                self._decode(decoder, pcm, cmn)
                words = self._words(decoder)
        except RuntimeError as e:
            raise SkillError(f"pocketsphinx failed: {e}", "failed") from e
        finally:
            pool.put((decoder, cmn0))
        segments = _words_to_segments(words, self.pause_s)
        return Transcript(" ".join(s.text for s in segments), "en", duration_s, segments, self.name, self.model,
                          time.perf_counter() - t0)

    def _words(self, decoder) -> list[TranscriptWord]:
        out = []
        for seg in decoder.seg():
            w = seg.word
            if w.startswith(("<", "[", "+")):  # <s>, </s>, <sil>, [NOISE], ++FILLER++
                continue
            w = w.split("(", 1)[0]  # alternative pronunciations: "the(2)"
            out.append(TranscriptWord(w, seg.start_frame / self.FRAMES_PER_S, (seg.end_frame + 1) / self.FRAMES_PER_S))
        return out

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "model": self.model, "languages": list(self.languages),
                "cmn_passes": self.cmn_passes, "vocabularies": sorted(self._vocabulary_lms)}


# config.json model_type -> (transformers model class, processor class)
ASR_MODELS: dict[str, tuple[str, str]] = {
    "whisper": ("WhisperForConditionalGeneration", "WhisperProcessor"),
}


class WhisperASR(ASRBackend):
    """A transformers Whisper model by hub id or folder, loaded strictly.

    Args:
        path: a folder (``config.json``, weights, ``generation_config.json``, processor and tokenizer files) or a
            hub id (``openai/whisper-small``; fetched only when the hub is reachable).
        device: torch device. dtype: ``auto`` (float32 on CPU, float16 elsewhere), ``float32``, ``bfloat16``.

    Raises:
        SkillLoadError: see :func:`skills.hf_loading.load_strict`; a ``model_type`` outside :data:`ASR_MODELS`; a
            processor that cannot be built.
    """

    name = "transformers"
    WINDOW_S = 30.0  # Whisper's input window

    def __init__(self, path: str, *, device: str = "cpu", dtype: str = "auto"):
        import transformers

        from skills.hf_loading import load_strict, read_model_type

        model_type = read_model_type(path, "ASR", example="openai/whisper-small")
        if model_type not in ASR_MODELS:
            raise SkillLoadError(f"ASR: {path!r} holds a {model_type!r} model; choose a folder of: "
                                 f"{', '.join(ASR_MODELS)}")
        model_name, processor_name = ASR_MODELS[model_type]
        self.path, self.device, self.model_type = path, device, model_type
        self.model = load_strict(model_name, path, device=device, dtype=dtype, what="ASR")
        try:
            self.processor = getattr(transformers, processor_name).from_pretrained(path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SkillLoadError(f"ASR: cannot load {processor_name} from {path!r}: {e}") from e
        gen = self.model.generation_config
        self.languages = tuple(sorted(k.strip("<|>") for k in (getattr(gen, "lang_to_id", None) or {})))
        self.timestamps = getattr(gen, "no_timestamps_token_id", None) is not None
        self.max_target_positions = int(getattr(self.model.config, "max_target_positions", 448))
        self._lock = threading.Lock()
        self._told_vocabulary = False

    def transcribe(self, samples: np.ndarray, *, language: str | None = None, prompt: str | None = None,
                   temperature: float = 0.0, vocabulary: str | None = None) -> Transcript:
        import torch

        if vocabulary is not None and not self._told_vocabulary:
            self._told_vocabulary = True
            log.info("ASR: Whisper decodes with its open vocabulary; the vocabulary %s is not used", vocabulary)

        if language is not None and self.languages and language.lower() not in self.languages:
            raise SkillError(f"this Whisper model decodes {', '.join(self.languages)}; not {language!r}",
                             "invalid_arguments")
        t0 = time.perf_counter()
        samples = np.asarray(samples, dtype=np.float32)
        duration_s = len(samples) / ASR_SAMPLE_RATE_HZ
        window = int(self.WINDOW_S * ASR_SAMPLE_RATE_HZ)
        kwargs: dict[str, Any] = {"task": "transcribe"}
        prompt_len = 0
        if prompt:  # at most half the decoder's context, the prompt's last tokens (as Whisper's own decoding does)
            prompt_ids = list(self.processor.get_prompt_ids(prompt))
            keep = self.max_target_positions // 2
            prompt_ids = prompt_ids[:1] + prompt_ids[1:][-(keep - 1):] if len(prompt_ids) > keep else prompt_ids
            kwargs["prompt_ids"] = torch.as_tensor(prompt_ids).to(self.device)
            prompt_len = len(prompt_ids)
        # the decoder's context holds the prompt, <|startoftranscript|>, language, task (and <|notimestamps|>)
        kwargs["max_new_tokens"] = max(1, min(440, self.max_target_positions - prompt_len - 5))
        if self.languages:
            kwargs["language"] = (language or "en").lower()
        if self.timestamps:
            kwargs["return_timestamps"] = True
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=float(temperature))
        segments: list[TranscriptSegment] = []
        for start in range(0, max(1, len(samples)), window):
            piece = samples[start:start + window]
            if not len(piece):
                break
            offset_s = start / ASR_SAMPLE_RATE_HZ
            features = self.processor.feature_extractor(piece, sampling_rate=ASR_SAMPLE_RATE_HZ, return_tensors="pt")
            feats = features.input_features.to(self.device, self.model.dtype)
            try:
                with self._lock, torch.inference_mode():
                    ids = self.model.generate(feats, **kwargs)
            except (RuntimeError, ValueError) as e:
                raise SkillError(f"Whisper failed: {type(e).__name__}: {e}", "failed") from e
            seq = ids[0] if not hasattr(ids, "sequences") else ids.sequences[0]
            seq = seq.cpu().tolist()
            if prompt:  # the prompt comes back first in the output; keep what follows <|startoftranscript|>
                sot = self.model.generation_config.decoder_start_token_id
                seq = seq[seq.index(sot):] if sot in seq else seq
            segments += self._segments(seq, offset_s, len(piece) / ASR_SAMPLE_RATE_HZ, len(segments))
        text = " ".join(s.text for s in segments if s.text)
        return Transcript(text, (language or "en").lower(), duration_s, tuple(segments), self.name, self.path,
                          time.perf_counter() - t0)

    def _segments(self, seq: list[int], offset_s: float, length_s: float, first_id: int) -> list[TranscriptSegment]:
        tok = self.processor.tokenizer
        out: list[TranscriptSegment] = []
        if self.timestamps:
            decoded = tok.decode(seq, output_offsets=True, skip_special_tokens=True)
            for off in decoded.get("offsets") or []:
                start_s, end_s = off["timestamp"]
                text = str(off["text"]).strip()
                if text:
                    s = offset_s + float(start_s)
                    e = offset_s + float(end_s if end_s is not None else length_s)
                    out.append(TranscriptSegment(first_id + len(out), s, max(s, min(e, offset_s + length_s)), text))
            if out:
                return out
        text = tok.decode(seq, skip_special_tokens=True).strip()
        if text:
            out.append(TranscriptSegment(first_id, offset_s, offset_s + length_s, text))
        return out

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "model_type": self.model_type, "model": self.path, "device": self.device,
                "languages": list(self.languages)}


ASR_BACKENDS: dict[str, type[ASRBackend]] = {
    PocketsphinxASR.name: PocketsphinxASR,
    WhisperASR.name: WhisperASR,
}


def build_asr(backend: str = "pocketsphinx", *, model: str | None = None, device: str = "cpu",
              dtype: str = "auto") -> ASRBackend:
    """The recogniser ``backend`` (:data:`ASR_BACKENDS`): ``pocketsphinx`` (``model``: optional model folder) or
    ``transformers`` (``model``: a Whisper hub id or folder, required).

    Raises:
        ValueError: an unknown backend (lists the choices), ``transformers`` without ``model``.
        SkillLoadError: the model cannot be loaded.
    """
    if backend not in ASR_BACKENDS:
        raise ValueError(f"unknown ASR backend {backend!r}; choose from: {', '.join(ASR_BACKENDS)}")
    if backend == WhisperASR.name:
        if not model:
            raise ValueError("the transformers ASR backend needs a model (a hub id or a folder)")
        return WhisperASR(model, device=device, dtype=dtype)
    return PocketsphinxASR(model)


# ---- the skill -------------------------------------------------------------------------------------------------
class TranscribeParams(SkillParams):
    """Arguments of ``transcribe``."""

    audio_index: int = Field(0, ge=0, description="which input audio (0-based among the request's audio parts)")
    language: str | None = Field(None, min_length=2, max_length=8,
                                 description="ISO 639-1 code of the spoken language (none: the backend's default)")
    prompt: str | None = Field(None, max_length=1000, description="earlier text or spellings to steer the decoder "
                                                                  "(Whisper; pocketsphinx ignores it)")
    temperature: float = Field(0.0, ge=0.0, le=1.0, description="sampling temperature (Whisper; 0: greedy)")

    @field_validator("language")
    @classmethod
    def _code(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.strip().lower()
        if not v.isalpha():
            raise ValueError("language must be an ISO 639-1 code such as 'en'")
        return v


class TranscribeSkill(Skill):
    """Speech -> text with segment and word times."""

    name = "transcribe"
    description = ("Write down what is said in an audio input (speech recognition); returns the transcript with the "
                   "start and end time of each segment and word.")
    Params = TranscribeParams
    accepts = ("audio",)
    returns = ("text", "data")
    weight = "heavy"

    def __init__(self, asr: ASRBackend | None = None, **build: Any):
        """``asr``: a ready recogniser; else one is built with :func:`build_asr` (``**build``: ``backend``,
        ``model``, ``device``, ``dtype``).

        Raises:
            ValueError, SkillLoadError: see :func:`build_asr`.
        """
        self.asr = asr if asr is not None else build_asr(**build)

    def transcribe(self, samples: np.ndarray, sample_rate_hz: int, *, language: str | None = None,
                   prompt: str | None = None, temperature: float = 0.0,
                   vocabulary: str | None = None) -> Transcript:
        """Transcribe float32 (S,) mono at any rate (resampled to 16 kHz with soxr); ``vocabulary``: see
        :meth:`ASRBackend.transcribe`.

        Raises:
            SkillError: an unusable input (``invalid_input``), a language the backend lacks, a failed decode.
            SkillLoadError: a vocabulary that cannot be used (unreadable, empty, unknown words).
        """
        return self.asr.transcribe(to_rate(samples, sample_rate_hz), language=language, prompt=prompt,
                                   temperature=temperature, vocabulary=vocabulary)

    def _run(self, params: TranscribeParams, media: tuple[MediaPart, ...]) -> SkillResult:
        sounds = [p for p in media if Modality.parse(p.modality) is Modality.AUDIO]
        if not sounds:
            raise SkillError("this skill needs an audio input and the request has none", "invalid_input")
        if params.audio_index >= len(sounds):
            raise SkillError(f"audio_index {params.audio_index} is out of range: the request has {len(sounds)} "
                             f"audio part(s)", "invalid_input")
        part = sounds[params.audio_index]
        if not part.sample_rate_hz:
            raise SkillError(f"audio {params.audio_index} has no sample rate", "invalid_input")
        t = self.transcribe(part.data, part.sample_rate_hz, language=params.language, prompt=params.prompt,
                            temperature=params.temperature)
        summary = (f"transcript of audio {params.audio_index} ({t.duration_s:.1f} s): {t.text!r}" if t.text
                   else f"heard no words in audio {params.audio_index} ({t.duration_s:.1f} s)")
        return SkillResult(self.name, summary, data=t.to_dict())


# ---- a tiny random Whisper for tests ---------------------------------------------------------------------------
def save_tiny_whisper(path: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random Whisper (d_model 16, one layer each) with its processor (an 80-bin feature extractor and
    an offline byte-level BPE tokenizer: the 256 byte symbols, no merges, Whisper's special and timestamp tokens)
    and a generation config (English, transcribe, timestamps) in the real on-disk layout. Returns ``path``.

    Its transcripts are random bytes; it is for loading and running the real code path, not for words.
    """
    import json

    import torch
    from tokenizers import pre_tokenizers
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizer)

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(alphabet)}))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = WhisperTokenizer.from_pretrained(str(path))
    specials = ["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|translate|>", "<|startoflm|>",
                "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>", *(f"<|{i * 0.02:.2f}|>" for i in range(1501))]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ["<|endoftext|>", *specials[:8]]}
    eot = ids["<|endoftext|>"]
    config = WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=80, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_source_positions=1500, max_target_positions=64, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
        decoder_start_token_id=ids["<|startoftranscript|>"], begin_suppress_tokens=[], suppress_tokens=[])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WhisperForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"], eos_token_id=eot, pad_token_id=eot, bos_token_id=eot,
        lang_to_id={"<|en|>": ids["<|en|>"]},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"], prev_sot_token_id=ids["<|startofprev|>"],
        is_multilingual=True, max_initial_timestamp_index=50, max_length=64, begin_suppress_tokens=[],
        suppress_tokens=[])
    processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer)
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path
