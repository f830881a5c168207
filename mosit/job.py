"""The build: plan -> write -> validate -> fill media -> drop near-duplicates -> write the dataset.

Work is cut into shards of ``shard_size`` dialogue indices. :func:`run_shard` is the unit: it writes
``work/shards/shard-NNNNN.jsonl`` atomically when done, so a killed build resumes from the shards it has
and a shard runs the same locally or inside a Ray Data actor (``--ray``). Every random choice and LLM
seed is a function of ``(seed, dialogue index)``, so the output does not depend on shard size, order,
workers or interruptions. :func:`finalize` then reads every shard in index order and writes the dataset
(``mosit/README.md`` documents the layout, the schema and the review loop).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polymodal.modality import Modality
from mosit.catalog import CatalogIndex, CatalogItem, CatalogReject, load_catalog
from mosit.config import MositConfig
from mosit.dialogue import GPT, HUMAN, Dialogue, Message, find_placeholders, parse_dialogue, tag_name
from mosit.fsio import (atomic_copy, atomic_write_bytes, atomic_write_json, atomic_write_jsonl, read_jsonl,
                        remove_stale_tmp)
from mosit.modes import Mode, get_mode
from mosit.schema import MEDIA_LISTS
from mosit.validate import validate_dialogue
from mosit.writer import WriterSettings, derive_seed, plan_dialogue, write_per_turn, write_whole

log = logging.getLogger(__name__)

WORK = "work"
RECORDS_FILE = "mosit.json"
REJECTS_FILE = "rejects.jsonl"
SUMMARY_FILE = "summary.json"
SCHEMA_FILE = "mosit.schema.json"
STATE_FILE = "state.json"


class BuildError(RuntimeError):
    """The build cannot start or continue (e.g. an output dir holding another build)."""


# ----------------------------------------------------------------------------------------------- inputs


def materialise_catalog(cfg: MositConfig, out_dir: Path) -> Path:
    """The catalog file to use: ``catalog.path``, or the recipe's catalog written under ``work/catalog``
    (once; a resumed build reuses it)."""
    if cfg.catalog.path:
        return Path(cfg.catalog.path)
    from mosit.example import build_catalog_from_recipe

    dest = out_dir / WORK / "catalog"
    target = dest / "catalog.jsonl"
    if not target.is_file():
        build_catalog_from_recipe(cfg.catalog.recipe, dest)
    return target


def load_drafts(path: str | None) -> list[dict]:
    """Hand-written dialogues: JSONL lines ``{"id"?, "mode", "topic"?, "text"}`` (``Human:/GPT:`` text) or
    ``{"id"?, "mode", "topic"?, "messages": [{"from", "value"}]}``.

    Raises:
        BuildError: unreadable file or a line without mode / text / messages.
    """
    if not path:
        return []
    try:
        rows = read_jsonl(path)
    except (OSError, json.JSONDecodeError) as e:
        raise BuildError(f"cannot read drafts {path}: {e}") from e
    for k, r in enumerate(rows):
        if not isinstance(r, dict) or "mode" not in r or not ("text" in r or "messages" in r):
            raise BuildError(f"drafts {path} line {k + 1}: needs 'mode' and 'text' or 'messages'")
    return rows


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- shards


@dataclass
class ShardContext:
    """Everything a shard needs; built once per process (or Ray actor)."""

    cfg: MositConfig
    out_dir: Path
    modes: dict[str, Mode]
    index: CatalogIndex
    embed: Callable[[list[str]], np.ndarray]
    llm: object
    generator: object
    drafts: list[dict]

    @property
    def total(self) -> int:
        return self.cfg.num_dialogues + len(self.drafts)

    @property
    def num_shards(self) -> int:
        return (self.total + self.cfg.shard_size - 1) // self.cfg.shard_size

    def shard_range(self, shard_id: int) -> range:
        s = self.cfg.shard_size
        return range(shard_id * s, min((shard_id + 1) * s, self.total))


def shard_path(out_dir: Path, shard_id: int) -> Path:
    return out_dir / WORK / "shards" / f"shard-{shard_id:05d}.jsonl"


def make_context(cfg: MositConfig, out_dir: Path, *, llm=None, generator=None, embedder=None,
                 catalog_items: list[CatalogItem] | None = None) -> ShardContext:
    """Build the components (those not passed in) from the config."""
    from mosit.media import build_generator

    if embedder is None:
        from mosit.embed import TextEmbedder

        embedder = TextEmbedder(cfg.retrieval.embedder_path)
    embed = embedder.encode if hasattr(embedder, "encode") else embedder
    if catalog_items is None:
        catalog_items, _ = load_catalog(materialise_catalog(cfg, out_dir))
    if llm is None:
        from mosit.llm import build_chat_llm

        llm = build_chat_llm(cfg.llm)
    return ShardContext(cfg=cfg, out_dir=out_dir, modes=cfg.resolved_modes(), index=CatalogIndex(catalog_items, embed),
                        embed=embed, llm=llm, generator=generator or build_generator(cfg.generator),
                        drafts=load_drafts(cfg.drafts))


def _draft_dialogue(ctx: ShardContext, index: int) -> tuple[Dialogue, Mode | None, str | None]:
    k = index - ctx.cfg.num_dialogues
    row = ctx.drafts[k]
    did = str(row.get("id") or f"draft-{k:06d}")
    name = str(row["mode"])
    mode = ctx.modes.get(name)
    problem = None
    if mode is None:
        try:
            mode = get_mode(name)
        except ValueError as e:
            problem = str(e)
    if "messages" in row:
        d = Dialogue(did, name, str(row.get("topic", "")),
                     tuple(Message(str(m.get("from", "")), str(m.get("value", ""))) for m in row["messages"]),
                     origin="draft")
    else:
        try:
            d = parse_dialogue(str(row["text"]), id=did, mode=name, topic=str(row.get("topic", "")), origin="draft")
        except ValueError as e:
            d, problem = Dialogue(did, name, str(row.get("topic", "")), (), origin="draft"), str(e)
    return d, mode, problem


def _fill(ctx: ShardContext, d: Dialogue, index: int) -> tuple[list[dict], list[str], list[float]]:
    """Media for every placeholder: the nearest catalog item at or above the threshold, else a generated
    one (pretrained decoders only), else a reason."""
    cfg = ctx.cfg
    slots = [(mi, k, p) for mi, m in enumerate(d.messages) for k, p in enumerate(m.placeholders)]
    if not slots:
        return [], [], []
    queries = ctx.embed([p.caption for _, _, p in slots])
    used: set[str] = set()
    media, reasons, scores = [], [], []
    for j, (mi, k, p) in enumerate(slots):
        match = ctx.index.search(p.modality, queries[j], exclude=set() if cfg.retrieval.reuse_within_dialogue else used)
        score = round(float(match.score), 6) if match.item else None
        if score is not None:
            scores.append(score)
        entry = {"message": mi, "slot": k, "from": d.messages[mi].speaker, "modality": p.modality.value,
                 "query": p.caption, "score": score}
        if match.item is not None and match.score >= cfg.retrieval.threshold:
            used.add(match.item.id)
            media.append({**entry, "source": "catalog", "catalog_id": match.item.id, "path": str(match.item.path),
                          "caption": match.item.caption, "data_source": match.item.source})
            continue
        why = (f"no catalog {p.modality.value} at or above {cfg.retrieval.threshold} (best {match.score:.3f}: "
               f"{match.item.id})" if match.item else f"the catalog has no usable {p.modality.value}")
        refusal = ctx.generator.refusal(p.modality)
        if refusal:
            reasons.append(f"message {mi}: {p.modality.value} '{p.caption}': {why}; {refusal}")
            continue
        from mosit.media import GenerationError

        try:
            data, ext = ctx.generator.generate(p.modality, p.caption, derive_seed("media", cfg.seed, index, mi, k))
        except GenerationError as e:
            reasons.append(f"message {mi}: {p.modality.value} '{p.caption}': {why}; generation failed: {e}")
            continue
        gen_path = ctx.out_dir / WORK / "generated" / f"{d.id}-m{mi}-{k}.{ext}"
        atomic_write_bytes(gen_path, data)
        media.append({**entry, "source": "generated", "catalog_id": None, "path": str(gen_path),
                      "caption": p.caption, "data_source": f"generated:{getattr(ctx.generator, 'name', 'generator')}"})
    return media, reasons, scores


def process_dialogue(ctx: ShardContext, index: int) -> dict:
    """One dialogue index -> its outcome (accepted with media, or rejected with the stage and reasons)."""
    cfg = ctx.cfg
    if index < cfg.num_dialogues:
        plan = plan_dialogue(index, seed=cfg.seed, modes=ctx.modes,
                             weights={n: mc.weight for n, mc in cfg.modes.items()}, topics=cfg.topics,
                             min_turns=cfg.min_turns, max_turns=cfg.max_turns)
        settings = WriterSettings(cfg.llm.max_new_tokens, cfg.llm.temperature, cfg.llm.top_p, cfg.seed,
                                  cfg.llm.short_max_new_tokens)
        if cfg.llm.strategy == "whole":
            d = write_whole(plan, ctx.llm, settings, cfg.modes[plan.mode.name].demonstrations)
        else:
            d = write_per_turn(plan, ctx.llm, settings)
        mode, problem = plan.mode, None
    else:
        d, mode, problem = _draft_dialogue(ctx, index)
    out = {"index": index, "id": d.id, "mode": d.mode, "topic": d.topic, "origin": d.origin,
           "turns": sum(m.speaker == HUMAN for m in d.messages), "dialogue": d.to_dict()}
    if problem:
        return {**out, "status": "rejected", "stage": "input", "rules": ["input"], "reasons": [problem]}
    bad = validate_dialogue(d, mode, cfg.rules())
    if bad:
        return {**out, "status": "rejected", "stage": "validate", "rules": sorted({v.rule for v in bad}),
                "reasons": [str(v) for v in bad]}
    media, reasons, scores = _fill(ctx, d, index)
    out["scores"] = scores
    if reasons:
        return {**out, "status": "rejected", "stage": "fill", "rules": ["no_media"], "reasons": reasons,
                "media": media}
    return {**out, "status": "accepted", "media": media}


def run_shard(ctx: ShardContext, shard_id: int, on_dialogue: Callable[[], None] | None = None) -> Path:
    """Process every dialogue of the shard (``llm.max_concurrency`` at once) and write its file atomically."""
    indices = list(ctx.shard_range(shard_id))
    workers = max(1, int(getattr(ctx.llm, "max_concurrency", 1)))

    def one(i: int) -> dict:
        r = process_dialogue(ctx, i)
        if on_dialogue:
            on_dialogue()
        return r

    if workers == 1:
        rows = [one(i) for i in indices]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            rows = list(pool.map(one, indices))
    return atomic_write_jsonl(shard_path(ctx.out_dir, shard_id), rows)


class ShardWorker:
    """Ray Data callable class: one context per actor, shards in, shard file names out."""

    def __init__(self, config_json: str, out_dir: str):
        from mosit.config import MositConfig as _C

        self.ctx = make_context(_C.model_validate_json(config_json), Path(out_dir))

    def __call__(self, batch: dict) -> dict:
        ids = [int(x) for x in batch["shard"]]
        done = [str(run_shard(self.ctx, s)) for s in ids]
        return {"shard": np.asarray(ids), "file": np.asarray(done), "dialogues":
                np.asarray([len(self.ctx.shard_range(s)) for s in ids])}


def _run_ray(cfg: MositConfig, out_dir: Path, pending: list[int], pbar) -> None:
    import ray

    started = False
    if not ray.is_initialized():
        pkg_root = str(Path(__file__).resolve().parent.parent)
        env = {"PYTHONPATH": os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH", "")) if p)}
        kwargs = {"runtime_env": {"env_vars": env}, "include_dashboard": False, "log_to_driver": False}
        if cfg.ray.address:
            ray.init(address=cfg.ray.address, **kwargs)
        else:
            if cfg.ray.temp_dir:
                kwargs["_temp_dir"] = cfg.ray.temp_dir
            ray.init(num_cpus=max(1, int(cfg.ray.num_workers * cfg.ray.num_cpus_per_worker + 0.999)), **kwargs)
        started = True
    try:
        ds = ray.data.from_items([{"shard": s} for s in pending])
        ds = ds.map_batches(ShardWorker, fn_constructor_kwargs={"config_json": cfg.model_dump_json(),
                                                                "out_dir": str(out_dir)},
                            batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(cfg.ray.num_workers, len(pending))),
                            num_cpus=cfg.ray.num_cpus_per_worker, num_gpus=cfg.ray.num_gpus_per_worker or None)
        for row in ds.iter_rows():
            if pbar is not None:
                pbar.update(int(row["dialogues"]))
    finally:
        if started:
            ray.shutdown()


# ----------------------------------------------------------------------------------------------- finalize


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def media_names(items: list[CatalogItem]) -> dict[str, str]:
    """Catalog id -> output file name (``<safe id><ext>``; a collision gets a short hash of the id)."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for it in items:
        stem = _SAFE.sub("_", it.id).strip("._") or "item"
        name = f"{stem}{it.path.suffix.lower()}"
        if name in taken:
            name = f"{stem}-{hashlib.sha1(it.id.encode()).hexdigest()[:8]}{it.path.suffix.lower()}"
        taken.add(name)
        names[it.id] = name
    return names


