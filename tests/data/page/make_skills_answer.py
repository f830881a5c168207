"""Writes ``skills_answer.json``: a recorded chat answer with skill calls and masks, for the page's browser tests.

The skills are a library today (``skills/``), not yet in the chat answer; this records what they return on
scikit-image's ``astronaut()`` in the shape the skills issue (#23) puts into ``message``: ``skill_calls``
``[{name, arguments, result}]`` (``result`` is ``SkillResult.to_dict()``), ``masks`` (``SkillMask.to_dict()``:
label, image_index, bbox_px, area_px, score, rle {size, counts}: COCO uncompressed, column-major) and ``boxes``
(grounding's form: phrase, box, image_index, text_span). Run from the repository root:

    .venv/bin/python tests/data/page/make_skills_answer.py
"""

from __future__ import annotations

import json
from pathlib import Path

import skimage.data

from skills import build_skill, images

OUT = Path(__file__).with_name("skills_answer.json")


def main() -> None:
    photo = images(skimage.data.astronaut())
    calls = []

    def call(name: str, arguments: dict):
        result = build_skill(name).run(arguments, photo)
        d = result.to_dict()
        d["elapsed_s"] = round(d["elapsed_s"], 2)
        calls.append({"name": name, "arguments": arguments, "result": d})
        return result

    detected = call("detect", {"target": "face"})
    face = detected.boxes[0]
    box = [round(float(v), 2) for v in face.box_px]
    mask = call("segment", {"box_px": box, "label": "face"}).masks[0]
    call("segment", {"box_px": box, "image_index": 3})  # a failing call: no such image (an error result)
    content = "I found one face and cut it out."
    message = {
        "role": "assistant",
        "content": content,
        "parts": [{"type": "text", "text": content}],
        "boxes": [{"phrase": "face", "box": box, "image_index": 0, "text_span": [content.index("face"), content.index("face") + 4]}],
        "masks": [mask.to_dict()],
        "skill_calls": calls,
    }
    answer = {"id": "chatcmpl-recorded-skills", "object": "chat.completion", "created": 0, "model": "toy",
              "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}
    OUT.write_text(json.dumps(answer, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
