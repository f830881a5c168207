"""The ``toy`` preset: smol aligned to the toy world's encoders and decoders.

A toy build folder (``ROOT``) holds what :func:`training.toyworld.build.build` trains:

- ``ROOT/decoders/``: the toy decoders (``toyworld-decoders.json`` + one diffusers folder per modality).
- ``ROOT/encoders/``: the toy image encoder (a transformers ``CLIPModel`` folder, ``image/``), loaded by the
  ``clip`` encoder kind; video frames go through it too. Audio inputs use the seeded random ``tiny`` encoder.
- ``ROOT/export/``: the aligned parts (:mod:`polymodal.export`): input/output projectors, signal-token rows,
  the instruct stage's LoRA adapter.
- ``ROOT/export-grounding/`` (``polymodal toyworld build --grounding``; shipped too): the ``toy-grounding``
  preset's parts: the same instruct stage with grounding rows added, on patch-token image inputs and our
  location tokens (:func:`toy_grounding_preset`).
- ``ROOT/export-skills/`` (``polymodal toyworld build --skills``; shipped too, its build record in
  ``toy-skills-build.json``): the ``toy-skills`` preset's parts: ``toy``'s instruct stage continued on LLaVA-Plus
  skill-use dialogues (:func:`toy_skills_preset`).

The ``toy-3d`` preset's own parts are in a build folder of their own, ``ROOT3D`` (:func:`toy_3d_preset`; the toy
build's size budget has no room for them):

- ``ROOT3D/decoders/``: the toy 3D decoder (``polymodal toyworld train-3d --out ROOT3D/decoders``: its
  ``toyworld-decoders.json`` and ``object3d/``).
- ``ROOT3D/export/``: its aligned parts with the ``<3D0>..<3D3>`` rows (the alignment stages re-run with 3D requests).

``ROOT`` is ``$POLYMODAL_TOY_DIR`` when set, else the build shipped inside the package
(``polymodal/assets/toy``, package data); ``ROOT3D`` is ``$POLYMODAL_TOY_3D_DIR`` when set, else
``polymodal/assets/toy-3d`` (package data: the trained decoder, its denoiser stored in float16, and the export).

The manifests are read here (:data:`MANIFEST`, :func:`manifest_entry`, :func:`decoder_config`): serving needs
them and imports nothing of the offline wing; the offline wing (``training.toyworld``) writes them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from polymodal.config import (
    DecoderConfig,
    DecoderDefaults,
    EncoderConfig,
    GenerationConfig,
    PresetConfig,
    ProjectorConfig,
    SignalConfig,
)
from polymodal.grounding import GroundingConfig
from polymodal.modality import Modality
from polymodal.presets.builtin import SMOL_SYSTEM, smol
from polymodal.signals import ChatFormat

IMAGE, AUDIO, VIDEO, OBJECT3D = Modality.IMAGE, Modality.AUDIO, Modality.VIDEO, Modality.OBJECT3D
# the shipped toy build (package data: pyproject's [tool.setuptools.package-data])
ASSETS = Path(__file__).resolve().parent.parent / "assets" / "toy"
ASSETS_3D = ASSETS.parent / "toy-3d"  # the toy-3d preset's own build (its 3D decoder and export), package data too
SIGNAL_COUNTS = {IMAGE: 4, AUDIO: 4, VIDEO: 8}
# ROOT/decoders/MANIFEST: one entry per trained toy decoder (path, conditioning shape, generation defaults)
MANIFEST = "toyworld-decoders.json"
SPOKEN_VOCABULARY_FILE = ASSETS / "spoken-vocabulary.txt"
"""The toy presets' :attr:`~polymodal.config.PresetConfig.spoken_vocabulary` (package data, written by
``training.toyworld.phrasings.write_spoken_corpus``; ``tests/test_spoken_input.py`` keeps it current)."""
TOY_SPOKEN_TRANSCRIPT = "{transcript}"
"""The toy preset's :attr:`~polymodal.config.PresetConfig.spoken_transcript`: the transcript as plain user text."""


