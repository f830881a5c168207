"""Speech: intelligibility of the TTS voices (word error rate through the ASR) and streamed speech over HTTP.

Run from the repository root::

    .venv/bin/python bench/speech.py [--quick] [--n 100] [--voices alloy,echo,...] [--parts a,b,c,c-chat]
                                     [--streams 16] [--n-spoken 60] [--chat-streams 4] [--out speech.json]

(a) Intelligibility. The 100 held-out sentences of ``bench/data/speech_sentences.txt`` (everyday English written
    for this bench) are spoken by each voice (``skills.tts``, at speed 1.0, 24 kHz as the API sends them) and
    transcribed back by pocketsphinx's generic US English model (``skills.asr``, the wheel's ``en-us`` acoustic
    model, 3-gram language model and dictionary: no restricted vocabulary or grammar). Word error rate = (word
    substitutions + deletions + insertions) / reference words, over all sentences, after lower-casing and
    dropping punctuation (apostrophes kept). Also for the default voice: the same with one decoding pass (no
    cepstral-mean estimate), the ablation behind the two-pass design (``--quick``: ``echo`` and ``espeak-ng:en-us`` on
    5 sentences). Default voices: OpenAI's 13 names (the flite
    voices at several pitches), ``flite:kal`` (8 kHz) and two espeak-ng voices.
(b) Spoken toy-world requests through chat. ``polymodal serve --no-ray --preset toy`` runs in a subprocess (the
    in-process speech stage transcribes; the toy preset opts in with ``spoken_transcript: "{transcript}"``). The
    toy world's held-out requests (``bench/toyworld.py``'s draw: :func:`training.toyworld.phrasings.requests`,
    ``heldout=True``, a whole number of attribute cycles cut to ``--n-spoken`` per modality) go to
    ``/v1/chat/completions`` with ``modalities: [m]`` twice: typed (the request as the user's text) and spoken
    (the request spoken by the default voice with ``skills.tts`` at 24 kHz, sent as one ``input_audio`` WAV, no
    text). The medium is read by the toy checker and scored against what the request states
    (:func:`training.toyworld.evaluate.score_readings`); also the WER of the transcripts the answers report
    (``message.input_transcripts``) and the latency of both (the spoken one adds the recognition). The server's
    recogniser uses the toy preset's ``spoken_vocabulary`` (``--spoken-vocabulary none``: the generic model); the
    same recordings are also transcribed here by pocketsphinx both ways (generic / vocabulary WER side by side).
(c) Streaming. ``polymodal serve --no-ray --preset tiny`` runs in a subprocess; each request asks
    ``/v1/audio/speech`` for a 5-sentence text (``response_format: pcm``, ``stream_format: audio``). Time to the
    first audio bytes and to the last, p50 / p95, with 1 stream at a time and with ``--streams`` (16) at once;
    every stream's bytes, joined in order, are compared with the non-streamed answer for the same text and voice
    (fetched first, one at a time): equal or not, and the count and length of the pieces received.
(c-chat) Spoken chat answers streamed: against the toy server of (b), held-out plain questions
    (:func:`training.toyworld.phrasings.plain_questions`) to ``/v1/chat/completions`` with ``stream: true``,
    ``modalities: ["text", "audio"]``, ``audio: {"voice": "echo", "format": "pcm16"}``: time to the first text
    delta, to the first ``delta.audio`` chunk and to the last, p50 / p95, with 1 stream at a time and
    ``--chat-streams`` at once (the LLM and the speech stage share the process); each stream's chunks are checked
    to be numbered 0..k-1 with the transcripts joining to the answer's sentences.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

SENTENCES = C.ROOT / "bench" / "data" / "speech_sentences.txt"
DEFAULT_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse",
                  "marin", "cedar", "flite:kal", "espeak-ng:en-us", "espeak-ng:en-us+f3")


def sentences() -> list[str]:
    """The held-out sentences (comment lines dropped)."""
    return [ln.strip() for ln in SENTENCES.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def words(text: str) -> list[str]:
    """Lower case, hyphens as spaces, punctuation but apostrophes dropped."""
    return re.sub(r"[^a-z0-9' ]", " ", text.lower().replace("-", " ")).split()


def word_errors(ref: str, hyp: str) -> tuple[int, int]:
    """(Levenshtein distance over words, reference length)."""
    r, h = words(ref), words(hyp)
    row = list(range(len(h) + 1))
    for i in range(1, len(r) + 1):
        prev, row[0] = row[0], i
        for j in range(1, len(h) + 1):
            cur = row[j]
            row[j] = min(row[j] + 1, row[j - 1] + 1, prev + (r[i - 1] != h[j - 1]))
            prev = cur
    return row[len(h)], len(r)


def intelligibility(voices: list[str], texts: list[str], ablation: bool, on_voice=None) -> dict:
    """WER of each voice (see (a)); ``on_voice(results so far)`` after each voice (long runs save as they go)."""
    from skills.asr import PocketsphinxASR, TranscribeSkill
    from skills.tts import build_synthesizer

    synth = build_synthesizer(("flite", "espeak-ng"))
    asr = {2: TranscribeSkill(PocketsphinxASR(cmn_passes=2))}
    if ablation:
        asr[1] = TranscribeSkill(PocketsphinxASR(cmn_passes=1))
    rows, out = [], {}
    for voice in voices:
        v = synth.voice(voice)
        passes = [2, 1] if ablation and voice == synth.default_voice else [2]
        for n_pass in passes:
            errors = total = 0
            audio_s = tts_s = asr_s = 0.0
            worst: list[tuple[float, str, str]] = []
            for text in texts:
                t0 = time.perf_counter()
                samples = synth.synthesize(text, voice)
                t1 = time.perf_counter()
                heard = asr[n_pass].transcribe(samples, synth.sample_rate_hz).text
                t2 = time.perf_counter()
                e, n = word_errors(text, heard)
                errors, total = errors + e, total + n
                audio_s += len(samples) / synth.sample_rate_hz
                tts_s, asr_s = tts_s + t1 - t0, asr_s + t2 - t1
                worst.append((e / max(1, n), text, heard))
            key = voice if n_pass == 2 else f"{voice} (1 pass)"
            worst.sort(key=lambda w: -w[0])
            out[key] = {"voice": v.to_dict(), "cmn_passes": n_pass, "sentences": len(texts), "words": total,
                        "word_errors": errors, "wer": errors / max(1, total), "audio_s": round(audio_s, 2),
                        "tts_rtf": tts_s / max(1e-9, audio_s), "asr_rtf": asr_s / max(1e-9, audio_s),
                        "worst": [{"wer": round(w, 3), "said": s, "heard": h} for w, s, h in worst[:3]]}
            rows.append([key, v.backend, v.native, v.f0_hz or "-", len(texts), total, errors, errors / max(1, total),
                         out[key]["tts_rtf"], out[key]["asr_rtf"]])
            print(f"  {key}: WER {errors / max(1, total):.3f}", flush=True)
            if on_voice is not None:
                on_voice(out)
    C.print_table("(a) intelligibility: TTS voice -> pocketsphinx (generic en-us model)",
                  ["voice", "backend", "native", "f0_hz", "sentences", "words", "errors", "WER", "tts_rtf", "asr_rtf"],
                  rows)
    return out


def _serve(port: int, preset: str = "tiny", request_timeout_s: float | None = None) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("polymodal")
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "polymodal.cli"]),
           "serve", "--preset", preset, "--no-ray", "--port", str(port),
           *([] if request_timeout_s is None else ["--request-timeout-s", str(request_timeout_s)])]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=C.ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


async def _wait_ready(base: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=5) as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                if (await c.get(f"{base}/ready")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError("the server did not get ready")


async def _stream(client, base: str, text: str, voice: str) -> dict:
    t0 = time.perf_counter()
    pieces: list[bytes] = []
    first = None
    body = {"model": "tts-1", "input": text, "voice": voice, "response_format": "pcm", "stream_format": "audio"}
    async with client.stream("POST", f"{base}/v1/audio/speech", json=body) as r:
        r.raise_for_status()
        async for piece in r.aiter_raw():
            if piece:
                pieces.append(piece)
                if first is None:
                    first = time.perf_counter() - t0
    return {"first_s": first, "last_s": time.perf_counter() - t0, "data": b"".join(pieces),
            "pieces": len(pieces), "piece_bytes": [len(p) for p in pieces]}


async def streaming(texts: list[str], voice: str, streams: int, rounds: int, serial_runs: int) -> dict:
    import httpx

    port = C.free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _serve(port)
    try:
        await _wait_ready(base, proc)
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=streams + 4)) as client:
            whole = {}
            for text in texts:  # the non-streamed answers, one at a time
                r = await client.post(f"{base}/v1/audio/speech",
                                      json={"model": "tts-1", "input": text, "voice": voice, "response_format": "pcm"})
                r.raise_for_status()
                whole[text] = r.content
            await _stream(client, base, texts[0], voice)  # warm-up
            out = {}
            for level, runs in (("1 stream", [[texts[k % len(texts)]] for k in range(serial_runs)]),
                                (f"{streams} streams", [[texts[(k + j) % len(texts)] for j in range(streams)]
                                                        for k in range(rounds)])):
                results = []
                for batch in runs:
                    got = await asyncio.gather(*(_stream(client, base, t, voice) for t in batch))
                    results += [(t, g) for t, g in zip(batch, got)]
                first = C.stats_s([g["first_s"] for _, g in results])
                last = C.stats_s([g["last_s"] for _, g in results])
                equal = sum(g["data"] == whole[t] for t, g in results)
                out[level] = {"requests": len(results), "first_chunk": first, "last_chunk": last,
                              "joined_equal_whole": f"{equal}/{len(results)}",
                              "pieces_mean": sum(g["pieces"] for _, g in results) / len(results),
                              "bytes_mean": sum(len(g["data"]) for _, g in results) / len(results),
                              "bytes_whole_mean": sum(len(whole[t]) for t, _ in results) / len(results),
                              "pieces_example": results[0][1]["piece_bytes"][:12]}
            rows = [[k, v["requests"], v["first_chunk"]["p50_s"], v["first_chunk"]["p95_s"], v["last_chunk"]["p50_s"],
                     v["last_chunk"]["p95_s"], v["joined_equal_whole"], v["pieces_mean"]] for k, v in out.items()]
            C.print_table(f"(c) /v1/audio/speech streams (pcm, --no-ray host, voice {voice})",
                          ["level", "requests", "first p50", "first p95", "last p50", "last p95", "joined == whole",
                           "pieces"], rows)
            return out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


# ---- (b) spoken toy-world requests and (c-chat) streamed spoken answers, against one toy server ----------------
def spoken_wav(synth, text: str) -> bytes:
    """``text`` in the synthesizer's default voice as a 16-bit WAV at its rate (24 kHz)."""
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, synth.synthesize(text, None), synth.sample_rate_hz, format="WAV", subtype="PCM_16")
    return buf.getvalue()


