"""The polymodal side of the job: caption embeddings from a decoder's own text encoder, and fallback
media generation by a decoder (only when its weights are pretrained).

Both go through :func:`polymodal.pipeline.build_decoder_stage`; the stages are built lazily, one per
modality, and shared by the encoder and the generator of one process.
"""

from __future__ import annotations

import threading
from typing import Protocol

import numpy as np

from polymodal.modality import Modality
from mosit.config import CaptionEncoderConfig, GeneratorConfig
from mosit.llm import import_object


class CaptionEncoder(Protocol):
    def encode(self, modality: Modality, captions: list[str]) -> np.ndarray:
        """(B,) captions -> (B, Q, D_cond) float32."""

    def describe(self) -> dict: ...


class MediaGenerator(Protocol):
    def refusal(self, modality: Modality) -> str | None:
        """Why this generator will not make ``modality`` (None: it will)."""

    def generate(self, modality: Modality, caption: str, seed: int) -> tuple[bytes, str]:
        """One medium for ``caption`` -> (file bytes, extension without dot). Raises GenerationError."""


class GenerationError(RuntimeError):
    """The decoder returned no usable medium (NaN, all black, silent, a failed job): the dialogue is
    rejected with this reason."""


class GeneratorUnavailable(RuntimeError):
    """The generation server cannot be reached: the build stops (and resumes later) rather than rejecting."""


class _Stages:
    """Decoder stages of one preset, built on first use (thread-safe)."""

    _shared: dict[str, "_Stages"] = {}
    _shared_lock = threading.Lock()

    def __init__(self, preset: str):
        self.preset = preset
        self._stages: dict[Modality, object] = {}
        self._errors: dict[Modality, str] = {}
        self.lock = threading.Lock()

    @classmethod
    def of(cls, preset: str) -> "_Stages":
        with cls._shared_lock:
            if preset not in cls._shared:
                cls._shared[preset] = cls(preset)
            return cls._shared[preset]

    def get(self, modality: Modality):
        """The stage, or raises ValueError with the reason it cannot be built."""
        with self.lock:
            if modality in self._errors:
                raise ValueError(self._errors[modality])
            if modality not in self._stages:
                from polymodal.pipeline import build_decoder_stage

                try:
                    self._stages[modality] = build_decoder_stage(self.preset, modality)
                except Exception as e:  # noqa: BLE001 - reported as the reason, never silently ignored
                    self._errors[modality] = f"cannot build the {modality.value} decoder of preset {self.preset!r}: {e}"
                    raise ValueError(self._errors[modality]) from e
            return self._stages[modality]


class DecoderCaptionEncoder:
    """``stage.decoder.encode_text(captions)`` of a preset's decoder: the decoding-side alignment target
    (NExT-GPT stage 2: SD prompt_embeds (77, 768), AudioLDM CLAP (1, 512), zeroscope (77, 1024))."""

    def __init__(self, preset: str = "smol"):
        self.stages = _Stages.of(preset)

    def encode(self, modality: Modality, captions: list[str]) -> np.ndarray:
        stage = self.stages.get(modality)
        with self.stages.lock:
            emb = stage.decoder.encode_text(list(captions))
        arr = emb.detach().float().cpu().numpy()
        return arr[:, None, :] if arr.ndim == 2 else arr

    def describe(self) -> dict:
        out = {"kind": "preset", "preset": self.stages.preset, "decoders": {}}
        for m in Modality:
            try:
                st = self.stages.get(m)
                out["decoders"][m.value] = {"init_state": st.decoder.init_state,
                                            "cond_shape": list(st.decoder.cond_shape)}
            except ValueError as e:
                out["decoders"][m.value] = {"error": str(e)}
        return out


class DecoderMediaGenerator:
    """Text -> medium with a preset's decoder (``encode_text`` then ``render``; the output projector
    is not involved). Refuses a decoder whose ``init_state`` is not ``"pretrained"``: random weights make
    noise, never training data."""

    def __init__(self, preset: str = "smol"):
        self.stages = _Stages.of(preset)
        self.name = f"polymodal:{preset}"

    def refusal(self, modality: Modality) -> str | None:
        try:
            st = self.stages.get(modality)
        except ValueError as e:
            return str(e)
        if st.decoder.init_state != "pretrained":
            return (f"generation refused: the {modality.value} decoder of preset {self.stages.preset!r} has "
                    f"{st.decoder.init_state} weights")
        return None

    def generate(self, modality: Modality, caption: str, seed: int) -> tuple[bytes, str]:
        st = self.stages.get(modality)
        with self.stages.lock:
            emb = st.decoder.encode_text([caption])
            out = st.decoder.render(emb, [int(seed)])[0]
        if not hasattr(out, "encode"):
            raise GenerationError(f"the {modality.value} decoder gave no usable medium: "
                                  f"{getattr(out, 'reason', out)}")
        data, _mime, ext = out.encode()
        return data, ext