def toy_root() -> Path:
    """``$POLYMODAL_TOY_DIR`` or the shipped build."""
    env = os.environ.get("POLYMODAL_TOY_DIR")
    return Path(env).expanduser() if env else ASSETS


def toy_3d_root() -> Path:
    """``$POLYMODAL_TOY_3D_DIR`` or the shipped toy-3d build (:data:`ASSETS_3D`)."""
    env = os.environ.get("POLYMODAL_TOY_3D_DIR")
    return Path(env).expanduser() if env else ASSETS_3D


def _encoder_dim(folder: Path) -> int:
    cfg = json.loads((folder / "config.json").read_text())
    return int(cfg.get("projection_dim") or cfg.get("vision_config", {}).get("projection_dim"))


GROUNDING_EXPORT = "export-grounding"
SKILLS_EXPORT = "export-skills"
TOY_SKILLS: tuple[str, ...] = ("locate", "count")
"""The skills the ``toy-skills`` model was trained to call (:mod:`skills.toy`; ``polymodal serve --preset toy-skills``
deploys them)."""
SKILLS_BUILD_COMMAND = ("polymodal toyworld build --out {root} --parts-from polymodal/assets/toy "
                        "--instruct-from polymodal/assets/toy/export --skills")
SIGNAL_COUNTS_3D = {**SIGNAL_COUNTS, OBJECT3D: 4}  # toy's rows and ids first, the 3D rows appended


def manifest_entry(out_dir: str | Path, manifest: str, section: str, modality: Modality | str, command: str) -> dict:
    """The ``modality`` entry of ``section`` ("decoders" / "encoders") in ``OUT/manifest``.

    Raises:
        FileNotFoundError: no manifest (names the ``polymodal toyworld`` command that writes it).
        ValueError: the manifest has no entry for that modality.
    """
    manifest_path = Path(out_dir) / manifest
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found; run polymodal toyworld {command} --out {out_dir}")
    m = Modality.parse(modality)
    entry = json.loads(manifest_path.read_text())[section].get(m.value)
    if entry is None:
        raise ValueError(f"{manifest_path} has no {m.value} {section[:-1]}")
    return entry


def decoder_config(out_dir: str | Path, modality: Modality | str) -> DecoderConfig:
    """The :class:`polymodal.config.DecoderConfig` that loads the trained toy decoder of ``modality`` from a
    decoders folder (``OUT/MANIFEST``, written by ``polymodal toyworld train-decoders``).

    Raises:
        FileNotFoundError: no manifest in ``out_dir``.
        ValueError: the manifest has no decoder of that modality.
    """
    out_dir = Path(out_dir)
    entry = manifest_entry(out_dir, MANIFEST, "decoders", modality, "train-decoders")
    return DecoderConfig(source="pretrained", path=str((out_dir / entry["path"]).resolve()),
                         cond_tokens=entry["cond_tokens"], cond_dim=entry["cond_dim"],
                         defaults=DecoderDefaults(**entry["defaults"]))


def toy_grounding_preset(root: str | Path | None = None, *, aligned: bool = True) -> PresetConfig:
    """``toy-grounding``: the toy preset with boxes as an output ("where is the red circle?").

    Differs from :func:`toy_preset` in what grounding needs: image inputs are the toy CLIP's class and patch
    tokens (``clip`` options ``tokens: patches, patch_pool: 2``: 1 + 4 x 4 tokens; a pooled embedding carries too
    little of where the shape is: a ridge probe from it to the box reaches IoU >= 0.5 on 39% of held-out toy
    images, from these 17 tokens on 95%), our location tokens (16 x 16 grid, ``[grounding]`` / ``[refer]``), and
    its own export ``ROOT/export-grounding``. Video inputs stay pooled.

    Raises:
        FileNotFoundError: as :func:`toy_preset`.
    """
    root = Path(root) if root is not None else toy_root()
    base = toy_preset(root, aligned=False)
    encoders = dict(base.encoders)
    if encoders[IMAGE].kind == "clip":
        encoders[IMAGE] = encoders[IMAGE].model_copy(update={"options": {"tokens": "patches", "patch_pool": 2}})
    export = root / GROUNDING_EXPORT
    return base.model_copy(update={
        "name": "toy-grounding",
        "description": "toy world with grounding: boxes around the toy shapes (location tokens over patch-token "
                       "image inputs); built by polymodal toyworld build --grounding",
        "encoders": encoders,
        "grounding": GroundingConfig(),
        "export_dir": str(export.resolve()) if aligned and (export / "export.json").is_file() else None,
    })


