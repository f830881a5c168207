"""The MosIT build end to end with the scripted (no-model) LLM and a real catalog (scikit-image photos,
espeak-ng speech when installed, PyAV videos); real all-MiniLM-L6-v2 retrieval; a fake caption encoder."""

from __future__ import annotations

import csv
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from mosit.config import parse_config
from mosit.job import BuildError, build
from mosit.modes import MODES
from mosit.schema import MositRecord, missing_files
from mosit.validate import Rules, validate_dialogue

ROOT = Path(__file__).resolve().parent.parent
NOTHING_CAPTION = "a spreadsheet of quarterly tax accounting figures"


class FakeCaptionEncoder:
    """(B, Q=2, D=4) from a hash of each caption (stands in for a decoder's text encoder)."""

    calls = 0

    def encode(self, modality, captions):
        FakeCaptionEncoder.calls += 1
        out = []
        for c in captions:
            rng = np.random.default_rng(abs(hash((modality.value, c))) % 2**32)
            out.append(rng.standard_normal((2, 4)).astype(np.float32))
        return np.stack(out)

    def describe(self):
        return {"kind": "fake"}


class CountingLLM:
    def __init__(self):
        from mosit.llm import ScriptedLLM

        self.inner, self.calls, self.max_concurrency = ScriptedLLM(), 0, 1

    def chat(self, messages, **kw):
        self.calls += 1
        return self.inner.chat(messages, **kw)


@pytest.fixture(scope="module")
def embedder():
    from mosit.embed import TextEmbedder

    return TextEmbedder()


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    """The example recipe's catalog plus injected bad items."""
    from mosit.example import build_catalog_from_recipe

    d = tmp_path_factory.mktemp("catalog")
    path = build_catalog_from_recipe(ROOT / "examples" / "mosit" / "catalog_recipe.yaml", d)
    (d / "images" / "broken.png").write_text("not a png")
    with open(path, "a") as f:
        f.write(json.dumps({"id": "ghost", "modality": "image", "path": "images/ghost.png", "caption": "a ghost"}) + "\n")
        f.write(json.dumps({"id": "broken", "modality": "image", "path": "images/broken.png", "caption": "x"}) + "\n")
        f.write(json.dumps({"id": "cat", "modality": "image", "path": "images/cat.png", "caption": "dup"}) + "\n")
        f.write(json.dumps({"id": "odd", "modality": "smell", "caption": "roses"}) + "\n")
    return path


DRAFTS = [
    {"id": "draft-good", "mode": "T_I", "topic": "cats",
     "text": "Human: Can you show me a ginger cat?\nGPT: Here is one. <Image> a ginger cat looking sideways </Image>\n"
             "Human: Cute! Do cats like dinner?\nGPT: Very much."},
    {"id": "draft-nomatch", "mode": "T_I", "topic": "taxes",
     "text": f"Human: Show me my taxes.\nGPT: Here. <Image> {NOTHING_CAPTION} </Image>\nHuman: Thanks.\nGPT: Welcome."},
    {"id": "draft-badorder", "mode": "T_I", "topic": "cats",
     "text": "GPT: Hi.\nHuman: Show me a cat.\nGPT: Here. <Image> a ginger cat </Image>"},
    {"id": "draft-dup", "mode": "T_I", "topic": "cats",
     "text": "Human: Can you show me a ginger cat?\nGPT: Here is one. <Image> a ginger cat looking sideways </Image>\n"
             "Human: Cute! Do cats like dinner?\nGPT: Very much."},
]


def make_cfg(tmp_path, catalog, **over):
    drafts = tmp_path / "drafts.jsonl"
    drafts.write_text("".join(json.dumps(d) + "\n" for d in DRAFTS))
    data = {
        "name": "t", "seed": 3, "num_dialogues": 10, "shard_size": 3, "min_turns": 2, "max_turns": 3,
        "topics": ["a ginger cat", "a rocket on the launch pad", "a cup of espresso", "the surface of the moon",
                   "a horse race"],
        "modes": {n: {} for n in ("T_I", "T_A", "T_V", "T_A_I", "I_T", "A_I")},
        "catalog": {"path": str(catalog)}, "drafts": str(drafts), "llm": {"kind": "scripted"},
        "retrieval": {"threshold": 0.3}, "caption_encoder": {"kind": "none"},
    }
    data.update(over)
    return parse_config(data, tmp_path)


