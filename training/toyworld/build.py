"""``polymodal toyworld build``: the whole toy world in one deterministic, cached command.

Steps (each skipped when its inputs and settings are unchanged; one torch thread; seeded):

1. Data (:mod:`training.toyworld.data`): ``work/data-canonical`` (32 px, canonical layout: what the decoders
   learn to draw, and the MosIT catalog) and ``work/data-random`` (64 px images in the random layout: the
   encoder and the encoding side).
2. Toy decoders (:mod:`training.toyworld.train`) -> ``OUT/decoders``; toy image encoder
   (:mod:`training.toyworld.encoder`) -> ``OUT/encoders``.
3. MosIT dialogues from the toy catalog (``polymodal mosit build`` with ``training/toyworld/mosit.yaml`` and
   its toy writer) -> ``work/mosit``; with ``mosit_edit_weight`` > 0 also edit dialogues (:func:`with_edits`).
4. Alignment of ``smol`` with the three NExT-GPT stages (:mod:`training.align`), each starting from the
   previous stage's export: ``encode`` (input projectors on toy images and captions), ``decode`` (output
   projectors on training-bank requests, LLM frozen, states cached, groups open the answer), ``instruct``
   (LoRA + both projectors + signal rows on the MosIT dialogues, requests with lead-ins and plain questions
   answered in words: :mod:`training.toyworld.plain`, the base model's own answers, cached) -> ``OUT/export``.
5. With ``grounding``: the ``toy-grounding`` preset's instruct stage (:func:`polymodal.presets.toy.
   toy_grounding_preset`: patch-token image inputs, location tokens), from the decode stage's export, on
   RefCOCO-style rows of every random-layout image ("where is the red circle?" -> its box,
   :mod:`training.toyworld.grounding`) -> ``OUT/export-grounding``. About 2000 steps of batch 32: minutes on
   a GPU (``device="cuda"``), hours on one CPU core.
6. ``OUT/toyworld-build.json``: the settings, each step's figures and the size of every shipped part.

``OUT`` is then a toy build folder (:mod:`polymodal.presets.toy`): ``POLYMODAL_TOY_DIR=OUT polymodal serve
--preset toy``. The package ships one in ``polymodal/assets/toy``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from polymodal.modality import Modality
from training.toyworld.data import MAKERS

TOY_MODALITIES = tuple(MAKERS)  # the modalities the toy world has a recipe for (image, audio, video)

BUILD_MANIFEST = "toyworld-build.json"
IMAGE, AUDIO, VIDEO = Modality.IMAGE, Modality.AUDIO, Modality.VIDEO


@dataclass(frozen=True)
class BuildSettings:
    """What decides a toy build (every field is hashed into the cache keys of the steps it affects)."""

    seed: int = 0
    canonical_count: int = 1200  # per modality
    random_count: int = 2400  # images
    mosit_dialogues: int = 600
    decode_requests: int = 1152  # per modality (training bank)
    # requests per modality, with lead-ins, besides the MosIT dialogues; at least plain_dialogues of them (drawn
    # afresh from the training bank): no modality's requests, asked in words as a client without `modalities`
    # asks, are outnumbered by the plain dialogues (600 plain rows beside 192 per modality cost video asked in
    # words 30/30 -> 11/30: the requests without "video" in them came back as images)
    instruct_requests: int = 192
    # per-modality multipliers of those requests, e.g. (("video", 2.0),): more of a modality whose requests the
    # plain dialogues pull towards another (trial 2 of the continued stage: 23/30 video requests asked in words,
    # every miss named only the motion, "a red circle that moves left", and came back as an image). () : 1 each
    instruct_request_weights: tuple[tuple[str, float], ...] = ()
    # plain-question dialogues (training.toyworld.plain: the training bank of plain questions, the base model's own
    # answers) in the instruct data besides the MosIT dialogues and requests: the mix ratio (0: none; more than the
    # bank's answered questions cycles through them). 0 in a full build (the shipped export got its plain
    # dialogues by a continued instruct stage: build(instruct_from=...), see the README's toy world)
    plain_dialogues: int = 0
    plain_max_new_tokens: int = 96  # the base model's answers: longer ones are cut to whole sentences
    # answer only this many questions of the bank, the shortest (the distillation answers shortest first, so the
    # answers of a run stopped part-way serve it); None: all
    plain_bank: int | None = None
    encode_steps: int = 300
    decode_steps: int = 6000  # cheap: the LLM states are cached (1500 steps ~ 36 s)
    instruct_steps: int = 300
    # build(instruct_from=...): steps of the instruct stage continued from a build's export (its LoRA, projectors
    # and token rows keep training on this build's instruct data; the encode and decode stages are skipped)
    continue_steps: int = 60
    # the continued stage's learning rate (every part) and its linear warm-up. The finished stage ended its cosine
    # near 0; restarting at lr (1e-3) with a fresh AdamW moved the LoRA matrices by 20-40% (relative norm) in 60
    # steps and the video requests asked in words drifted to images (above)
    continue_lr: float = 5e-4
    continue_warmup_steps: int = 6
    # the signal states' loss against the next-token loss in the instruct stage. Measured (in process, 24 held-out
    # requests, 32-token lead-in): 4.0 lifts video 25% -> 54% but drops image 98% -> 79% and raises the
    # instruct CE 0.44 -> 1.53; decode-stage requests with lead-ins changed nothing (video 25%)
    instruct_mse_weight: float = 1.0
    # TrainConfig.signal_ce of the instruct stage: "first" labels only the token that opens an output group, so the
    # other signal states answer to the decoding-side loss alone. Measured on this build (in process, 24 held-out
    # requests, 32-token lead-in): video 6/24 with "all" (NExT-GPT's labelling) -> 23/24 with "first"; image 22/24
    instruct_signal_ce: str = "first"
    # the toy-grounding instruct stage (only with build(grounding=True)), on the grounding rows alone. Measured
    # on an H200 (in process, 60 held-out images, IoU >= 0.5): this recipe at 1983 steps 97%; with the instruct
    # stage's MosIT and request data mixed in, at the same batch 78% (LoRA r 16 on q, k, v, o) and 57% (r 4 on
    # q, v) after ~1200 steps, 25% at batch 8 after 1531
    grounding_steps: int = 2000
    grounding_batch_size: int = 32
    batch_size: int = 8
    decode_batch_size: int = 32
    lora_r: int = 4
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")  # 0.9 MB: the shipped build stays under 10 MB
    lr: float = 1e-3
    step_scale: float = 1.0  # multiplies every training step count (tests, quick trials)
    # MosIT edit dialogues (issue #27; mode EDIT_MODE: a shared toy image and a recolour / reshape instruction ->
    # the edited image, see with_edits): their weight beside the other modes' (T_I, T_A, T_V 1.0, I_T 0.5) among
    # the mosit_dialogues. 0 (default): none, and the MosIT step's cache key is the one it always had (the shipped
    # build is unchanged). Trained and measured: the README's editing paragraph.
    mosit_edit_weight: float = 0.0
    # with edits: the weight of the image-in dialogues (I_T: "<Image> What is in this picture?" -> "It is a red
    # circle.") instead of mosit.yaml's 0.5, replayed beside the edits so that learning to answer a shared image
    # with *another* colour or shape does not teach describing it wrongly. None: mosit.yaml's.
    mosit_image_in_weight: float | None = None
    # build(skills=True) (issue #25): the toy-skills preset's instruct stage, continued from instruct_from on
    # LLaVA-Plus skill-use dialogues over toy scenes (training.toyworld.mosit.write_skill_use_dialogues: training
    # phrasings, the real toy skills' results) plus ordinary requests with lead-ins per modality (so media generation
    # is kept), at continue_lr. Shipped as polymodal/assets/toy/export-skills (its figures: the README's toy-skills
    # paragraph)
    skill_use_dialogues: int = 600  # families alternating (locate, count)
    skill_use_requests: int = 100  # per modality
    skill_use_steps: int = 300

    def __post_init__(self) -> None:
        self.instruct_request_counts()  # a bad weight fails when the settings are made, not mid-build
        _check_edit_weights(self.mosit_edit_weight, self.mosit_image_in_weight)

    def instruct_request_counts(self) -> int | dict[Modality, int]:
        """Instruct-stage requests per modality: ``max(instruct_requests, plain_dialogues)`` times each modality's
        weight (an int when no weight is set: the files, and so the cache keys, of earlier builds).

        Raises:
            ValueError: a weight names a modality the toy world has no recipe for, or is not > 0."""
        base = max(self.instruct_requests, self.plain_dialogues)
        if not self.instruct_request_weights:
            return base
        weights = {Modality.parse(m): float(w) for m, w in self.instruct_request_weights}
        bad = [m.value for m, w in weights.items() if m not in TOY_MODALITIES or not w > 0]
        if bad:
            raise ValueError(f"instruct_request_weights: {bad} must be toy modalities "
                             f"({[m.value for m in TOY_MODALITIES]}) with a weight > 0")
        return {m: max(1, int(round(base * weights.get(m, 1.0)))) for m in TOY_MODALITIES}

    def steps(self, n: int) -> int:
        return max(1, int(round(n * self.step_scale)))


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _done(folder: Path, key: str) -> bool:
    stamp = folder / ".build-key"
    return stamp.is_file() and stamp.read_text() == key


def _stamp(folder: Path, key: str) -> None:
    (folder / ".build-key").write_text(key)


def _data(out: Path, *, count: int, seed: int, modalities, size_px: int, layout: str, progress: bool) -> Path:
    from training.toyworld.data import write_dataset

    key = _key({"count": count, "seed": seed, "modalities": [m.value for m in modalities], "size_px": size_px,
                "layout": layout})
    if _done(out, key):
        return out / "catalog.jsonl"
    if out.exists():
        shutil.rmtree(out)
    write_dataset(out, count=count, seed=seed, modalities=modalities, size_px=size_px, layout=layout,
                  progress=progress)
    _stamp(out, key)
    return out / "catalog.jsonl"


EDIT_MODE = "I_E"
"""The MosIT mode of the toy edit dialogues (a custom mode: the human shares an image, the assistant shows one)."""


def _check_edit_weights(weight: float, image_in_weight: float | None) -> None:
    """Raises ValueError: a negative weight, or an image-in weight without edits."""
    if weight < 0 or (image_in_weight is not None and image_in_weight < 0):
        raise ValueError(f"mosit_edit_weight and mosit_image_in_weight must be >= 0, got {weight}, {image_in_weight}")
    if weight == 0 and image_in_weight is not None:
        raise ValueError("mosit_image_in_weight is the image-in replay beside edits: set mosit_edit_weight too")


def with_edits(cfg, weight: float, image_in_weight: float | None = None):
    """The toy MosIT config ``cfg`` (a :class:`mosit.config.MositConfig`) with edit dialogues: mode
    :data:`EDIT_MODE` (``inputs: [image]``, ``outputs: [image]``) at ``weight``, and the toy writer's ``edits``
    option on (:class:`training.toyworld.mosit.ToyDialogueWriter`: such an exchange is a recolour or a reshape of
    the shared image, in the training bank's phrasings); ``image_in_weight``: the ``I_T`` mode's weight instead of
    ``cfg``'s (image-in dialogues replayed beside the edits). ``weight`` 0: ``cfg`` unchanged.

    Raises:
        ValueError: a negative weight, or an image-in weight without edits or without an ``I_T`` mode.
    """
    from mosit.config import ModeConfig

    _check_edit_weights(weight, image_in_weight)
    if weight == 0:
        return cfg
    modes = {**cfg.modes, EDIT_MODE: ModeConfig(inputs=[IMAGE], outputs=[IMAGE], weight=weight)}
    if image_in_weight is not None:
        if "I_T" not in cfg.modes:
            raise ValueError("mosit_image_in_weight: the MosIT config has no I_T mode")
        modes["I_T"] = cfg.modes["I_T"].model_copy(update={"weight": image_in_weight})
    return cfg.model_copy(update={"modes": modes,
                                  "llm": cfg.llm.model_copy(update={"options": {**cfg.llm.options, "edits": True}})})


def _mosit(work: Path, data_dir: Path, s: BuildSettings, progress: bool) -> Path:
    from mosit.config import load_config
    from mosit.job import build as mosit_build

    out = work / "mosit"
    config = Path(__file__).resolve().parent / "mosit.yaml"
    edits = {"edit_weight": s.mosit_edit_weight} if s.mosit_edit_weight else {}  # off: the key it always had
    if s.mosit_image_in_weight is not None:
        edits["image_in_weight"] = s.mosit_image_in_weight
    key = _key({"config": config.read_text(), "data": (data_dir / ".build-key").read_text(),
                "n": s.mosit_dialogues, "seed": s.seed, **edits})
    if _done(out, key):
        return out / "mosit.json"
    if out.exists():
        shutil.rmtree(out)
    old = os.environ.get("TOYWORLD_DATA")
    os.environ["TOYWORLD_DATA"] = str(data_dir.resolve())
    try:
        cfg = load_config(config, seed=s.seed).model_copy(update={"num_dialogues": s.mosit_dialogues})
        cfg = with_edits(cfg, s.mosit_edit_weight, s.mosit_image_in_weight)
        mosit_build(cfg, out, progress=progress)
    finally:
        if old is None:
            os.environ.pop("TOYWORLD_DATA", None)
        else:
            os.environ["TOYWORLD_DATA"] = old
    _stamp(out, key)
    return out / "mosit.json"


def _stage(name: str, work: Path, preset_yaml: Path, data: list, init_from: Path | None, key_parts: dict,
           progress: bool, *, folder: str | None = None, device: str | None = None, **fields) -> tuple[Path, dict]:
    """Run one alignment stage (cached) in ``work/align-{folder or name}``; returns (export folder, last metrics).

    Resumable: the trainer writes a checkpoint every 5% of the steps (at least 10); a run of the same stage (same
    key: data, settings, start) that was stopped continues from it, and ends with the weights of an unstopped run.
    """
    from training.align import TrainConfig, train
    from training.align.config import DataSource
    from training.align.trainer import checkpoint_path

    out = work / f"align-{folder or name}"
    on = {} if device in (None, "cpu") else {"device": device}  # CPU builds keep the keys they always had
    init_key = None
    if init_from is not None:  # an earlier stage of this build (its stamp), or a finished export (its files)
        stamp = init_from / ".build-key"
        init_key = stamp.read_text() if stamp.is_file() else _key(
            {str(f.relative_to(init_from)): _file_key(str(f)) for f in sorted(init_from.rglob("*")) if f.is_file()})
    key = _key({**key_parts, **on, "fields": fields, "data": [_file_key(d["path"]) for d in data],
                "init": init_key})
    export = out / "export"
    if _done(export, key):
        return export, json.loads((out / "figures.json").read_text())
    # an interrupted run of this very stage (same key) continues from its checkpoint; anything else starts afresh
    resume = (out / ".stage-key").is_file() and (out / ".stage-key").read_text() == key \
        and checkpoint_path(out).is_file()
    if out.exists() and not resume:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ".stage-key").write_text(key)
    steps = fields.get("max_steps") or 0
    cfg = TrainConfig(stage=name, preset=str(preset_yaml), data=[DataSource(**d) for d in data], out_dir=str(out),
                      init_from=str(init_from) if init_from else None, progress=progress, tensorboard=False,
                      checkpoint_every=max(10, steps // 20), resume=resume, device=device or "cpu", **fields)
    if resume and progress:
        print(f"[toyworld] {name}: continuing the interrupted run in {out}", flush=True)
    t = time.time()
    result = train(cfg)
    figures = {k: round(float(v), 5) for k, v in result.last.items()}
    figures.update(train_s=round(time.time() - t, 1), num_examples=result.num_examples, steps=result.step)
    (out / "figures.json").write_text(json.dumps(figures))
    _stamp(export, key)
    shutil.rmtree(checkpoint_path(out).parent, ignore_errors=True)  # the export is what is kept
    return export, figures


def _file_key(path: str) -> str:
    """A data file's cache key: its content (a rewritten request file with other answers retrains the stage)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _size_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20, 3)


def _reuse_parts(parts_from: Path, out: Path, log) -> tuple[dict, dict]:
    """Copy the trained ``decoders/`` and ``encoders/`` of the build folder ``parts_from`` into ``out`` (unless they
    are the same folders) -> their manifests (decoders, encoders), used as they are: their config hashes are not
    checked against this build's data (file bytes of WAV / MP4 change with the codecs; what the parts learned does
    not).

    Raises:
        FileNotFoundError: ``parts_from`` lacks a part's manifest (names it).
    """
    from polymodal.presets.toy import MANIFEST as DECODERS_MANIFEST
    from training.toyworld.encoder import MANIFEST as ENCODERS_MANIFEST

    manifests = []
    for name, manifest in (("decoders", DECODERS_MANIFEST), ("encoders", ENCODERS_MANIFEST)):
        src, dst = parts_from / name, out / name
        if not (src / manifest).is_file():
            raise FileNotFoundError(f"{src / manifest} not found: --parts-from needs a toy build folder with trained "
                                    f"decoders/ and encoders/ (e.g. polymodal/assets/toy)")
        if src.resolve() != dst.resolve():
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(src, dst)
        log(f"{name}: reused from {src}")
        manifests.append(json.loads((dst / manifest).read_text()))
    return manifests[0], manifests[1]


def build(out: str | Path, settings: BuildSettings | None = None, *, progress: bool = True,
          work: str | Path | None = None, grounding: bool = False, device: str | None = None,
          parts_from: str | Path | None = None, instruct_from: str | Path | None = None,
          skills: bool = False, threads: int = 1, edit_decoder: str | Path | None = None) -> dict:
    """Build (or bring up to date) the toy world into ``out``; returns the build manifest.

    ``work``: intermediate files (default ``OUT/work``; not needed by the preset, safe to delete).
    ``grounding``: also build ``OUT/export-grounding`` (the ``toy-grounding`` preset; step 5 of the module).
    ``device``: where the alignment stages train (default ``cpu``: the shipped build; ``cuda``: the LLM in
    float32 there too, so its results match a CPU build up to kernel rounding, and stages trained on another
    device are cached apart). The toy decoders and encoder always train on the CPU.
    ``instruct_from``: a finished toy export (e.g. ``polymodal/assets/toy/export``, with ``parts_from`` the build
    it belongs to): skip the encode and decode stages and continue its instruct stage (its LoRA kept training,
    ``TrainConfig.continue_lora``) for ``settings.continue_steps`` on this build's instruct data. The way to
    add data (plain dialogues) to a shipped build without its 1.5 CPU hours; the manifest names the start.
    ``skills`` (with ``instruct_from``): the ``toy-skills`` preset instead (issue #25; :func:`_skills`): the
    instruct stage continued on LLaVA-Plus skill-use dialogues and ordinary requests into ``OUT/export-skills``;
    the MosIT and plain steps and ``OUT/export`` are left alone.
    ``edit_decoder``: an InstructPix2Pix toy decoder (``polymodal toyworld edit-decoder``) made the build's image
    decoder (:func:`training.toyworld.editing.install_edit_decoder`; issue #27): it generates and edits.
    ``threads``: torch threads of the alignment stages (1: how the shipped builds were made; more is faster on a
    free machine, with results equal up to float rounding; not part of any cache key).

    Raises:
        ValueError: ``device`` is neither ``cpu`` nor an available ``cuda`` device; ``instruct_from`` with
            ``grounding``; bad settings (from the steps).
        FileNotFoundError: from the steps (missing files); ``parts_from`` without decoders or encoders;
            ``instruct_from`` without ``export.json``. ValueError: ``skills`` without ``instruct_from`` or with
            ``grounding``.
    """
    import torch

    from polymodal.presets.toy import GROUNDING_EXPORT, toy_grounding_preset, toy_preset
    from training.toyworld.align import write_requests
    from training.toyworld.encoder import train_encoders
    from training.toyworld.grounding import write_grounding_rows
    from training.toyworld.phrasings import plain_training_questions
    from training.toyworld.plain import distill_answers, write_dialogues
    from training.toyworld.train import train_decoders

    s = settings or BuildSettings()
    if skills and (instruct_from is None or grounding):
        raise ValueError("skills continues a finished toy export's instruct stage: give instruct_from (e.g. "
                         "polymodal/assets/toy/export) and no grounding")
    if device not in (None, "cpu") and not (device.startswith("cuda") and torch.cuda.is_available()):
        raise ValueError(f"device {device!r}: expected cpu, or cuda on a machine where CUDA is available")
    if skills and not (Path(instruct_from) / "export.json").is_file():
        raise FileNotFoundError(f"{Path(instruct_from) / 'export.json'} not found: --instruct-from needs a finished "
                                f"toy export (e.g. polymodal/assets/toy/export)")
    torch.set_num_threads(max(1, int(threads)))
    out = Path(out).resolve()
    work = Path(work).resolve() if work else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log = (lambda msg: print(f"[toyworld build] {msg}", flush=True)) if progress else (lambda msg: None)

    log("data")
    canonical = _data(work / "data-canonical", count=s.canonical_count, seed=s.seed, modalities=list(TOY_MODALITIES),
                      size_px=32, layout="canonical", progress=progress).parent
    random_images = _data(work / "data-random", count=s.random_count, seed=s.seed + 1, modalities=[IMAGE],
                          size_px=64, layout="random", progress=progress).parent

    if parts_from is not None:
        decoders, encoders = _reuse_parts(Path(parts_from), out, log)
    else:
        log("toy decoders")
        decoders = train_decoders(canonical, out / "decoders", step_scale=s.step_scale, progress=progress)
        log("toy image encoder")
        encoders = train_encoders(random_images, out / "encoders", step_scale=s.step_scale, progress=progress)
    if edit_decoder is not None:
        from training.toyworld.editing import install_edit_decoder

        decoders = install_edit_decoder(edit_decoder, out / "decoders")
        log(f"image decoder: the InstructPix2Pix decoder {edit_decoder}")

    if skills:
        return _skills(out, work, s, instruct_from, decoders, encoders, device, progress, t0, log)

    log("MosIT dialogues from the toy catalog")
    mosit = _mosit(work, canonical, s, progress)

    def trained_on_device(p):  # float32 wherever the stages train ("auto" would be float16 on a GPU)
        if device in (None, "cpu"):
            return p
        return p.model_copy(update={"llm": p.llm.model_copy(update={"dtype": "float32"}), "decoders": {
            m: d.model_copy(update={"dtype": "float32"}) for m, d in p.decoders.items()}})

    preset = trained_on_device(toy_preset(out, aligned=False))
    preset_yaml = work / "preset-unaligned.yaml"
    preset_yaml.write_text(preset.to_yaml())
    # the encoding side depends on the LLM, encoders and input projectors only (not on the decoders)
    input_side = preset.model_copy(update={"decoders": {}, "output_projectors": {}})
    input_key = {"preset": input_side.to_yaml().replace(str(out), "OUT"),
                 "encoders": {m: e["config_hash"] for m, e in encoders["encoders"].items()}}
    parts_key = {**input_key, "preset": preset.to_yaml().replace(str(out), "OUT"),
                 "decoders": {m: e["config_hash"] for m, e in decoders["decoders"].items()}}
    decode_data = write_requests(work / "requests-decode.json", list(TOY_MODALITIES), s.decode_requests, seed=s.seed)
    instruct_data = write_requests(work / "requests-instruct.json", list(TOY_MODALITIES), s.instruct_request_counts(),
                                   seed=s.seed + 1, lead_ins=True)
    common = dict(seed=s.seed, lr=s.lr, device=device)
    instruct = dict(batch_size=s.batch_size, lora_r=s.lora_r, lora_alpha=float(2 * s.lora_r),
                    lora_targets=list(s.lora_targets), mse_weight=s.instruct_mse_weight,
                    signal_ce=s.instruct_signal_ce, **common)  # the instruct stage's fields (toy and toy-grounding)

    plain_data = []
    if instruct_from is not None and grounding:
        raise ValueError("instruct_from continues the toy instruct stage only; build grounding without it")
    if instruct_from is not None and not (Path(instruct_from) / "export.json").is_file():
        raise FileNotFoundError(f"{Path(instruct_from) / 'export.json'} not found: --instruct-from needs a finished "
                                f"toy export (e.g. polymodal/assets/toy/export)")
    if s.plain_dialogues:
        log("plain questions: the base model's answers (cached)")
        bank = plain_training_questions(s.seed)
        rows = distill_answers(bank if s.plain_bank is None else sorted(bank, key=len)[:s.plain_bank],
                               work / "plain-answers",
                               max_new_tokens=s.plain_max_new_tokens, progress=progress)
        plain_data = [{"path": str(write_dialogues(work / "plain-dialogues.json", rows, s.plain_dialogues)),
                       "format": "t2x"}]

    instruct_data_all = [{"path": str(mosit), "format": "mosit"}, {"path": str(instruct_data), "format": "t2x"},
                         *plain_data]
    if instruct_from is not None:
        start = Path(instruct_from).resolve()
        log(f"alignment: instruction tuning continued from {start} (encode and decode stages skipped)")
        ins_export, ins_fig = _stage(
            "instruct", work, preset_yaml, instruct_data_all, start, parts_key, progress, folder="instruct-continued",
            max_steps=s.steps(s.continue_steps), continue_lora=True,
            **{**instruct, "lr": s.continue_lr, "warmup_steps": s.steps(s.continue_warmup_steps)})
        return _finish(out, {"export": ins_export}, {"instruct_continued": ins_fig}, s, decoders, encoders, t0, log,
                       continued_from=_continued_from(start))

    log("alignment 1/3: encoding side")
    enc_export, enc_fig = _stage(
        "encode", work, preset_yaml, [{"path": str(random_images / "catalog.jsonl"), "format": "jsonl"}], None,
        input_key, progress, max_steps=s.steps(s.encode_steps), batch_size=s.batch_size, modalities=[IMAGE],
        **common)
    log("alignment 2/3: decoding side")
    dec_export, dec_fig = _stage(
        "decode", work, preset_yaml, [{"path": str(decode_data), "format": "t2x"}], enc_export, parts_key, progress,
        max_steps=s.steps(s.decode_steps), batch_size=s.decode_batch_size, token_rows="none", ce_weight=0.0,
        **common)
    log("alignment 3/3: instruction tuning (LoRA)")
    ins_export, ins_fig = _stage(
        "instruct", work, preset_yaml, instruct_data_all, dec_export, parts_key, progress,
        max_steps=s.steps(s.instruct_steps), **instruct)

    exports = {"export": ins_export}
    figures = {"encode": enc_fig, "decode": dec_fig, "instruct": ins_fig}
    if grounding:
        log("grounding: the toy-grounding instruct stage (patch-token inputs, location tokens)")
        g_preset = trained_on_device(toy_grounding_preset(out, aligned=False))
        g_yaml = work / "preset-grounding.yaml"
        g_yaml.write_text(g_preset.to_yaml())
        rows = write_grounding_rows(random_images / "catalog.jsonl", work / "grounding-rows.json", seed=s.seed)
        exports[GROUNDING_EXPORT], figures["grounding"] = _stage(
            "instruct", work, g_yaml, [{"path": str(rows), "format": "grounding"}], dec_export,
            {**parts_key, "preset": g_preset.to_yaml().replace(str(out), "OUT")}, progress, folder="grounding",
            max_steps=s.steps(s.grounding_steps), **{**instruct, "batch_size": s.grounding_batch_size})

    return _finish(out, exports, figures, s, decoders, encoders, t0, log)


SKILL_USE_MAX_TOKENS = 1024
"""The skills stage's longest sequence: a skill-use dialogue is 810-910 smol tokens, its system text (the skill
listing the served model reads) 657 of them; the default 512 would skip every one."""


def _skills(out: Path, work: Path, s: BuildSettings, instruct_from, decoders: dict, encoders: dict, device,
            progress: bool, t0: float, log) -> dict:
    """The ``toy-skills`` instruct stage (``build(skills=True)``): continued from ``instruct_from`` (its LoRA,
    projectors and token rows keep training, ``continue_lora``) for ``settings.skill_use_steps`` on
    ``work/skilluse/skilluse.json`` (``skill_use_dialogues`` LLaVA-Plus dialogues, format ``mosit``) and
    ``work/requests-skills.json`` (``skill_use_requests`` ordinary requests per modality, with lead-ins, format
    ``t2x``) -> ``OUT/export-skills`` (:data:`polymodal.presets.toy.SKILLS_EXPORT`) and the build manifest.
    The rebuild and bench commands: the README's toy-skills paragraph."""
    from polymodal.presets.toy import SKILLS_EXPORT, toy_skills_preset
    from training.toyworld.align import write_requests
    from training.toyworld.mosit import write_skill_use_dialogues

    log("skill-use dialogues (LLaVA-Plus, toy scenes, the toy skills' results)")
    folder = work / "skilluse"
    root = Path(__file__).resolve().parents[2]  # the dialogues' writer and the serving code that renders them
    writers = ("training/toyworld/mosit.py", "training/toyworld/skilluse.py", "polymodal/constrained/tools.py",
               "services/ingress/skill_loop.py", "skills/toy.py")
    key = _key({"n": s.skill_use_dialogues, "seed": s.seed, "writer": [_file_key(str(root / w)) for w in writers]})
    if not _done(folder, key):
        if folder.exists():
            shutil.rmtree(folder)
        write_skill_use_dialogues(folder, s.skill_use_dialogues, seed=s.seed)
        _stamp(folder, key)
    requests = write_requests(work / "requests-skills.json", list(TOY_MODALITIES), s.skill_use_requests,
                              seed=s.seed + 2, lead_ins=True)
    preset = toy_skills_preset(out, aligned=False)
    if device not in (None, "cpu"):
        preset = preset.model_copy(update={"llm": preset.llm.model_copy(update={"dtype": "float32"}), "decoders": {
            m: d.model_copy(update={"dtype": "float32"}) for m, d in preset.decoders.items()}})
    preset_yaml = work / "preset-skills.yaml"
    preset_yaml.write_text(preset.to_yaml())
    parts_key = {"preset": preset.to_yaml().replace(str(out), "OUT"),
                 "encoders": {m: e["config_hash"] for m, e in encoders["encoders"].items()},
                 "decoders": {m: e["config_hash"] for m, e in decoders["decoders"].items()}}
    start = Path(instruct_from).resolve()
    log(f"alignment: toy-skills instruction tuning continued from {start}")
    export, fig = _stage(
        "instruct", work, preset_yaml,
        [{"path": str(folder / "skilluse.json"), "format": "mosit"}, {"path": str(requests), "format": "t2x"}],
        start, parts_key, progress, folder="instruct-skills", max_steps=s.steps(s.skill_use_steps),
        continue_lora=True, batch_size=s.batch_size, lora_r=s.lora_r, lora_alpha=float(2 * s.lora_r),
        lora_targets=list(s.lora_targets), mse_weight=s.instruct_mse_weight, signal_ce=s.instruct_signal_ce,
        seed=s.seed, lr=s.continue_lr, device=device, warmup_steps=s.steps(s.continue_warmup_steps),
        max_tokens=SKILL_USE_MAX_TOKENS)
    return _finish(out, {SKILLS_EXPORT: export}, {"instruct_skills": fig}, s, decoders, encoders, t0, log,
                   continued_from=_continued_from(start))


def _continued_from(export: Path) -> dict:
    """Where a continued instruct stage started: the export, its steps, and its build's settings and figures
    (``../toyworld-build.json`` when there is one)."""
    body = json.loads((export / "export.json").read_text())
    out = {"export": str(export), "stage": body.get("stage"), "steps": body.get("steps")}
    manifest = export.parent / BUILD_MANIFEST
    if manifest.is_file():
        prev = json.loads(manifest.read_text())
        out.update(settings=prev.get("settings"), figures=prev.get("figures"), build_s=prev.get("build_s"))
    return out


def _finish(out: Path, exports: dict, figures: dict, s: BuildSettings, decoders: dict, encoders: dict, t0: float,
            log, **extra) -> dict:
    """Copy the exports into ``out`` and write the build manifest -> the manifest as read back."""
    for name, export in exports.items():
        final = out / name
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(export, final, ignore=shutil.ignore_patterns(".build-key"))
    manifest = {
        "settings": dataclasses.asdict(s),
        "figures": {**figures,
                    "decoders": {m: e["figures"] for m, e in decoders["decoders"].items()},
                    "encoders": {m: e["figures"] for m, e in encoders["encoders"].items()}},
        "sizes_mb": {p: _size_mb(out / p) for p in ("decoders", "encoders", *exports)},
        "build_s": round(time.time() - t0, 1), **extra,
    }
    manifest["sizes_mb"]["total"] = round(sum(manifest["sizes_mb"].values()), 3)
    text = json.dumps(manifest, indent=2, sort_keys=True)
    tmp = out / (BUILD_MANIFEST + ".tmp")
    tmp.write_text(text)
    tmp.replace(out / BUILD_MANIFEST)
    log(f"done in {manifest['build_s']} s; sizes (MB): {manifest['sizes_mb']}")
    return json.loads(text)  # as read back from the file (tuples are lists)


# ------------------------------------------------------------------ a preset that adds output modalities to toy's


def extend(out: str | Path, preset, added: Sequence[Modality], settings: BuildSettings | None = None, *,
           toy_root: str | Path, manifest: str, progress: bool = True, work: str | Path | None = None,
           device: str | None = None, threads: int = 1) -> dict:
    """Align a preset that is ``toy`` plus output modalities ``added`` (their decoders trained; the 3D one) by
    continuing the finished toy build ``toy_root``'s export -> ``OUT/export`` and ``OUT/manifest``; returns the
    manifest. ``preset``: the unaligned preset (its new decoders' manifest in ``OUT/decoders``).

    Two stages of :mod:`training.align`, cached like :func:`build`'s (``settings`` gives counts and steps):

    1. decode: the added modalities' output projectors alone (``modalities=added``; toy's export loaded, its LoRA
       merged as served), on ``decode_requests`` training-bank requests each, ``decode_steps`` (cached LLM states);
    2. instruct, continued from toy's export plus those projectors (toy's LoRA kept training, ``continue_lora``; the
       new signal rows and every projector trained) on toy's MosIT dialogues and ``instruct_requests`` requests
       with lead-ins of every modality, ``instruct_steps`` at ``continue_lr``.

    ``threads``: as :func:`build`'s.

    Raises:
        FileNotFoundError: no toy export in ``toy_root``, no decoder manifest.
        ValueError: ``device`` is neither ``cpu`` nor an available ``cuda`` device.
    """
    import torch

    from polymodal.presets.toy import MANIFEST
    from training.toyworld.align import write_requests

    s = settings or BuildSettings()
    if device not in (None, "cpu") and not (device.startswith("cuda") and torch.cuda.is_available()):
        raise ValueError(f"device {device!r}: expected cpu, or cuda on a machine where CUDA is available")
    torch.set_num_threads(max(1, int(threads)))
    out, root = Path(out).resolve(), Path(toy_root).resolve()
    added = [Modality.parse(m) for m in added]
    toy_export = root / "export"
    if not (toy_export / "export.json").is_file():
        raise FileNotFoundError(f"{toy_export / 'export.json'} not found: a finished toy build's export is continued "
                                "(polymodal toyworld build)")
    if device not in (None, "cpu"):  # float32 wherever the stages train ("auto" would be float16 on a GPU)
        preset = preset.model_copy(update={"llm": preset.llm.model_copy(update={"dtype": "float32"}), "decoders": {
            m: d.model_copy(update={"dtype": "float32"}) for m, d in preset.decoders.items()}})
    work = Path(work).resolve() if work else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log = (lambda msg: print(f"[toyworld {preset.name}] {msg}", flush=True)) if progress else (lambda msg: None)

    preset_yaml = work / "preset-unaligned.yaml"
    preset_yaml.write_text(preset.to_yaml())
    hashes = {m: e["config_hash"] for d in (root / "decoders", out / "decoders")
              for m, e in json.loads((d / MANIFEST).read_text())["decoders"].items()}
    key = {"preset": preset.to_yaml().replace(str(out), "OUT").replace(str(root), "ROOT"), "decoders": hashes}
    common = dict(seed=s.seed, device=device)

    log(f"alignment 1/2: the output projectors of {', '.join(m.value for m in added)} (decode stage)")
    decode_data = write_requests(work / "requests-decode.json", added, s.decode_requests, seed=s.seed)
    dec_export, dec_fig = _stage(
        "decode", work, preset_yaml, [{"path": str(decode_data), "format": "t2x"}], toy_export, key, progress,
        max_steps=s.steps(s.decode_steps), batch_size=s.decode_batch_size, token_rows="none", ce_weight=0.0,
        modalities=added, lr=s.lr, **common)

    # the instruct stage's start: toy's export (LoRA, rows, projectors) plus the projectors just trained
    start = work / "start"
    if start.exists():
        shutil.rmtree(start)
    shutil.copytree(toy_export, start)
    body = json.loads((start / "export.json").read_text())
    for m in added:
        shutil.copy(dec_export / f"output_{m.value}.safetensors", start / f"output_{m.value}.safetensors")
    body["parts"] = sorted({*body.get("parts", []), *(f"output_{m.value}" for m in added)})
    body["modalities"] = sorted({*body.get("modalities", []), *(m.value for m in added)})
    (start / "export.json").write_text(json.dumps(body, indent=2))
    _stamp(start, _key({"decode": (dec_export / ".build-key").read_text(), "toy": sorted(body["parts"])}))

    log("MosIT dialogues from the toy catalog")
    canonical = _data(work / "data-canonical", count=s.canonical_count, seed=s.seed, modalities=list(TOY_MODALITIES),
                      size_px=32, layout="canonical", progress=progress).parent
    mosit = _mosit(work, canonical, s, progress)
    instruct_data = write_requests(work / "requests-instruct.json", [*TOY_MODALITIES, *added], s.instruct_requests,
                                   seed=s.seed + 1, lead_ins=True)
    log("alignment 2/2: instruction tuning continued from toy's export (LoRA)")
    ins_export, ins_fig = _stage(
        "instruct", work, preset_yaml, [{"path": str(mosit), "format": "mosit"},
                                        {"path": str(instruct_data), "format": "t2x"}], start, key, progress,
        max_steps=s.steps(s.instruct_steps), continue_lora=True, batch_size=s.batch_size, lora_r=s.lora_r,
        lora_alpha=float(2 * s.lora_r), lora_targets=list(s.lora_targets), mse_weight=s.instruct_mse_weight,
        signal_ce=s.instruct_signal_ce, lr=s.continue_lr, warmup_steps=s.steps(s.continue_warmup_steps), **common)

    final = out / "export"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(ins_export, final, ignore=shutil.ignore_patterns(".build-key"))
    result = {"settings": dataclasses.asdict(s), "toy_root": str(root), "preset": preset.name,
              "added": [m.value for m in added], "figures": {"decode": dec_fig, "instruct": ins_fig},
              "sizes_mb": {p: _size_mb(out / p) for p in ("decoders", "export")}, "build_s": round(time.time() - t0, 1)}
    text = json.dumps(result, indent=2, sort_keys=True)
    (out / manifest).write_text(text)
    log(f"done in {result['build_s']} s; sizes (MB): {result['sizes_mb']}")
    return json.loads(text)
