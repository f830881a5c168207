"""Speech: intelligibility of the TTS voices (word error rate through the ASR) and streamed speech over HTTP.

Run from the repository root::

    .venv/bin/python bench/speech.py [--quick] [--n 100] [--voices alloy,echo,...] [--parts a,c]
                                     [--streams 16] [--out speech.json]

(a) Intelligibility. The 100 held-out sentences of ``bench/data/speech_sentences.txt`` (everyday English written
    for this bench) are spoken by each voice (``skills.tts``, at speed 1.0, 24 kHz as the API sends them) and
    transcribed back by pocketsphinx's generic US English model (``skills.asr``, the wheel's ``en-us`` acoustic
    model, 3-gram language model and dictionary: no restricted vocabulary or grammar). Word error rate = (word
    substitutions + deletions + insertions) / reference words, over all sentences, after lower-casing and
    dropping punctuation (apostrophes kept). Also for the default voice: the same with one decoding pass (no
    cepstral-mean estimate), the ablation behind the two-pass design (``--quick``: ``echo`` and ``espeak-ng:en-us`` on
    5 sentences). Default voices: OpenAI's 13 names (the flite
    voices at several pitches), ``flite:kal`` (8 kHz) and two espeak-ng voices.
(b) Spoken toy-world requests through chat: needs the chat integration (speech input transcribed beside the audio
    tokens); not measured here yet.
(c) Streaming. ``polymodal serve --no-ray --preset tiny`` runs in a subprocess; each request asks
    ``/v1/audio/speech`` for a 5-sentence text (``response_format: pcm``, ``stream_format: audio``). Time to the
    first audio bytes and to the last, p50 / p95, with 1 stream at a time and with ``--streams`` (16) at once;
    every stream's bytes, joined in order, are compared with the non-streamed answer for the same text and voice
    (fetched first, one at a time): equal or not, and the count and length of the pieces received.
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


def _serve(port: int) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("polymodal")
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "polymodal.cli"]),
           "serve", "--preset", "tiny", "--no-ray", "--port", str(port)]
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


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100, help="sentences per voice for (a) (--quick: 5)")
    p.add_argument("--voices", default=",".join(DEFAULT_VOICES), help="comma-separated voice names for (a)")
    p.add_argument("--parts", default="a,c", help="which parts to run: a (intelligibility), c (streaming)")
    p.add_argument("--streams", type=int, default=16, help="concurrent streams of (c) (--quick: 4)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of --streams concurrent streams (--quick: 1)")
    p.add_argument("--serial-runs", type=int, default=8, help="one-at-a-time streams of (c) (--quick: 2)")
    p.add_argument("--no-ablation", action="store_true", help="skip the one-pass decode of the default voice")
    args = p.parse_args(argv)
    texts = sentences()
    parts = set(args.parts.split(","))
    results: dict = {"sentences_file": str(SENTENCES.relative_to(C.ROOT)),
                     "part_b": "not measured: spoken chat requests need the chat integration (speech input)"}
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
    C.finish(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
