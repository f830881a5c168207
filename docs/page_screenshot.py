"""Writes ``docs/page.png``: the chat page after its three examples (a shape, a moving square, a tone; in that
order: after a shape and a tone, the toy model's answer to the square repeats words: "...moving left.square left.").

With ``make serve`` (or any polymodal server of the ``toy`` preset) running, and Debian's chromium and
chromium-driver installed:

    .venv/bin/python docs/page_screenshot.py [http://127.0.0.1:8000]
"""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.page_browser import chromium, Page  # noqa: E402

OUT = Path(__file__).with_name("page.png")


def main(base: str = "http://127.0.0.1:8000") -> None:
    driver = chromium(width=1000, height=1640)
    try:
        page = Page(driver, Path(tempfile.mkdtemp()))
        page.open(base)
        for n, medium in enumerate(("image", "video", "audio"), start=1):
            page.js(f"document.querySelector('.example[data-modality={medium}]').click()")
            page.wait_answer(n)
        page.wait("const v = document.querySelector('.medium-video video'); return v && v.readyState >= 2",
                  what="the video's first frame")
        page.wait("const a = document.querySelector('.medium-audio audio'); return a && a.duration > 0",
                  what="the audio's duration")
        page.js("const c = document.getElementById('conversation'); c.scrollTop = c.scrollHeight")
        png = driver.get_screenshot_as_png()
    finally:
        driver.quit()
    img = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    img.save(OUT, optimize=True)
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main(*sys.argv[1:])