def _stats(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    return {"count": len(values), "min": round(min(values), 4), "mean": round(statistics.fmean(values), 4),
            "median": round(statistics.median(values), 4), "max": round(max(values), 4)}


def _histogram(values: list[float], lo: float = -0.2, hi: float = 1.0, step: float = 0.1) -> dict[str, int]:
    bins: Counter = Counter()
    n = int(round((hi - lo) / step))
    for v in values:
        b = min(max(int((v - lo) // step), 0), n - 1)
        bins[f"{lo + b * step:.1f}..{lo + (b + 1) * step:.1f}"] += 1
    return dict(sorted(bins.items(), key=lambda kv: float(kv[0].split("..")[0])))


def _record(o: dict, names: dict[str, str]) -> tuple[dict, list[tuple[dict, str, str]]]:
    """A MosIT record and its media copies (entry, source path, output name)."""
    msgs = [dict(m) for m in o["dialogue"]["messages"]]
    lists = {k: [] for k in MEDIA_LISTS.values()}
    copies = []
    by_msg = defaultdict(list)
    for e in o["media"]:
        by_msg[e["message"]].append(e)
    conversation = []
    for mi, m in enumerate(msgs):
        value, cursor, parts = m["value"], 0, []
        entries = sorted(by_msg.get(mi, []), key=lambda e: e["slot"])
        for p, e in zip(find_placeholders(value), entries):
            mod = Modality(e["modality"])
            name = names[e["catalog_id"]] if e["source"] == "catalog" else Path(e["path"]).name
            parts.append(value[cursor:p.start])
            parts.append(f"<{tag_name(mod)}>{name}</{tag_name(mod)}>")
            cursor = p.end
            item = {"name": name, "data_source": e["data_source"], "caption": e["caption"], "from": m["from"],
                    "turn": mi, "source": e["source"], "catalog_id": e["catalog_id"], "query": e["query"],
                    "score": e["score"]}
            if m["from"] == GPT:
                item["embedding"] = f"embeddings/{name}.npy"
            lists[MEDIA_LISTS[mod]].append(item)
            copies.append((item, e["path"], f"{mod.spec.answer_field}/{name}"))
        parts.append(value[cursor:])
        conversation.append({"from": m["from"], "value": "".join(parts)})
    rec = {"id": o["id"], "mode": o["mode"], "topic": o["topic"], "origin": o["origin"],
           "conversation": conversation, **lists}
    return rec, copies


def finalize(cfg: MositConfig, out_dir: Path, ctx_total: int, num_shards: int, *, catalog_items: list[CatalogItem],
             catalog_rejects: list[CatalogReject], embed, caption_encoder) -> dict:
    """Read every shard, drop near-duplicates, copy media, write embeddings, records, rejects, summary and
    the review export. Returns the summary."""
    outcomes: list[dict] = []
    for s in range(num_shards):
        outcomes.extend(read_jsonl(shard_path(out_dir, s)))
    outcomes.sort(key=lambda o: o["index"])
    if len(outcomes) != ctx_total or [o["index"] for o in outcomes] != list(range(ctx_total)):
        raise BuildError(f"shards hold {len(outcomes)} dialogues, expected {ctx_total}: rerun with --resume")

    # near-duplicates (greedy in index order; the later one goes)
    accepted = [o for o in outcomes if o["status"] == "accepted"]
    if accepted:
        vecs = embed([Dialogue.from_dict(o["dialogue"]).text() for o in accepted])
        kept_vecs, kept_ids = [], []
        for o, v in zip(accepted, vecs):
            if kept_vecs:
                sims = np.stack(kept_vecs) @ v
                j = int(np.argmax(sims))
                if sims[j] >= cfg.dedup_threshold:
                    o.update(status="rejected", stage="dedup", rules=["near_duplicate"],
                             reasons=[f"near-duplicate of {kept_ids[j]} (cosine {float(sims[j]):.3f} >= "
                                      f"{cfg.dedup_threshold})"])
                    continue
            kept_vecs.append(v)
            kept_ids.append(o["id"])

    names = media_names(catalog_items)
    records, copies = [], {}
    for o in outcomes:
        if o["status"] != "accepted":
            continue
        rec, cps = _record(o, names)
        records.append(rec)
        for item, src, rel in cps:
            copies[rel] = (src, item)
    for rel, (src, _item) in sorted(copies.items()):
        atomic_copy(src, out_dir / rel)

    # caption embeddings of output media (decoding-side alignment targets)
    emb_info: dict = {"encoder": None, "files": 0}
    if caption_encoder is not None:
        emb_info["encoder"] = caption_encoder.describe()
        todo: dict[Modality, dict[str, str]] = defaultdict(dict)
        for rec in records:
            for mod, key in MEDIA_LISTS.items():
                for item in rec[key]:
                    if "embedding" in item:
                        todo[mod][item["name"]] = item["caption"]
        for mod, by_name in todo.items():
            ordered = sorted(by_name.items())
            for i in range(0, len(ordered), 32):
                chunk = ordered[i:i + 32]
                arr = caption_encoder.encode(mod, [c for _, c in chunk])
                for (name, _), a in zip(chunk, arr):
                    buf = io.BytesIO()
                    np.save(buf, np.asarray(a, dtype=np.float32))
                    atomic_write_bytes(out_dir / "embeddings" / f"{name}.npy", buf.getvalue())
                    emb_info["files"] += 1
    else:
        for rec in records:
            for key in MEDIA_LISTS.values():
                for item in rec[key]:
                    item.pop("embedding", None)

    # reject report
    rejects = [{"kind": "catalog", "id": r.id, "line": r.line, "stage": "catalog", "rules": ["catalog_item"],
                "reasons": [r.reason]} for r in catalog_rejects]
    for o in outcomes:
        if o["status"] == "rejected":
            rejects.append({"kind": "dialogue", "id": o["id"], "index": o["index"], "mode": o["mode"],
                            "topic": o["topic"], "origin": o["origin"], "stage": o["stage"], "rules": o["rules"],
                            "reasons": o["reasons"], "dialogue": o["dialogue"]})

    summary = _summary(cfg, outcomes, records, catalog_items, catalog_rejects, emb_info)
    from mosit.review import export_review
    from mosit.schema import MositRecord

    atomic_write_jsonl(out_dir / REJECTS_FILE, rejects)
    atomic_write_json(out_dir / SUMMARY_FILE, summary)
    atomic_write_json(out_dir / SCHEMA_FILE, MositRecord.model_json_schema())
    atomic_write_json(out_dir / RECORDS_FILE, records)
    export_review(out_dir)
    return summary


def _summary(cfg, outcomes, records, catalog_items, catalog_rejects, emb_info) -> dict:
    per_mode: dict[str, dict] = {}
    for o in outcomes:
        pm = per_mode.setdefault(o["mode"], {"dialogues": 0, "accepted": 0, "rejected": Counter()})
        pm["dialogues"] += 1
        if o["status"] == "accepted":
            pm["accepted"] += 1
        else:
            pm["rejected"][o["stage"]] += 1
    for pm in per_mode.values():
        pm["rejected"] = dict(sorted(pm["rejected"].items()))
        pm["yield"] = round(pm["accepted"] / pm["dialogues"], 4) if pm["dialogues"] else 0.0
    rules = Counter(r for o in outcomes if o["status"] == "rejected" for r in o["rules"])
    all_scores = [s for o in outcomes for s in o.get("scores", [])]
    used = [e["score"] for o in outcomes if o["status"] == "accepted" for e in o["media"] if e["source"] == "catalog"]
    media = {m.value: Counter() for m in Modality}
    for o in outcomes:
        if o["status"] == "accepted":
            for e in o["media"]:
                media[e["modality"]][f"{e['from']}_{e['source']}"] += 1
    turns = Counter(o["turns"] for o in outcomes if o["status"] == "accepted")
    total = len(outcomes)
    return {
        "name": cfg.name,
        "seed": cfg.seed,
        "config_fingerprint": cfg.fingerprint(),
        "llm": {"kind": cfg.llm.kind, "preset": cfg.llm.preset if cfg.llm.kind == "preset" else None,
                "model": cfg.llm.model, "strategy": cfg.llm.strategy, "temperature": cfg.llm.temperature,
                "top_p": cfg.llm.top_p},
        "dialogues": {"total": total, "generated": cfg.num_dialogues, "drafts": total - cfg.num_dialogues,
                      "accepted": len(records), "rejected": total - len(records),
                      "yield": round(len(records) / total, 4) if total else 0.0},
        "per_mode": dict(sorted(per_mode.items())),
        "reject_rules": dict(sorted(rules.items())),
        "turns": {"histogram": {str(k): v for k, v in sorted(turns.items())},
                  "mean": round(statistics.fmean([o["turns"] for o in outcomes if o["status"] == "accepted"]), 3)
                  if records else None},
        "retrieval": {"threshold": cfg.retrieval.threshold, "all_queries": _stats(all_scores),
                      "matched": _stats(used), "histogram": _histogram(all_scores)},
        "media": {k: dict(sorted(v.items())) for k, v in media.items()},
        "catalog": {"items": dict(sorted(Counter(i.modality.value for i in catalog_items).items())),
                    "rejected": len(catalog_rejects)},
        "caption_embeddings": emb_info,
    }


# ----------------------------------------------------------------------------------------------- driver


def _precheck_out_dir(out_dir: Path, resume: bool) -> None:
    """Refuse, before writing anything, a folder holding another build (without --resume) or other files."""
    if (out_dir / WORK / STATE_FILE).is_file():
        if not resume:
            raise BuildError(f"{out_dir} already holds a MosIT build; pass --resume to continue it or choose "
                             "another --out")
    elif out_dir.exists() and any(p.name != WORK for p in out_dir.iterdir()):
        raise BuildError(f"{out_dir} is not empty and holds no MosIT build; choose an empty or new --out")


def _check_state(cfg: MositConfig, out_dir: Path, catalog_sha: str) -> None:
    state_path = out_dir / WORK / STATE_FILE
    fp = {"config": cfg.fingerprint(), "catalog_sha256": catalog_sha}
    if state_path.is_file() and json.loads(state_path.read_text()).get("fingerprint") != fp:
        raise BuildError(f"cannot resume {out_dir}: the config or catalog changed since that build started "
                         "(use a new --out)")
    atomic_write_json(state_path, {"fingerprint": fp})


def build(cfg: MositConfig, out_dir: str | Path, *, use_ray: bool = False, resume: bool = False,
          progress: bool = True, llm=None, generator=None, embedder=None, caption_encoder="config") -> dict:
    """Run the whole job into ``out_dir``; returns the summary.

    ``llm`` / ``generator`` / ``embedder`` / ``caption_encoder``: components to use instead of the
    config's (tests; local runs only). ``caption_encoder=None`` writes no ``.npy``.

    Raises:
        BuildError: an output dir holding another build or a changed config on resume; unreadable drafts.
        mosit.llm.LLMRequestError: the dialogue endpoint failed for good (the build resumes later).
    """
    out_dir = Path(out_dir).resolve()
    _precheck_out_dir(out_dir, resume)
    (out_dir / WORK).mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(out_dir)
    catalog_path = materialise_catalog(cfg, out_dir)
    _check_state(cfg, out_dir, _sha256_file(catalog_path))
    items, rejects = load_catalog(catalog_path)
    for r in rejects:
        log.warning("catalog %s line %d rejected: %s", r.id or "?", r.line, r.reason)
    if embedder is None:
        from mosit.embed import TextEmbedder

        embedder = TextEmbedder(cfg.retrieval.embedder_path)
    embed = embedder.encode if hasattr(embedder, "encode") else embedder
    drafts = load_drafts(cfg.drafts)
    total = cfg.num_dialogues + len(drafts)
    num_shards = (total + cfg.shard_size - 1) // cfg.shard_size
    pending = [s for s in range(num_shards) if not shard_path(out_dir, s).is_file()]
    done = total - sum(len(range(s * cfg.shard_size, min((s + 1) * cfg.shard_size, total))) for s in pending)
    pbar = None
    if progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=total, initial=done, desc=f"mosit {cfg.name}", unit="dialogue")
    try:
        if pending and use_ray:
            _run_ray(cfg, out_dir, pending, pbar)
        elif pending:
            ctx = make_context(cfg, out_dir, llm=llm, generator=generator, embedder=embed, catalog_items=items)
            for s in pending:
                run_shard(ctx, s, on_dialogue=(pbar.update if pbar is not None else None))
    finally:
        if pbar is not None:
            pbar.close()
    if caption_encoder == "config":
        from mosit.media import build_caption_encoder

        caption_encoder = build_caption_encoder(cfg.caption_encoder)
    return finalize(cfg, out_dir, total, num_shards, catalog_items=items, catalog_rejects=rejects, embed=embed,
                    caption_encoder=caption_encoder)