class HTTPMediaGenerator:
    """A running polymodal server (``polymodal serve``): ``POST /images/generations``,
    ``/audio/generations`` (``b64_json``) and ``/videos`` (an asynchronous job, polled, then ``/content``),
    with the caption as the prompt and the derived seed. Refuses a modality whose decoder stage the
    server's ``GET /models`` card reports as not ``pretrained`` (the prompt goes through the LLM, the
    output projector and the decoder, so all of the stage must be trained).

    Raises (from ``generate``): GenerationError on an HTTP error, a failed job or a timeout.
    """

    _PATHS = {Modality.IMAGE: ("images/generations", "png"), Modality.AUDIO: ("audio/generations", "wav")}

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout_s: float = 600.0, poll_s: float = 2.0):
        import httpx

        self.base = base_url.rstrip("/")
        self.timeout_s, self.poll_s = timeout_s, poll_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=timeout_s, headers=headers)
        self._card: dict | None = None
        self._lock = threading.Lock()
        self._httpx = httpx
        self.name = f"polymodal-http:{self.base}"

    def _decoders(self) -> dict:
        with self._lock:
            if self._card is None:
                r = self._client.get(f"{self.base}/models")
                r.raise_for_status()
                self._card = r.json()["data"][0]
            return ((self._card.get("parts") or {}).get("decoders") or {})

    def refusal(self, modality: Modality) -> str | None:
        try:
            dec = self._decoders().get(modality.value)
        except Exception as e:  # noqa: BLE001 - reported as the reason
            return f"generation refused: cannot read {self.base}/models: {e}"
        if dec is None:
            return f"generation refused: the server at {self.base} has no {modality.value} decoder"
        state = dec.get("init_state")
        if state != "pretrained":
            return f"generation refused: the server's {modality.value} decoder stage has {state} weights"
        return None

    def _request(self, method: str, path: str, **kw):
        try:
            return self._client.request(method, f"{self.base}/{path}", **kw)
        except self._httpx.TransportError as e:
            raise GeneratorUnavailable(f"{method} {self.base}/{path}: {type(e).__name__}: {e}") from e

    def _post(self, path: str, body: dict) -> dict:
        r = self._request("POST", path, json=body)
        if r.status_code != 200:
            raise GenerationError(f"POST {path}: HTTP {r.status_code}: {r.text[:200]}")
        return r.json()

    def generate(self, modality: Modality, caption: str, seed: int) -> tuple[bytes, str]:
        import base64
        import time

        if modality in self._PATHS:
            path, ext = self._PATHS[modality]
            out = self._post(path, {"prompt": caption, "n": 1, "response_format": "b64_json", "seed": int(seed)})
            return base64.b64decode(out["data"][0]["b64_json"]), ext
        job = self._post("videos", {"prompt": caption, "seed": int(seed)})
        deadline = time.monotonic() + self.timeout_s
        while job.get("status") not in ("completed", "failed"):
            if time.monotonic() > deadline:
                raise GenerationError(f"video job {job.get('id')} did not finish in {self.timeout_s:g} s")
            time.sleep(self.poll_s)
            job = self._request("GET", f"videos/{job['id']}").json()
        if job["status"] == "failed":
            raise GenerationError(f"video job {job['id']} failed: {job.get('error')}")
        r = self._request("GET", f"videos/{job['id']}/content")
        if r.status_code != 200:
            raise GenerationError(f"video content: HTTP {r.status_code}")
        return r.content, "mp4"


class NoGenerator:
    name = "none"

    def refusal(self, modality: Modality) -> str | None:
        return "no generator configured"

    def generate(self, modality, caption, seed):  # pragma: no cover - never called after a refusal
        raise GenerationError("no generator configured")


def build_caption_encoder(cfg: CaptionEncoderConfig) -> CaptionEncoder | None:
    """None for kind ``none`` (no ``.npy`` written; the summary says so)."""
    if cfg.kind == "none":
        return None
    if cfg.kind == "preset":
        return DecoderCaptionEncoder(cfg.preset)
    return import_object(cfg.factory)(**cfg.options)


def build_generator(cfg: GeneratorConfig) -> MediaGenerator:
    if cfg.kind == "none":
        return NoGenerator()
    if cfg.kind == "preset":
        return DecoderMediaGenerator(cfg.preset)
    if cfg.kind == "http":
        import os

        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        return HTTPMediaGenerator(cfg.base_url, api_key=key, timeout_s=cfg.timeout_s)
    return import_object(cfg.factory)(**cfg.options)
