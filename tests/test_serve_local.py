"""``serve_main(no_ray=True)``: the real ``tiny`` pipeline in one process under uvicorn, through the official
``openai`` client: a real photo in, text and a playable WAV out; an async video job with a decodable MP4."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time

import httpx
import pytest

from tests.media_fixtures import photo_png

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def local_service():
    from services.run import serve_main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stop = threading.Event()
    out = io.StringIO()
    result = {}

    def run():
        result["rc"] = serve_main("tiny", host="127.0.0.1", port=port, no_ray=True, stop_event=stop, out=out,
                                  modalities=["audio", "video"],
                                  app_args={"server": {"limits": {"max_inference_steps": 200}}})

    t = threading.Thread(target=run, daemon=True)
    t.start()
    deadline = time.monotonic() + 240
    while "serving preset" not in out.getvalue():
        assert t.is_alive() and time.monotonic() < deadline, f"no start: {out.getvalue()}"
        time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    stop.set()
    t.join(60)
    assert not t.is_alive() and result.get("rc") == 0


def test_photo_in_text_and_playable_wav_out(local_service):
    import openai
    import soundfile as sf

    client = openai.OpenAI(base_url=local_service + "/v1", api_key="none", max_retries=0, timeout=120)
    resp = client.chat.completions.create(
        model="tiny", modalities=["text", "audio"],
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "describe it and make a matching sound"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(photo_png()).decode()}},
        ]}],
    )
    msg = resp.choices[0].message
    assert isinstance(msg.content, str) and msg.content.rstrip().endswith(".wav)") and "[audio 1](" in msg.content
    assert msg.parts[-1]["type"] == "audio_url" and msg.audio.id == msg.parts[-1]["artifact_id"]
    samples, sr = sf.read(io.BytesIO(base64.b64decode(msg.audio.data)))
    assert sr > 0 and len(samples) > 0 and abs(samples).max() > 0
    assert resp.usage.prompt_tokens > 0


def test_video_job_gives_a_decodable_mp4(local_service):
    import av

    r = httpx.post(local_service + "/v1/videos", json={"prompt": "waves", "seed": 1}, timeout=60)
    assert r.status_code == 200, r.text
    job = r.json()
    for _ in range(600):
        st = httpx.get(f"{local_service}/v1/videos/{job['id']}", timeout=30).json()
        if st["status"] in ("completed", "failed"):
            break
        time.sleep(0.2)
    assert st["status"] == "completed", st
    content = httpx.get(f"{local_service}/v1/videos/{job['id']}/content", timeout=60)
    with av.open(io.BytesIO(content.content)) as c:
        frames = list(c.decode(video=0))
    assert len(frames) == job["num_frames"]
