"""Skills as a stage of the graph: which deployment hosts which skill, and the host that runs them.

Placement (:data:`SKILL_DEPLOYMENTS`, the default of ``AppArgs.skills``): skills are grouped by weight, one Ray
Serve deployment per group, never in the ingress or the LLM replica:

================== =========================================== ==========================================
deployment         skills                                      why
================== =========================================== ==========================================
``skills-cpu``     ``detect``, ``segment``, ``ocr``            milliseconds to a second on a CPU core; share
                                                               one replica (OpenCV / ONNX Runtime threads)
``skills-generate`` ``generate_image`` / ``_audio`` / ``_video`` the preset's decoders (built in this replica;
                                                               only the modalities the preset decodes)
``skills-objects`` ``detect_objects``                          OWL-ViT over transformers: wants a GPU; only
                                                               deployed when ``object_detector_path`` is set
================== =========================================== ==========================================

:class:`SkillHost` builds the skills of one deployment and runs one call (blocking; the deployment and the
in-process backend call it from worker threads). What crosses the seam is :class:`services.protocol.SkillRequest`
in and :class:`services.protocol.SkillOutput` out (media encoded to files, so the ingress needs no torch).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from polymodal.config import PresetConfig
from polymodal.modality import Modality

from services.protocol import EncodedMedium, SkillOutput, SkillRequest

SKILL_DEPLOYMENTS: dict[str, tuple[str, ...]] = {
    "skills-cpu": ("detect", "segment", "ocr"),
    "skills-generate": ("generate_image", "generate_audio", "generate_video"),
    "skills-objects": ("detect_objects",),
}
"""Deployment name -> the skills it hosts (the default placement)."""


def servable_skills(preset: PresetConfig, names: Sequence[str], *, object_detector_path: str | None = None,
                    modalities: Sequence[Modality] | None = None) -> tuple[str, ...]:
    """The skills of ``names`` this preset can serve: a ``generate_*`` skill needs the preset's decoder of its
    modality (and that modality among ``modalities`` when given); ``detect_objects`` needs
    ``object_detector_path``.

    Raises:
        ValueError: an unknown skill name (lists the choices).
    """
    from skills import get_skill

    decodable = [m for m in preset.decoders if modalities is None or m in modalities]
    out = []
    for n in names:
        cls = get_skill(n)
        m = getattr(cls, "modality", None)
        if m is not None and Modality.parse(m) not in decodable:
            continue
        if n == "detect_objects" and not object_detector_path:
            continue
        out.append(n)
    return tuple(out)


class SkillHost:
    """The built skills of one deployment (or of the in-process backend), run one call at a time per skill.

    Args:
        skills: name -> a built :class:`skills.Skill`.
    """

    def __init__(self, skills: Mapping[str, Any]):
        self.skills = dict(skills)
        self._locks = {n: threading.Lock() for n in self.skills}
        self.calls = 0
        self.failures = 0

    @classmethod
    def build(cls, names: Sequence[str], preset: PresetConfig | str | None = None, *, device: str | None = None,
              decoders: Mapping[Modality, Any] | None = None, object_detector_path: str | None = None,
              ocr_threads: int | None = None) -> "SkillHost":
        """Build ``names`` (imports each skill's libraries).

        Args:
            preset: the preset whose decoders the ``generate_*`` skills use (built here unless ``decoders`` has one).
            decoders: ready decoders per modality (the in-process backend passes its stages' own).
            object_detector_path: OWL-ViT folder or hub id of ``detect_objects``.

        Raises:
            ValueError: an unknown skill, or a ``generate_*`` skill whose modality the preset has no decoder for.
            skills.SkillLoadError / decoders' load errors: a model that cannot be loaded strictly.
        """
        from skills import build_skill, get_skill

        built: dict[str, Any] = {}
        for n in names:
            m = getattr(get_skill(n), "modality", None)
            if m is not None:
                m = Modality.parse(m)
                decoder = (decoders or {}).get(m)
                if decoder is None:
                    from decoders import build_decoder
                    from polymodal.presets import get_preset

                    p = get_preset(preset)
                    if m not in p.decoders:
                        raise ValueError(f"skill {n!r} needs the preset's {m.value} decoder; preset {p.name!r} "
                                         "has none")
                    decoder = build_decoder(m, p.decoders[m], device=device or "cpu")
                built[n] = build_skill(n, decoder=decoder)
            elif n == "detect_objects":
                if not object_detector_path:
                    raise ValueError("skill 'detect_objects' needs object_detector_path (a folder or hub id)")
                kw = {"device": device} if device else {}
                built[n] = build_skill(n, path=object_detector_path, **kw)
            elif n == "ocr" and ocr_threads:
                built[n] = build_skill(n, threads=ocr_threads)
            else:
                built[n] = build_skill(n)
        return cls(built)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.skills)

    def run(self, request: SkillRequest) -> SkillOutput:
        """One call (blocking). A bad call or a failed model is an error result, never an exception.

        Raises:
            ValueError: ``request.name`` is not hosted here (lists the hosted ones).
        """
        skill = self.skills.get(request.name)
        if skill is None:
            raise ValueError(f"skill {request.name!r} is not hosted here; hosted: {', '.join(self.skills) or 'none'}")
        with self._locks[request.name]:
            result = skill.run(request.arguments_json, request.media)
        self.calls += 1
        if not result.ok:
            self.failures += 1
        return encode_output(result)

    def describe(self) -> dict[str, Any]:
        return {"skills": list(self.skills), "calls": self.calls, "failures": self.failures, "healthy": True}


def encode_output(result) -> SkillOutput:
    """A :class:`skills.SkillResult` -> :class:`SkillOutput` (its media encoded to files: PNG / WAV / MP4)."""
    summary = result.to_dict()
    media = []
    for k, m in enumerate(result.media):
        data, mime, ext = m.encode()
        media.append(EncodedMedium(Modality.parse(m.modality), data, mime, ext, seed=int(m.seed or 0), index=k,
                                   text_offset=0, duration_s=getattr(m, "duration_s", None)))
    return SkillOutput(dataclasses.replace(result, media=()), summary, tuple(media))