@pytest.fixture(scope="module")
def built(tmp_path_factory, catalog, embedder):
    tmp = tmp_path_factory.mktemp("build")
    cfg = make_cfg(tmp, catalog)
    out = tmp / "out"
    summary = build(cfg, out, progress=False, embedder=embedder, caption_encoder=FakeCaptionEncoder())
    return cfg, out, summary


def test_records_valid_and_files_present(built):
    cfg, out, summary = built
    records = json.loads((out / "mosit.json").read_text())
    assert records and len(records) == summary["dialogues"]["accepted"]
    rules = Rules(cfg.min_turns, cfg.max_turns, cfg.word_limit)
    for rec in records:
        r = MositRecord.model_validate(rec)
        assert missing_files(r, out) == []
        # the written conversation (media now named by file) still satisfies its mode
        from mosit.dialogue import Dialogue, Message

        d = Dialogue(r.id, r.mode, r.topic, tuple(Message(m.from_, m.value) for m in r.conversation))
        assert validate_dialogue(d, MODES[r.mode], rules) == [], r.id
        for e in r.image_list + r.audio_list + r.video_list:
            assert e.source == "catalog" and e.score >= cfg.retrieval.threshold
            if e.from_ == "gpt":
                arr = np.load(out / e.embedding)
                assert arr.shape == (2, 4) and arr.dtype == np.float32
            else:
                assert e.embedding is None
    schema = json.loads((out / "mosit.schema.json").read_text())
    assert "conversation" in schema["properties"]