def toy_preset(root: str | Path | None = None, *, aligned: bool = True) -> PresetConfig:
    """The toy preset over build folder ``root`` (default :func:`toy_root`).

    ``aligned=False`` leaves out ``ROOT/export`` (the starting point of the alignment stages).

    Raises:
        FileNotFoundError: no toy decoders in ``root`` (says how to build them).
    """
    root = Path(root) if root is not None else toy_root()
    dec_dir = root / "decoders"
    if not (dec_dir / MANIFEST).is_file():
        raise FileNotFoundError(
            f"no toy world build at {root} ({dec_dir / MANIFEST} missing); build one with "
            f"`polymodal toyworld build --out {root}` or point POLYMODAL_TOY_DIR at one")
    decoders = {m: decoder_config(dec_dir, m) for m in SIGNAL_COUNTS
                if (dec_dir / m.value / "model_index.json").is_file()}
    enc_dir = root / "encoders" / "image"
    if (enc_dir / "config.json").is_file():
        clip = EncoderConfig(kind="clip", path=str(enc_dir.resolve()), dim=_encoder_dim(enc_dir))
        encoders = {IMAGE: clip, VIDEO: clip, AUDIO: EncoderConfig(kind="tiny", dim=64)}
    else:
        encoders = {m: EncoderConfig(kind="tiny", dim=64) for m in SIGNAL_COUNTS}
    export = root / "export"
    return PresetConfig(
        name="toy",
        description="toy world: SmolLM2-135M-Instruct aligned to toy decoders (coloured shapes, tones, moving "
                    "shapes) trained from scratch by polymodal toyworld build",
        llm=smol().llm,  # the same SmolLM2-135M-Instruct, aligned by the export
        chat=ChatFormat.chatml(SMOL_SYSTEM),
        signals=SignalConfig(counts=SIGNAL_COUNTS),
        generation=GenerationConfig(max_new_tokens=64, max_outputs=1, prompt_lead_in_tokens=0),
        encoders=encoders,
        # sized so that every shipped part together stays under 10 MB (fp32)
        input_projectors={m: ProjectorConfig(kind="mlp", num_queries=1, hidden_dim=128) for m in SIGNAL_COUNTS},
        output_projectors={
            m: ProjectorConfig(kind="transformer", hidden_dim=64,
                               options={"num_layers": 1, "num_heads": 4, "ff_dim": 128})
            for m in decoders
        },
        decoders=decoders,
        export_dir=str(export.resolve()) if aligned and (export / "export.json").is_file() else None,
        # spoken input (issue #26): the transcript as the user's own text, unmarked, after the audio's tokens: the
        # instruct stage trained on typed requests, and a typed-looking transcript needs no retraining
        # (bench/speech.py (b): spoken held-out requests score near the typed ones)
        spoken_transcript=TOY_SPOKEN_TRANSCRIPT,
        # what a toy user is trained to say, as the recogniser's language model (bench/speech.py (b): spoken audio
        # requests 91.7 % with it, 65.0 % with the generic model; see the README's Speech section)
        spoken_vocabulary=str(SPOKEN_VOCABULARY_FILE),
    )