async def _chat_medium(client, base: str, m: str, content, seed: int) -> dict:
    from training.toyworld.checkers import check_bytes
    from training.toyworld.evaluate import empty_reading

    import toyworld as TW

    body = {"model": "toy", "messages": [{"role": "user", "content": content}], "modalities": [m], "seed": seed,
            "max_tokens": 32}
    t0 = time.perf_counter()
    reading, heard, err = empty_reading(m), None, None
    try:
        r = await client.post(f"{base}/v1/chat/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        message = r.json()["choices"][0]["message"]
        heard = " ".join(t["text"] for t in message.get("input_transcripts") or []) or None
        reading = check_bytes(m, TW.data_url_bytes(C.answer_media(message, m)[0]))
    except Exception as e:  # noqa: BLE001 - a failed request counts as a miss and is reported
        err = f"{type(e).__name__}: {str(e)[:200]}"
    return {"reading": reading, "heard": heard, "latency_s": time.perf_counter() - t0, "error": err}


async def _gather_limited(coros, limit: int) -> list:
    sem = asyncio.Semaphore(limit)

    async def one(c):
        async with sem:
            return await c

    return await asyncio.gather(*(one(c) for c in coros))


async def spoken_requests(client, base: str, n: int, modalities: list[str], concurrency: int, seed: int = 0) -> dict:
    """(b): typed and spoken held-out toy requests -> the share of media showing what was asked."""
    import base64
    import dataclasses

    import toyworld as TW
    from skills.tts import build_synthesizer
    from training.toyworld.evaluate import SCORED, score_readings

    synth = build_synthesizer(("flite",), strict=True)
    out, rows = {}, []
    for m in modalities:
        reqs = TW.draw_requests(m, n, seed)
        held = TW.check_heldout(m, [r for r, _, _ in reqs])
        wavs = [spoken_wav(synth, r) for r, _, _ in reqs]
        side_by_side = recogniser_side_by_side([r for r, _, _ in reqs], wavs)
        typed = await _gather_limited([_chat_medium(client, base, m, r, 1_000 * seed + i)
                                       for i, (r, _, _) in enumerate(reqs)], concurrency)
        spoken = await _gather_limited([_chat_medium(client, base, m, [{"type": "input_audio", "input_audio": {
            "data": base64.b64encode(w).decode(), "format": "wav"}}], 1_000 * seed + i) for i, w in enumerate(wavs)],
            concurrency)
        asked = [a for _, _, a in reqs]
        res = {"heldout_check": held, "voice": synth.default_voice}
        for label, got in (("typed", typed), ("spoken", spoken)):
            score = score_readings(m, [g["reading"] for g in got], asked)
            res[label] = {"correct": score.correct, "total": score.total, "share": score.accuracy,
                          "per_attribute": {k: score.per_attribute[k] for k in SCORED[C.Modality.parse(m)]},
                          "errors": sum(bool(g["error"]) for g in got),
                          "error_examples": [g["error"] for g in got if g["error"]][:3],
                          "latency": C.stats_s([g["latency_s"] for g in got])}
        errs = [word_errors(r, g["heard"] or "") for (r, _, _), g in zip(reqs, spoken)]
        res["spoken"]["transcript_wer"] = sum(e for e, _ in errs) / max(1, sum(k for _, k in errs))
        res["spoken"]["transcripts_exact"] = sum(e == 0 for e, _ in errs)
        res["recogniser"] = side_by_side
        res["requests"] = [{"said": r, "heard": g["heard"], "asked": a, "read": dataclasses.asdict(g["reading"]),
                            "typed_read": dataclasses.asdict(t["reading"])}
                           for (r, _, a), g, t in zip(reqs, spoken, typed)]
        out[m] = res
        rows.append([m, n, f"{res['typed']['correct']}/{n}", res["typed"]["share"], f"{res['spoken']['correct']}/{n}",
                     res["spoken"]["share"], res["spoken"]["transcript_wer"], side_by_side["generic"]["wer"],
                     side_by_side["vocabulary"]["wer"], res["typed"]["latency"]["p50_s"],
                     res["spoken"]["latency"]["p50_s"], res["typed"]["errors"] + res["spoken"]["errors"]])
        print(f"  {m}: typed {res['typed']['share']:.3f}, spoken {res['spoken']['share']:.3f}", flush=True)
    total = {k: sum(out[m][k]["correct"] for m in out) / max(1, n * len(out)) for k in ("typed", "spoken")}
    out["all"] = {"typed_share": total["typed"], "spoken_share": total["spoken"]}
    rows.append(["all", n * len(modalities), "", total["typed"], "", total["spoken"], "", "", "", "", "", ""])
    C.print_table("(b) toy-world held-out requests, typed vs spoken (input_audio, no text), toy preset, --no-ray",
                  ["modality", "n", "typed", "share", "spoken", "share", "served WER", "generic WER",
                   "vocabulary WER", "typed p50 s", "spoken p50 s", "errors"], rows)
    return out


def recogniser_side_by_side(said: list[str], wavs: list[bytes]) -> dict:
    """(b), the recogniser alone on the same recordings: pocketsphinx's generic language model vs the toy preset's
    ``spoken_vocabulary`` (:data:`polymodal.presets.toy.SPOKEN_VOCABULARY_FILE`), WER and exact transcripts each."""
    import io

    import soundfile as sf

    from polymodal.presets.toy import SPOKEN_VOCABULARY_FILE
    from skills.asr import PocketsphinxASR, to_rate

    asr = PocketsphinxASR()
    out: dict = {"vocabulary_file": str(Path(SPOKEN_VOCABULARY_FILE).relative_to(C.ROOT))}
    for label, vocab in (("generic", None), ("vocabulary", str(SPOKEN_VOCABULARY_FILE))):
        heard = []
        for w in wavs:
            x, rate = sf.read(io.BytesIO(w), dtype="float32")
            heard.append(asr.transcribe(to_rate(x, rate), vocabulary=vocab).text)
        errs = [word_errors(r, h) for r, h in zip(said, heard)]
        out[label] = {"wer": sum(e for e, _ in errs) / max(1, sum(k for _, k in errs)),
                      "exact": sum(e == 0 for e, _ in errs), "heard": heard}
    return out


async def _chat_stream(client, base: str, question: str, seed: int) -> dict:
    import base64
    import json

    body = {"model": "toy", "messages": [{"role": "user", "content": question}], "modalities": ["text", "audio"],
            "audio": {"voice": "echo", "format": "pcm16"}, "stream": True, "seed": seed}
    t0 = time.perf_counter()
    first_text = first_audio = last_audio = None
    text, chunks = "", []
    async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:  # counted, not fatal
            return {"first_text_s": None, "first_audio_s": None, "last_audio_s": None, "chunks": 0, "ok": False,
                    "samples": 0, "total_s": time.perf_counter() - t0, "error": f"HTTP {r.status_code}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or []
            delta = choices[0]["delta"] if choices else {}
            now = time.perf_counter() - t0
            if delta.get("content"):
                text += delta["content"]
                first_text = now if first_text is None else first_text
            if delta.get("audio"):
                chunks.append(delta["audio"])
                first_audio = now if first_audio is None else first_audio
                last_audio = now
    from polymodal.sentences import split_sentences

    ordered = [c["index"] for c in chunks] == list(range(len(chunks)))
    joined = "".join(c["transcript"] for c in chunks) == " ".join(split_sentences(text))
    return {"first_text_s": first_text, "first_audio_s": first_audio, "last_audio_s": last_audio,
            "total_s": time.perf_counter() - t0, "chunks": len(chunks), "ok": ordered and joined and bool(chunks),
            "samples": sum(len(base64.b64decode(c["data"])) // 2 for c in chunks), "error": None}


async def chat_streaming(client, base: str, levels: list[int], runs: int) -> dict:
    """(c-chat): time to the first ``delta.audio`` of a streamed spoken chat answer."""
    from training.toyworld.phrasings import plain_questions

    qs = plain_questions(200, seed=1)
    await _chat_stream(client, base, qs[-1], 0)  # warm-up
    out, rows, k = {}, [], 0
    for level in levels:
        got = []
        for _ in range(max(1, runs // level)):
            got += await asyncio.gather(*(_chat_stream(client, base, qs[(k + j) % len(qs)], k + j)
                                          for j in range(level)))
            k += level
        spoke = [g for g in got if g["first_audio_s"] is not None]
        out[f"{level} streams"] = {
            "requests": len(got), "with_audio": len(spoke), "chunks_ok": sum(g["ok"] for g in got),
            "errors": [g["error"] for g in got if g["error"]],
            "first_text": C.stats_s([g["first_text_s"] for g in got if g["first_text_s"] is not None] or [float("nan")]),
            "first_audio": C.stats_s([g["first_audio_s"] for g in spoke] or [float("nan")]),
            "last_audio": C.stats_s([g["last_audio_s"] for g in spoke] or [float("nan")]),
            "chunks_mean": sum(g["chunks"] for g in got) / max(1, len(got)),
            "audio_s_mean": sum(g["samples"] for g in got) / 24000 / max(1, len(got))}
        o = out[f"{level} streams"]
        rows.append([level, o["requests"], o["first_text"]["p50_s"], o["first_audio"]["p50_s"],
                     o["first_audio"]["p95_s"], o["last_audio"]["p50_s"], o["last_audio"]["p95_s"],
                     f"{o['chunks_ok']}/{o['requests']}", o["chunks_mean"]])
    C.print_table("(c-chat) streamed spoken chat answers (toy preset, --no-ray, voice echo, pcm16)",
                  ["streams", "requests", "first text p50", "first audio p50", "first audio p95", "last audio p50",
                   "last audio p95", "chunks ok", "chunks"], rows)
    return out


async def toy_server_parts(parts: set[str], n: int, modalities: list[str], concurrency: int, levels: list[int],
                           runs: int, on_part=None, vocabulary: bool = True) -> dict:
    import httpx

    port = C.free_port()
    base = f"http://127.0.0.1:{port}"
    preset = "toy"
    if not vocabulary:  # the toy preset as it is, but with pocketsphinx's generic language model
        import tempfile

        from polymodal.presets import get_preset

        preset = str(Path(tempfile.mkdtemp(prefix="speech-bench-")) / "toy-generic-asr.yaml")
        Path(preset).write_text(get_preset("toy").model_copy(update={"spoken_vocabulary": None}).to_yaml())
    proc = _serve(port, preset, request_timeout_s=900)  # a loaded box: no 503 / 504 from admission
    out = {}
    try:
        t0 = time.perf_counter()
        await _wait_ready(base, proc, timeout_s=900)
        out["toy_server_ready_s"] = time.perf_counter() - t0
        async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=32)) as client:
            if "b" in parts:
                t0 = time.perf_counter()
                out["spoken_requests"] = await spoken_requests(client, base, n, modalities, concurrency)
                out["spoken_requests"]["served_vocabulary"] = "toy preset's" if vocabulary else "generic"
                out["spoken_requests"]["wall_s"] = time.perf_counter() - t0
                if on_part is not None:
                    on_part(out)
            if "c-chat" in parts:
                out["chat_streaming"] = await chat_streaming(client, base, levels, runs)
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100, help="sentences per voice for (a) (--quick: 5)")
    p.add_argument("--voices", default=",".join(DEFAULT_VOICES), help="comma-separated voice names for (a)")
    p.add_argument("--parts", default="a,c",
                   help="which parts to run: a (intelligibility), b (spoken toy requests), c (speech streams), "
                        "c-chat (streamed spoken chat answers); b and c-chat serve the toy preset (minutes to start)")
    p.add_argument("--n-spoken", type=int, default=60, help="held-out requests per modality for (b) (--quick: 6)")
    p.add_argument("--spoken-modalities", default="image,audio,video", help="modalities of (b)")
    p.add_argument("--concurrency", type=int, default=4, help="chat requests at once in (b)")
    p.add_argument("--spoken-vocabulary", choices=("preset", "none"), default="preset",
                   help="(b)'s server: the toy preset's spoken_vocabulary (preset) or pocketsphinx's generic language "
                        "model (none); the recogniser-alone columns show both either way")
    p.add_argument("--chat-streams", default="1,4", help="concurrent streams of (c-chat), comma-separated levels")
    p.add_argument("--chat-runs", type=int, default=8, help="streams per level of (c-chat) (--quick: 2)")
    p.add_argument("--streams", type=int, default=16, help="concurrent streams of (c) (--quick: 4)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of --streams concurrent streams (--quick: 1)")
    p.add_argument("--serial-runs", type=int, default=8, help="one-at-a-time streams of (c) (--quick: 2)")
    p.add_argument("--no-ablation", action="store_true", help="skip the one-pass decode of the default voice")
    args = p.parse_args(argv)
    texts = sentences()
    parts = set(args.parts.split(","))
    results: dict = {"sentences_file": str(SENTENCES.relative_to(C.ROOT))}
    if "a" in parts:
        n = 5 if args.quick else args.n
        voices = ["echo", "espeak-ng:en-us"] if args.quick and args.voices == ",".join(DEFAULT_VOICES) else \
            [v for v in args.voices.split(",") if v]

        def save(partial: dict) -> None:
            if args.out is not None:
                C.finish({**results, "intelligibility": partial, "partial": True}, args.out)

        results["intelligibility"] = intelligibility(voices, texts[:n], ablation=not args.no_ablation, on_voice=save)
    if "c" in parts:
        streams, rounds, serial = (4, 1, 2) if args.quick else (args.streams, args.rounds, args.serial_runs)
        paragraphs = [" ".join(texts[k:k + 5]) for k in range(0, 5 * max(4, streams), 5)][:max(4, streams)]
        results["streaming"] = asyncio.run(streaming(paragraphs, "alloy", streams, rounds, serial))
    if parts & {"b", "c-chat"}:
        levels = [int(x) for x in args.chat_streams.split(",") if x]
        results.update(asyncio.run(toy_server_parts(
            parts, 6 if args.quick else args.n_spoken, [m for m in args.spoken_modalities.split(",") if m],
            args.concurrency, [1, 2] if args.quick else levels, 2 if args.quick else args.chat_runs,
            on_part=lambda part: C.finish({**results, **part, "partial": True}, args.out) if args.out else None,
            vocabulary=args.spoken_vocabulary == "preset")))
    C.finish(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