def test_reject_report_has_injected_items(built):
    _, out, summary = built
    rejects = [json.loads(l) for l in (out / "rejects.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r for r in rejects}
    assert "missing file" in by_id["ghost"]["reasons"][0] and "ghost.png" in by_id["ghost"]["reasons"][0]
    assert "unreadable image" in by_id["broken"]["reasons"][0]
    assert any(r["id"] == "cat" and "duplicate id" in r["reasons"][0] for r in rejects)
    assert "unknown modality" in by_id["odd"]["reasons"][0]
    nm = by_id["draft-nomatch"]
    assert nm["stage"] == "fill" and "no catalog image at or above 0.3" in nm["reasons"][0]
    assert "no generator configured" in nm["reasons"][0]
    assert by_id["draft-badorder"]["stage"] == "validate"
    assert {"starts_with_human", "turn_count"} <= set(by_id["draft-badorder"]["rules"])
    assert by_id["draft-dup"]["stage"] == "dedup" and "draft-good" in by_id["draft-dup"]["reasons"][0]
    records = {r["id"] for r in json.loads((out / "mosit.json").read_text())}
    assert "draft-good" in records
    assert summary["catalog"]["rejected"] == 4
    # summary adds up
    d = summary["dialogues"]
    assert d["total"] == 10 + len(DRAFTS) == d["accepted"] + d["rejected"]
    assert sum(m["dialogues"] for m in summary["per_mode"].values()) == d["total"]
    assert sum(m["accepted"] for m in summary["per_mode"].values()) == d["accepted"]
    assert d["rejected"] == sum(1 for r in rejects if r["kind"] == "dialogue")
    assert summary["retrieval"]["matched"]["min"] >= 0.3
    assert sum(summary["retrieval"]["histogram"].values()) == summary["retrieval"]["all_queries"]["count"]


def test_deterministic_across_shard_sizes_and_seed_matters(built, tmp_path, catalog, embedder):
    cfg, out, _ = built
    cfg1 = make_cfg(tmp_path, catalog, shard_size=1)
    build(cfg1, tmp_path / "o1", progress=False, embedder=embedder, caption_encoder=FakeCaptionEncoder())
    for name in ("mosit.json", "rejects.jsonl"):
        assert (tmp_path / "o1" / name).read_bytes() == (out / name).read_bytes(), name
    cfg2 = make_cfg(tmp_path, catalog, seed=4)
    build(cfg2, tmp_path / "o2", progress=False, embedder=embedder, caption_encoder=None)
    assert (tmp_path / "o2" / "rejects.jsonl").read_bytes() != (out / "rejects.jsonl").read_bytes()
    assert not (tmp_path / "o2" / "embeddings").exists()


def test_resume_rules(built, tmp_path, catalog, embedder):
    cfg, out, _ = built
    with pytest.raises(BuildError, match="--resume"):
        build(cfg, out, progress=False, embedder=embedder)
    changed = make_cfg(tmp_path, catalog, word_limit=250)
    with pytest.raises(BuildError, match="changed"):
        build(changed, out, progress=False, embedder=embedder, resume=True)
    before = (out / "mosit.json").read_bytes()
    llm = CountingLLM()
    build(cfg, out, progress=False, embedder=embedder, resume=True, llm=llm, caption_encoder=FakeCaptionEncoder())
    assert llm.calls == 0 and (out / "mosit.json").read_bytes() == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(BuildError, match="not empty"):
        build(cfg, tmp_path / "other", progress=False, embedder=embedder)


def test_review_export_and_import(built, tmp_path):
    from typer.testing import CliRunner

    from mosit.cli import app
    from mosit.review import ReviewError, import_review

    _, out, _ = built
    records = json.loads((out / "mosit.json").read_text())
    page = (out / "review" / "review.html").read_text()
    rows = list(csv.DictReader(open(out / "review" / "review.csv")))
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    for rec, row in zip(records, rows):
        assert f"id='{rec['id']}'" in page
        for link in row["media"].split():
            assert (out / "review" / link).resolve().is_file()
            assert f"src='{link}'" in page
    rows[0]["decision"], rows[0]["note"] = "reject", "caption does not fit"
    rows[1]["decision"] = "Accept"
    dec = tmp_path / "decisions.csv"
    with open(dec, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    r = CliRunner().invoke(app, ["import-review", "--out", str(out), "--decisions", str(dec)])
    assert r.exit_code == 0, r.output
    counts = json.loads(r.output)
    assert counts == {"accepted": 1, "rejected": 1, "undecided": len(records) - 2, "kept": len(records) - 1}
    kept = json.loads((out / "mosit.reviewed.json").read_text())
    assert rows[0]["id"] not in {k["id"] for k in kept}
    rej = [json.loads(l) for l in (out / "review" / "rejected_by_reviewer.jsonl").read_text().splitlines()]
    assert rej[0]["id"] == rows[0]["id"] and rej[0]["reasons"] == ["caption does not fit"]
    assert import_review(out, dec, drop_undecided=True)["kept"] == 1
    rows[2]["decision"] = "maybe"
    with open(dec, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(ReviewError, match="maybe"):
        import_review(out, dec)
    r = CliRunner().invoke(app, ["import-review", "--out", str(out), "--decisions", str(dec)])
    assert r.exit_code == 2 and "maybe" in r.output


def test_plans_follow_modes_and_scripted_dialogues_validate():
    from mosit.llm import ScriptedLLM
    from mosit.writer import WriterSettings, plan_dialogue, write_per_turn

    modes = dict(MODES)
    seen, valid = set(), 0
    for i in range(60):
        p = plan_dialogue(i, seed=1, modes=modes, weights={n: 1.0 for n in modes}, topics=["cats", "rockets"],
                          min_turns=1, max_turns=4)
        assert p == plan_dialogue(i, seed=1, modes=modes, weights={n: 1.0 for n in modes}, topics=["cats", "rockets"],
                                  min_turns=1, max_turns=4)
        assert tuple(m for t in p.human_media for m in t) == p.mode.inputs
        assert tuple(m for t in p.gpt_media for m in t) == p.mode.outputs
        d = write_per_turn(p, ScriptedLLM(), WriterSettings(seed=1))
        assert len(d.messages) == 2 * p.num_turns
        # the skeleton always satisfies the mode; the scripted echo writer may repeat itself
        bad = {v.rule for v in validate_dialogue(d, p.mode, Rules(1, 4, 1000))}
        assert bad <= {"repeated_message"}, (p, d, bad)
        valid += not bad
        seen.add(p.mode.name)
    assert len(seen) >= 8 and valid >= 40


AUDIOCAPS = ROOT.parent / "shared" / "data" / "audiocaps_val.csv"


@pytest.mark.skipif(not AUDIOCAPS.is_file(), reason="AudioCaps captions (../shared/data) not available")
def test_csv_catalog_with_audiocaps_captions(tmp_path, embedder):
    import soundfile as sf

    from mosit.catalog import CatalogIndex, load_catalog

    with open(AUDIOCAPS, newline="") as f:
        rows = list(csv.DictReader(f))[:150]
    (tmp_path / "audios").mkdir()
    sf.write(tmp_path / "audios" / "tone.wav", np.sin(np.linspace(0, 440 * 6.28, 8000)).astype(np.float32), 16000)
    with open(tmp_path / "catalog.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "modality", "path", "caption"])
        for r in rows:
            w.writerow([f"ac{r['audiocap_id']}", "audio", "audios/tone.wav", r["caption"]])
        w.writerow(["ac-missing", "audio", "audios/none.wav", "a dog barks"])
    items, rejects = load_catalog(tmp_path / "catalog.csv")
    assert len(items) == len({r["audiocap_id"] for r in rows}) and [r.id for r in rejects][-1] == "ac-missing"
    index = CatalogIndex(items, embedder.encode)
    for it in items[::37]:
        m = index.search(it.modality, embedder.encode([it.caption])[0])
        assert m.item.caption == it.caption and m.score > 0.99
    assert index.search(items[0].modality, embedder.encode([items[0].caption])[0], exclude={items[0].id}).score < 1


def test_whole_strategy_prompts_with_demonstrations_and_parses():
    from mosit.writer import WriterSettings, plan_dialogue, write_whole

    demo = "Human: Show me a rocket.\nGPT: Here. <Image> a rocket </Image>"
    answer = ("Sure, here is one:\nHuman: I love cats. What do they do all day?\nGPT: They nap a lot. "
              "<Image> a ginger cat asleep </Image>\nHuman: Cute.\nGPT: Indeed.")
    seen = []

    class LLM:
        def chat(self, messages, **kw):
            seen.append((messages, kw))
            return answer

    modes = {"T_I": MODES["T_I"]}
    p = plan_dialogue(0, seed=0, modes=modes, weights={"T_I": 1}, topics=["cats"], min_turns=2, max_turns=2)
    d = write_whole(p, LLM(), WriterSettings(max_new_tokens=300, seed=0), [demo])
    prompt = seen[0][0][-1]["content"]
    assert demo in prompt and "about cats" in prompt and "exactly 2 exchanges" in prompt
    assert "one image" in prompt and seen[0][1]["max_new_tokens"] == 300
    assert validate_dialogue(d, MODES["T_I"], Rules(2, 2, 300)) == []
    answer = "I cannot write that."
    assert write_whole(p, LLM(), WriterSettings(), [demo]).messages == ()


# ------------------------------------------------------------------ OpenAI-compatible endpoint client


class _Server:
    def __init__(self, script):
        self.script, self.requests, self.inflight, self.max_inflight = list(script), [], 0, 0
        lock = threading.Lock()
        srv = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    srv.requests.append((self.path, body))
                    srv.inflight += 1
                    srv.max_inflight = max(srv.max_inflight, srv.inflight)
                    status = srv.script.pop(0) if srv.script else 200
                import time

                time.sleep(0.05)
                payload = (json.dumps({"choices": [{"message": {"role": "assistant",
                                                                "content": f" echo {body['messages'][-1]['content']} "}}]})
                           if status == 200 else json.dumps({"error": {"message": "busy"}}))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload.encode())
                with lock:
                    srv.inflight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_openai_backend_retries_with_backoff_and_limits_concurrency():
    from concurrent.futures import ThreadPoolExecutor

    from mosit.llm import LLMRequestError, OpenAIChatLLM

    srv = _Server([503, 429, 200])
    sleeps = []
    try:
        llm = OpenAIChatLLM(srv.url, "m", max_concurrency=2, max_retries=3, backoff_s=0.5, sleep=sleeps.append)
        out = llm.chat([{"role": "user", "content": "hi"}], max_new_tokens=7, temperature=0.2, top_p=0.8, seed=11)
        assert out == "echo hi"
        assert sleeps == [0.5, 1.0] and len(srv.requests) == 3
        path, body = srv.requests[-1]
        assert path == "/v1/chat/completions"
        assert body["max_tokens"] == 7 and body["seed"] == 11 and body["model"] == "m" and body["top_p"] == 0.8
        with ThreadPoolExecutor(6) as pool:
            outs = list(pool.map(lambda i: llm.chat([{"role": "user", "content": str(i)}]), range(6)))
        assert outs == [f"echo {i}" for i in range(6)] and srv.max_inflight <= 2
        srv.script = [400]
        with pytest.raises(LLMRequestError, match="HTTP 400"):
            llm.chat([{"role": "user", "content": "x"}])
        srv.script = [500] * 10
        with pytest.raises(LLMRequestError, match="gave up after 4 attempts"):
            llm.chat([{"role": "user", "content": "x"}])
    finally:
        srv.close()


# ------------------------------------------------------------------ media generation gate


def test_caption_embeddings_come_from_the_decoders_text_encoder():
    from mosit.media import DecoderCaptionEncoder
    from polymodal.modality import Modality
    from polymodal.pipeline import build_decoder_stage

    enc = DecoderCaptionEncoder("tiny")
    for m in (Modality.IMAGE, Modality.AUDIO):
        arr = enc.encode(m, ["a red kite", "waves on a beach"])
        stage = build_decoder_stage("tiny", m)
        assert arr.dtype == np.float32 and arr.shape == (2, *stage.decoder.cond_shape)
        want = stage.decoder.encode_text(["a red kite", "waves on a beach"]).float().numpy().reshape(arr.shape)
        np.testing.assert_allclose(arr, want, rtol=1e-5, atol=1e-6)
        assert not np.allclose(arr[0], arr[1])
    assert enc.describe()["decoders"]["image"]["init_state"] == "random"


def test_generator_refuses_random_decoders_and_uses_pretrained(tmp_path):
    from decoders import save_tiny_checkpoint
    from mosit.media import DecoderMediaGenerator
    from polymodal.config import DecoderConfig
    from polymodal.modality import Modality
    from polymodal.presets import get_preset

    gen = DecoderMediaGenerator("tiny")
    assert "random weights" in gen.refusal(Modality.IMAGE)
    tiny = get_preset("tiny")
    dec = tiny.decoders[Modality.IMAGE]
    save_tiny_checkpoint(Modality.IMAGE, dec, tmp_path / "sd", seed=0)
    pre = tiny.model_copy(update={"name": "tiny-pretrained-image", "decoders": {
        **tiny.decoders, Modality.IMAGE: DecoderConfig(**{**dec.model_dump(), "source": "pretrained",
                                                         "path": str(tmp_path / "sd")})}})
    yaml_path = tmp_path / "preset.yaml"
    import yaml

    # exclude_unset: the tiny preset leaves projector num_queries unset (taken from the decoder's Q)
    yaml_path.write_text(yaml.safe_dump(pre.model_dump(mode="json", exclude_unset=True), sort_keys=False))
    gen = DecoderMediaGenerator(str(yaml_path))
    assert gen.refusal(Modality.IMAGE) is None
    assert "random weights" in gen.refusal(Modality.AUDIO)
    data, ext = gen.generate(Modality.IMAGE, "a red kite", seed=5)
    assert ext == "png" and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert gen.generate(Modality.IMAGE, "a red kite", seed=5) == (data, ext)


def test_http_generator_checks_the_servers_init_state():
    import base64

    from mosit.media import HTTPMediaGenerator
    from polymodal.modality import Modality

    png = b"\x89PNG\r\n\x1a\nfake"
    calls = []

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, obj, raw=None):
            data = raw if raw is not None else json.dumps(obj).encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            calls.append(("GET", self.path))
            if self.path == "/v1/models":
                self._send({"data": [{"parts": {"decoders": {"image": {"init_state": "pretrained"},
                                                             "audio": {"init_state": "random"},
                                                             "video": {"init_state": "pretrained"}}}}]})
            elif self.path == "/v1/videos/v1":
                self._send({"id": "v1", "status": "completed"})
            elif self.path == "/v1/videos/v1/content":
                self._send(None, raw=b"mp4bytes")

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            calls.append(("POST", self.path, body))
            if self.path == "/v1/images/generations":
                self._send({"data": [{"b64_json": base64.b64encode(png).decode()}]})
            else:
                self._send({"id": "v1", "status": "queued"})

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        gen = HTTPMediaGenerator(f"http://127.0.0.1:{httpd.server_address[1]}/v1", poll_s=0.01, timeout_s=20)
        assert gen.refusal(Modality.IMAGE) is None
        assert "random weights" in gen.refusal(Modality.AUDIO)
        assert gen.generate(Modality.IMAGE, "a kite", seed=9) == (png, "png")
        assert calls[-1] == ("POST", "/v1/images/generations",
                             {"prompt": "a kite", "n": 1, "response_format": "b64_json", "seed": 9})
        assert gen.generate(Modality.VIDEO, "waves", seed=1) == (b"mp4bytes", "mp4")
    finally:
        httpd.shutdown()
        httpd.server_close()
    from mosit.media import GeneratorUnavailable

    with pytest.raises(GeneratorUnavailable):
        gen.generate(Modality.IMAGE, "a kite", seed=9)