def toy_skills_preset(root: str | Path | None = None, *, aligned: bool = True) -> PresetConfig:
    """``toy-skills``: ``toy`` whose model uses the toy skills (``locate``, ``count``) the LLaVA-Plus way (issue #25).

    ``toy``'s parts, chat format with ``tool_format: llava-plus`` (the model writes ``"thoughts🤔" ...`` /
    ``"actions🚀" [{"API_name": ..., "API_params": ...}]`` / ``"value👉"``, reads ``<skill> model outputs: ...``;
    :func:`polymodal.constrained.tools.llava_plus`), and its own export ``ROOT/export-skills``: ``toy``'s instruct
    stage continued on the toy MosIT writer's skill-use dialogues (:func:`training.toyworld.mosit.
    write_skill_use_dialogues`) plus ordinary requests (``polymodal toyworld build --skills``). Its skills are
    :data:`TOY_SKILLS` (``polymodal serve --preset toy-skills`` deploys them).

    ``aligned=False``: without the export (the starting point of the build's stage).

    Raises:
        FileNotFoundError: no toy build in ``root``; (aligned) no ``ROOT/export-skills/export.json`` (names the
            build command).
    """
    import dataclasses

    root = Path(root) if root is not None else toy_root()
    base = toy_preset(root, aligned=False)
    export = root / SKILLS_EXPORT
    if aligned and not (export / "export.json").is_file():
        raise FileNotFoundError(
            f"the toy-skills preset is not trained: {export / 'export.json'} missing; build it with "
            f"`{SKILLS_BUILD_COMMAND.format(root=root)}` (then POLYMODAL_TOY_DIR={root} polymodal serve --preset "
            "toy-skills)")
    return base.model_copy(update={
        "name": "toy-skills",
        "description": "toy world with skill use learned the LLaVA-Plus way: calls the toy skills locate and count "
                       "(boxes and counts of shapes in a scene); built by polymodal toyworld build --skills",
        "chat": dataclasses.replace(base.chat, tool_format="llava-plus"),
        "export_dir": str(export.resolve()) if aligned else None,
    })


def toy_3d_preset(root: str | Path | None = None, *, root_3d: str | Path | None = None,
                  aligned: bool = True) -> PresetConfig:
    """``toy-3d``: ``toy`` plus 3D outputs (coloured point clouds: "make a large red torus"), issue #29.

    ``toy``'s parts and signal rows from ``root`` (default :func:`toy_root`; ids kept: ``<3D0>..<3D3>`` are appended
    after video's), and from its own build folder ``root_3d`` (default :func:`toy_3d_root`) the toy 3D decoder
    (``ROOT3D/decoders/object3d``, :mod:`training.toyworld.object3d`) with an output projector like the others and
    its export ``ROOT3D/export`` (the alignment stages re-run with 3D requests). ``toy`` itself does not change.

    Raises:
        FileNotFoundError: no toy build, or no toy 3D decoder in ``root_3d`` (names the commands that make them).
    """
    root = Path(root) if root is not None else toy_root()
    root_3d = Path(root_3d) if root_3d is not None else toy_3d_root()
    base = toy_preset(root, aligned=False)
    dec_dir = root_3d / "decoders"
    if not (dec_dir / OBJECT3D.value / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no toy 3D decoder at {dec_dir / OBJECT3D.value}; train it with "
            f"`polymodal toyworld train-3d --out {dec_dir}` (see training/toyworld/object3d.py) or point "
            "POLYMODAL_TOY_3D_DIR at a toy-3d build")
    export = root_3d / "export"
    return base.model_copy(update={
        "name": "toy-3d",
        "description": "toy world with 3D outputs: coloured point clouds (sphere, cube, pyramid, cylinder, torus) "
                       "from a point-set diffusion decoder trained from scratch (polymodal toyworld train-3d)",
        "signals": SignalConfig(counts=SIGNAL_COUNTS_3D),
        "output_projectors": {**base.output_projectors, OBJECT3D: ProjectorConfig(
            kind="transformer", hidden_dim=64, options={"num_layers": 1, "num_heads": 4, "ff_dim": 128})},
        "decoders": {**base.decoders, OBJECT3D: decoder_config(dec_dir, OBJECT3D)},
        "export_dir": str(export.resolve()) if aligned and (export / "export.json").is_file() else None,
    })
