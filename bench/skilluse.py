"""Skill use through the running service (issue #25): per toy task family (``training.toyworld.skilluse``: ``locate``,
``count``), the share of held-out requests whose first skill call is the right skill, with the right arguments, and
whose final answer passes the family's check; beside two controls:

- ``disabled``: the same requests with skills disabled (``skills: []``): the no-skill baseline;
- ``swapped``: the skills offered as client tools; the bench answers the model's call with the result of the same
  call on *another* request's scene, then asks for the answer: scored against the request's own truth (it must sit
  near chance if the answer follows the result), and the share that says what the swapped result says is reported
  (count: its number; locate: its box, or no box when it found none). The follow-up request sends the tools again,
  as OpenAI clients do in a tool loop.

The model is whatever answers the service's chats: the preset's LLM, or a zero-shot brain (``--brain URL
--brain-model NAME``: the service started here calls that OpenAI-compatible endpoint, e.g. ``polymodal serve
--preset smol --no-ray --port 8001``, with the skills as tools). The service: ``--url`` of a running server that
serves ``locate`` / ``count`` (``polymodal serve --toy-skills``), or ``--serve PRESET`` to start one in this
process (``--no-ray``, toy skills on).

    .venv/bin/python bench/skilluse.py --serve toy --n 20 --modes disabled --out bench/results/skilluse_toy_disabled.json
    POLYMODAL_TOY_DIR=build/toy-skills .venv/bin/python bench/skilluse.py --serve toy-skills --n 200 \\
        --max-tokens 128 --modes skills,disabled,swapped --out bench/results/skilluse_toy_skills.json
    .venv/bin/python bench/skilluse.py --serve tiny --brain http://127.0.0.1:8001/v1 --brain-model smol --n 5

``--quick``: n = 4 per family and a PASS/FAIL verdict per threshold of the issue (right skill >= 0.95, right
arguments >= 0.90, answer >= 0.90, swapped control <= chance + 3 sd).
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import base_parser, finish, free_port, print_table  # noqa: E402
from training.toyworld import skilluse  # noqa: E402

MODES = ("skills", "disabled", "swapped")
THRESHOLDS = {"right_skill": 0.95, "right_args": 0.90, "answer_ok": 0.90}


def _data_url(image) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _user(task: skilluse.SkillTask) -> dict:
    # the scene first, then the question: the order of the toy skill-use dialogues the toy-skills preset learns
    # (training.toyworld.mosit.write_skill_use_dialogues) and of the toy writer's comprehension exchanges
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(task.scene.image)}},
                                        {"type": "text", "text": task.question}]}


def _result_json(name: str, result) -> str:
    """A skill result as the service's skill loop feeds it to the model (``services.ingress.skill_loop.result_text``,
    called: the text the toy-skills preset was trained on)."""
    from polymodal.types import ToolCall
    from services.ingress.skill_loop import SkillCall, result_text
    from services.protocol import SkillOutput

    return result_text(SkillCall(ToolCall("call_0", name, "{}"), SkillOutput(result, result.to_dict()), (), 0, None))


def _args(raw: str) -> dict:
    try:
        a = json.loads(raw)
        return a if isinstance(a, dict) else {}
    except ValueError:
        return {}


def _follows(task: skilluse.SkillTask, result, answer: str) -> bool:
    """Whether ``answer`` says what the (swapped) ``result`` it was given says: count, its number; locate, its first
    box (IoU >= 0.5), or no box at all when the result found none."""
    import dataclasses

    if task.family == "count":
        return skilluse.answer_passes(dataclasses.replace(task, truth=result.data.get("count")), answer)
    if not result.boxes:
        return len(re.findall(r"-?\d+(?:\.\d+)?", skilluse.MEDIA_LINK.sub(" ", answer))) < 4
    return skilluse.answer_passes(dataclasses.replace(task, truth=tuple(result.boxes[0].box_px)), answer)


def run_one(h, model: str, task: skilluse.SkillTask, other: skilluse.SkillTask, mode: str, tools: list,
            max_tokens: int) -> dict:
    """One request in ``mode``; returns the call made (name, arguments), the answer and the checks."""
    base = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "seed": 0}
    msgs = [_user(task)]
    call_name, call_args, follows = None, {}, None
    if mode in ("skills", "disabled"):
        body = {**base, "messages": msgs, "skills": ["locate", "count"] if mode == "skills" else []}
        r = h.post("/v1/chat/completions", json=body)
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {r.text[:200]}"}
        msg = r.json()["choices"][0]["message"]
        calls = msg.get("skill_calls") or []
        if calls:
            call_name, call_args = calls[0]["name"], _args(calls[0]["arguments"])
        answer = msg.get("content") or ""
    else:  # swapped: client tools, answered by the bench from another scene
        from skills import build_skill, images

        r = h.post("/v1/chat/completions", json={**base, "messages": msgs, "tools": tools, "skills": []})
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {r.text[:200]}"}
        msg = r.json()["choices"][0]["message"]
        answer = msg.get("content") or ""
        if msg.get("tool_calls"):
            tc = msg["tool_calls"][0]
            call_name, call_args = tc["function"]["name"], _args(tc["function"]["arguments"])
            if call_name in ("locate", "count"):
                res = build_skill(call_name).run(tc["function"]["arguments"], images(other.scene.image))
                content = _result_json(call_name, res)
            else:
                content = json.dumps({"skill": call_name, "error": f"unknown tool {call_name!r}"})
            msgs += [{"role": "assistant", "content": msg.get("content"), "tool_calls": [tc]},
                     {"role": "tool", "tool_call_id": tc["id"], "content": content}]
            # the tools again, as OpenAI clients send them with every request of a tool loop (without them the
            # prompt loses the listing the model read when it called)
            r2 = h.post("/v1/chat/completions", json={**base, "messages": msgs, "tools": tools, "skills": []})
            if r2.status_code != 200:
                return {"error": f"HTTP {r2.status_code}: {r2.text[:200]}"}
            answer = r2.json()["choices"][0]["message"].get("content") or ""
            follows = _follows(task, res, answer) if call_name in ("locate", "count") else False
    return {"question": task.question, "truth": task.truth, "call": call_name, "arguments": call_args,
            "answer": answer[:300], "right_skill": call_name == task.skill,
            "right_args": call_name == task.skill and skilluse.arguments_right(task, call_args),
            "answer_ok": skilluse.answer_passes(task, answer), "follows_result": follows}


def _serve(preset: str, brain: dict | None) -> tuple[str, threading.Event, threading.Thread]:
    from services.run import serve_main

    port, stop, out = free_port(), threading.Event(), io.StringIO()
    t = threading.Thread(target=serve_main, args=(preset,), daemon=True, kwargs=dict(
        port=port, no_ray=True, toy_skills=True, brain=brain, stop_event=stop, out=out, request_timeout_s=600))
    t.start()
    deadline = time.monotonic() + 600
    while "serving preset" not in out.getvalue():
        if not t.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"polymodal serve --preset {preset} did not start: {out.getvalue()[-500:]}")
        time.sleep(0.2)
    return f"http://127.0.0.1:{port}", stop, t


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running service with the toy skills (polymodal serve --toy-skills)")
    p.add_argument("--serve", metavar="PRESET", help="start a --no-ray service of PRESET here (toy skills on)")
    p.add_argument("--brain", help="zero-shot path: the OpenAI-compatible base URL of the brain (with --serve)")
    p.add_argument("--brain-model", help="the brain's model name")
    p.add_argument("--n", type=int, default=200, help="held-out requests per family")
    p.add_argument("--families", default=",".join(skilluse.FAMILIES))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args(argv)
    n = 4 if a.quick else a.n
    if bool(a.url) == bool(a.serve):
        p.error("give --url or --serve")
    if a.brain and not (a.serve and a.brain_model):
        p.error("--brain needs --serve and --brain-model")
    import httpx

    stop = thread = None
    url = a.url
    if a.serve:
        brain = {"base_url": a.brain, "model": a.brain_model, "timeout_s": 600} if a.brain else None
        url, stop, thread = _serve(a.serve, brain)
    results: dict[str, Any] = {"url": url, "preset": a.serve, "brain": a.brain, "brain_model": a.brain_model,
                               "n": n, "families": {}}
    t0 = time.monotonic()
    try:
        with httpx.Client(base_url=url, timeout=900) as h:
            model = h.get("/v1/models").json()["data"][0]["id"]
            specs = {s["name"]: s for s in h.get("/v1/skills").json()["data"]}
            missing = [s for s in ("locate", "count") if s not in specs]
            if missing:
                raise SystemExit(f"the service does not serve {missing} (start it with --toy-skills)")
            tools = [{"type": "function", "function": {"name": s, "description": specs[s]["description"],
                                                       "parameters": specs[s]["parameters"]}}
                     for s in ("locate", "count")]
            rows = []
            for fam in a.families.split(","):
                tasks = [skilluse.make_task(fam, i, seed=a.seed, split="heldout") for i in range(n)]
                c = skilluse.chance(tasks)
                sd = math.sqrt(c * (1 - c) / n)
                fam_res: dict[str, Any] = {"chance": c, "chance_plus_3sd": c + 3 * sd, "modes": {}}
                for mode in a.modes.split(","):
                    items = [run_one(h, model, t, tasks[(k + 1) % n], mode, tools, a.max_tokens)
                             for k, t in enumerate(tasks)]
                    ok = [x for x in items if "error" not in x]
                    share = {k: (sum(bool(x[k]) for x in ok) / len(ok) if ok else float("nan"))
                             for k in ("right_skill", "right_args", "answer_ok")}
                    fol = [x["follows_result"] for x in ok if x.get("follows_result") is not None]
                    share["follows_result"] = sum(fol) / len(fol) if fol else float("nan")
                    fam_res["modes"][mode] = {**share, "n": len(items), "errors": len(items) - len(ok),
                                              "items": items}
                    rows.append([fam, mode, len(items), len(items) - len(ok), share["right_skill"],
                                 share["right_args"], share["answer_ok"], share["follows_result"], c, c + 3 * sd])
                results["families"][fam] = fam_res
    finally:
        if stop is not None:
            stop.set()
            thread.join(60)
    results["seconds"] = round(time.monotonic() - t0, 1)
    who = f"brain {a.brain_model} via {a.serve}" if a.brain else (a.serve or url)
    print_table(f"skill use through the service ({who}; n={n} held-out requests per family)",
                ["family", "mode", "n", "errors", "right skill", "right args", "answer ok", "follows swapped",
                 "chance", "chance+3sd"], rows)
    if a.quick:
        verdicts = []
        for fam, fr in results["families"].items():
            m = fr["modes"]
            for k, th in THRESHOLDS.items():
                if "skills" in m:
                    verdicts.append((f"{fam} {k} >= {th}", m["skills"][k] >= th))
            if "swapped" in m:
                verdicts.append((f"{fam} swapped <= chance+3sd", m["swapped"]["answer_ok"] <= fr["chance_plus_3sd"]))
        for name, ok in verdicts:
            print(f"{'PASS' if ok else 'FAIL'}  {name}")
        results["verdicts"] = {k: v for k, v in verdicts}
    finish(results, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
