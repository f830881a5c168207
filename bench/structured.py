"""Structured outputs and tool calls with and without the grammar (issue #22), in process, side by side.

Run from the repository root::

    .venv/bin/python bench/structured.py [--quick] [--presets smol,tiny] [--requests 200] [--tool-requests 100]
                                         [--out FILE]

For each preset (``LLMStage`` in process, one torch thread, greedy), the same requests twice, interleaved
request by request, the only difference being the mask:

- **JSON** (``--requests``): a prompt stating facts (a person, a product, an event, a sensor reading: nested
  objects, enums, arrays, integers and numbers with bounds, booleans; the values drawn with a fixed seed) and
  asking to extract them into JSON matching the schema, which the prompt shows. *constrained*: the same request
  with ``response_format`` ``json_schema`` (strict). *unconstrained*: no ``response_format``; the answer is
  read as clients read it (a fenced ```` ```json ```` block is unwrapped, nothing else is forgiven).
- **Tool calls** (``--tool-requests``): three tools listed in the system text of the preset's tool-call
  format; a question whose one call is known. *constrained*: ``tools`` with ``tool_choice="required"`` and
  ``parallel_tool_calls=False`` (one call, so ``max_tokens`` fits it; with parallel calls SmolLM2 goes on
  calling other tools until ``max_tokens``).
  *unconstrained*: the same system text and question, no ``tools``; the answer's call blocks are parsed
  with the same parser (:func:`polymodal.constrained.parse_tool_calls`).

Figures per preset and side: **valid** = the share of requests that ended by themselves (``stop`` /
``tool_calls``; a ``length`` ending is a failure) and parse and validate (every call's name is a listed tool
and its arguments validate); **field accuracy** = the share of all expected leaf fields (over every request,
an invalid answer scoring 0) whose value is right (strings compared case-insensitively, numbers within 1e-6;
tool calls: the right name first, then each argument); **tokens/s** of the decode (the time from the first
decode step to the end, per request, summed; prefill excluded), and the ratio unconstrained / constrained.
Each request's ``max_tokens`` fits its schema (strings have ``maxLength``, arrays ``maxItems``).

``tiny`` is a random model: its field accuracy is chance (an enum or boolean hit now and then) and its
validity without the grammar 0; the grammar alone makes it valid, except where the schema leaves a value
unbounded: a random model can write a number's fraction digits until ``max_tokens`` (the grammar bounds JSON's
whitespace, not digits), a ``length`` ending counted as a failure. ``smol`` is SmolLM2-135M-Instruct.
Progress goes to stderr every 10 requests.
"""

from __future__ import annotations

import json
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NAMES = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Marie Curie", "Nikola Tesla", "Emmy Noether",
         "Carl Gauss", "Rosalind Franklin", "Max Planck", "Lise Meitner"]
CITIES = ["London", "Paris", "Rome", "Berlin", "Madrid", "Vienna", "Oslo", "Lisbon", "Prague", "Dublin"]
COUNTRIES = {"London": "UK", "Paris": "France", "Rome": "Italy", "Berlin": "Germany", "Madrid": "Spain",
             "Vienna": "Austria", "Oslo": "Norway", "Lisbon": "Portugal", "Prague": "Czechia", "Dublin": "Ireland"}
ROLES = ["admin", "user", "guest"]
PRODUCTS = ["desk lamp", "coffee mug", "backpack", "headphones", "notebook", "water bottle", "keyboard"]
CURRENCIES = ["USD", "EUR", "GBP"]
COLOURS = ["red", "green", "blue", "black", "white"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
EVENTS = ["jazz concert", "science fair", "book launch", "chess tournament", "film festival"]
SENSORS = ["thermometer", "barometer", "hygrometer"]
UNITS = {"thermometer": "celsius", "barometer": "hPa", "hygrometer": "percent"}
S = {"type": "string", "maxLength": 30}


def _person(rng: random.Random) -> tuple[dict, str, dict]:
    name, city, role = rng.choice(NAMES), rng.choice(CITIES), rng.choice(ROLES)
    age, active = rng.randint(18, 90), rng.random() < 0.5
    schema = {"type": "object", "properties": {
        "name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"type": "string", "enum": ROLES}, "active": {"type": "boolean"},
        "address": {"type": "object", "properties": {"city": S, "country": S}, "required": ["city", "country"]}},
        "required": ["name", "age", "role", "active", "address"]}
    text = (f"{name} is {age} years old and lives in {city}, {COUNTRIES[city]}. Their account role is {role}, "
            f"and the account is {'active' if active else 'not active'}.")
    return schema, text, {"name": name, "age": age, "role": role, "active": active,
                          "address": {"city": city, "country": COUNTRIES[city]}}


def _product(rng: random.Random) -> tuple[dict, str, dict]:
    name, cur = rng.choice(PRODUCTS), rng.choice(CURRENCIES)
    price = rng.randint(5, 400) + rng.choice([0.0, 0.5, 0.99])
    colours = sorted(rng.sample(COLOURS, rng.randint(1, 2)), key=COLOURS.index)
    stock = rng.random() < 0.5
    schema = {"type": "object", "properties": {
        "product": S, "price": {"type": "number", "minimum": 0, "maximum": 10000},
        "currency": {"type": "string", "enum": CURRENCIES},
        "colours": {"type": "array", "items": {"type": "string", "enum": COLOURS}, "maxItems": 3},
        "in_stock": {"type": "boolean"}}, "required": ["product", "price", "currency", "colours", "in_stock"]}
    text = (f"The {name} costs {price:g} {cur}. It comes in {' and '.join(colours)}, and it is "
            f"{'in stock' if stock else 'out of stock'}.")
    return schema, text, {"product": name, "price": price, "currency": cur, "colours": colours, "in_stock": stock}


def _event(rng: random.Random) -> tuple[dict, str, dict]:
    title, city, month = rng.choice(EVENTS), rng.choice(CITIES), rng.choice(MONTHS)
    year, people = rng.randint(1990, 2030), rng.randint(10, 500)
    schema = {"type": "object", "properties": {
        "event": S, "when": {"type": "object", "properties": {
            "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
            "month": {"type": "string", "enum": MONTHS}}, "required": ["year", "month"]},
        "city": S, "attendees": {"type": "integer", "minimum": 0, "maximum": 100000}},
        "required": ["event", "when", "city", "attendees"]}
    text = f"The {title} took place in {city} in {month} {year}, with {people} attendees."
    return schema, text, {"event": title, "when": {"year": year, "month": month}, "city": city, "attendees": people}


def _reading(rng: random.Random) -> tuple[dict, str, dict]:
    sensor = rng.choice(SENSORS)
    values = [float(rng.randint(0, 99)) for _ in range(rng.randint(1, 3))]
    schema = {"type": "object", "properties": {
        "sensor": {"type": "string", "enum": SENSORS}, "unit": {"type": "string", "enum": sorted(set(UNITS.values()))},
        "readings": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1000}, "maxItems": 3}},
        "required": ["sensor", "unit", "readings"]}
    text = (f"The {sensor} reported {', '.join(f'{v:g}' for v in values)} (in {UNITS[sensor]}).")
    return schema, text, {"sensor": sensor, "unit": UNITS[sensor], "readings": values}


KINDS = [_person, _product, _event, _reading]

TOOLS_SPEC = [
    ("get_weather", "Current weather in a city",
     {"type": "object", "properties": {"city": S, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
      "required": ["city", "unit"]}),
    ("convert_currency", "Convert an amount of money",
     {"type": "object", "properties": {"amount": {"type": "number", "minimum": 0, "maximum": 1000000},
                                       "source": {"type": "string", "enum": CURRENCIES},
                                       "target": {"type": "string", "enum": CURRENCIES}},
      "required": ["amount", "source", "target"]}),
    ("set_alarm", "Set an alarm clock",
     {"type": "object", "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23},
                                       "minute": {"type": "integer", "minimum": 0, "maximum": 59}},
      "required": ["hour", "minute"]}),
]


def _tool_request(rng: random.Random) -> tuple[str, str, dict]:
    k = rng.randrange(3)
    if k == 0:
        city, unit = rng.choice(CITIES), rng.choice(["celsius", "fahrenheit"])
        return f"What is the weather in {city} right now, in {unit}?", "get_weather", {"city": city, "unit": unit}
    if k == 1:
        amount = float(rng.randint(1, 900))
        src, dst = rng.sample(CURRENCIES, 2)
        return f"Convert {amount:g} {src} to {dst}.", "convert_currency", {"amount": amount, "source": src,
                                                                            "target": dst}
    hour, minute = rng.randint(0, 23), rng.choice([0, 15, 30, 45])
    return f"Set an alarm for {hour:02d}:{minute:02d}.", "set_alarm", {"hour": hour, "minute": minute}


def json_requests(n: int, seed: int = 0) -> list[tuple[dict, str, dict]]:
    """``n`` (schema, prompt, expected answer) triples, the kinds in turn, values from ``seed``."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        schema, facts, expected = KINDS[i % len(KINDS)](rng)
        prompt = (f"Extract the facts of this text into a JSON object matching this JSON schema:\n"
                  f"{json.dumps(schema)}\n\nText: {facts}\n\nAnswer with the JSON object only.")
        out.append((schema, prompt, expected))
    return out


def tool_requests(n: int, seed: int = 1) -> list[tuple[str, str, dict]]:
    rng = random.Random(seed)
    return [_tool_request(rng) for _ in range(n)]


def _leaves(value: Any, path: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _leaves(sub, f"{path}.{key}").items()}
    return {path: value}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= 1e-6
    if isinstance(a, str) and isinstance(b, str):
        return a.strip().lower() == b.strip().lower()
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return False


def field_score(got: Any, expected: dict) -> tuple[int, int]:
    """(right leaf fields, expected leaf fields); ``got`` None (invalid) scores 0."""
    want = _leaves(expected)
    have = _leaves(got) if isinstance(got, dict) else {}
    return sum(p in have and _same(have[p], v) for p, v in want.items()), len(want)


FENCE = re.compile(r"^\s*```(?:json)?\s*\n?(.*?)\n?```\s*$", re.S)


def read_json(text: str, schema: dict) -> Any:
    """The answer's JSON if it parses and validates (a fenced block unwrapped), else None."""
    import jsonschema

    m = FENCE.match(text)
    try:
        value = json.loads(m.group(1) if m else text)
        jsonschema.validate(value, schema)
    except (ValueError, jsonschema.ValidationError):
        return None
    return value


class Timer:
    """A ``propose`` hook that proposes nothing and notes when the first decode step ran (prefill done)."""

    def __init__(self):
        self.first: float | None = None

    def __call__(self, step: int, _logits) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        return None


def _run(stage, turns, **kw):
    t = Timer()
    r = stage.generate(turns, propose=t, temperature=0.0, seed=0, allowed_modalities=[], **kw)
    end = time.perf_counter()
    return r, max(0, r.completion_tokens - 1), end - (t.first or end)


class Side:
    def __init__(self):
        self.n = self.valid = self.right = self.fields = self.tokens = 0
        self.decode_s = 0.0
        self.finish: dict[str, int] = {}

    def add(self, ok: bool, score: tuple[int, int], finish: str, tokens: int, decode_s: float) -> None:
        self.n += 1
        self.valid += ok
        self.right += score[0]
        self.fields += score[1]
        self.finish[finish] = self.finish.get(finish, 0) + 1
        self.tokens += tokens
        self.decode_s += decode_s

    def summary(self) -> dict[str, Any]:
        return {"requests": self.n, "valid": self.valid, "valid_share": C.ratio(self.valid, self.n),
                "field_accuracy": C.ratio(self.right, self.fields), "finish_reasons": self.finish,
                "decode_tokens": self.tokens, "decode_s": self.decode_s,
                "tokens_per_s": C.ratio(self.tokens, self.decode_s)}


def bench_preset(name: str, n_json: int, n_tools: int, max_tokens_json: int, max_tokens_tools: int,
                 examples: list) -> dict[str, Any]:
    import jsonschema

    from polymodal.constrained import Tool, ToolChoice, parse_tool_calls
    from polymodal.pipeline import build_llm_stage
    from polymodal.types import TextPart, Turn

    t0 = time.perf_counter()
    stage = build_llm_stage(name)
    load_s = time.perf_counter() - t0
    sides = {(task, side): Side() for task in ("json", "tools") for side in ("constrained", "unconstrained")}
    for i, (schema, prompt, expected) in enumerate(json_requests(n_json)):
        if i % 10 == 0:
            print(f"{name}: json {i}/{n_json} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        turns = [Turn("user", (TextPart(prompt),))]
        rf = {"type": "json_schema", "json_schema": {"name": "facts", "schema": schema, "strict": True}}
        for side in ("constrained", "unconstrained"):  # interleaved: the machine's load hits both alike
            r, tokens, dt = _run(stage, turns, max_new_tokens=max_tokens_json,
                                 **({"response_format": rf} if side == "constrained" else {}))
            got = read_json(r.text, schema) if r.finish_reason == "stop" else None
            sides["json", side].add(got is not None, field_score(got, expected), r.finish_reason, tokens, dt)
            if i < 2:
                examples.append((name, "json", side, r.text, i + 1))
    tools = [Tool(n, p, description=d, strict=True) for n, d, p in TOOLS_SPEC]
    by_name = {t.name: t for t in tools}
    system = stage.tool_format.system_text(tools, base=stage.engine.chat_format.system)
    for i, (question, want_name, want_args) in enumerate(tool_requests(n_tools)):
        if i % 10 == 0:
            print(f"{name}: tools {i}/{n_tools} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        turns = [Turn("user", (TextPart(question),))]
        for side in ("constrained", "unconstrained"):
            if side == "constrained":
                r, tokens, dt = _run(stage, turns, max_new_tokens=max_tokens_tools, tools=tools,
                                     tool_choice=ToolChoice("required"), parallel_tool_calls=False)
                calls, ended = r.tool_calls, r.finish_reason == "tool_calls"
            else:
                r, tokens, dt = _run(stage, turns, max_new_tokens=max_tokens_tools, system=system)
                calls, ended = parse_tool_calls(r.text, stage.tool_format).calls, r.finish_reason == "stop"
            ok = ended and bool(calls)
            for c in calls:
                try:
                    jsonschema.validate(json.loads(c.arguments_json), by_name[c.name].parameters)
                except (KeyError, ValueError, jsonschema.ValidationError):
                    ok = False
            first = calls[0] if ok else None
            right = 0
            if first is not None and first.name == want_name:
                right = 1 + field_score(json.loads(first.arguments_json), want_args)[0]
            sides["tools", side].add(ok, (right, 1 + len(want_args)), r.finish_reason, tokens, dt)
            if i < 2:
                shown = r.text if side == "unconstrained" else json.dumps(
                    [{"name": c.name, "arguments": json.loads(c.arguments_json)} for c in calls])
                examples.append((name, "tools", side, shown, i + 1))
    out = {"load_s": load_s}
    for (task, side), s in sides.items():
        out.setdefault(task, {})[side] = s.summary()
    for task in ("json", "tools"):
        out[task]["slowdown_x"] = C.ratio(out[task]["unconstrained"]["tokens_per_s"],
                                          out[task]["constrained"]["tokens_per_s"])
    return out


def main() -> None:
    p = C.base_parser(__doc__.split("\n")[0])
    p.add_argument("--presets", default=None, help="comma-separated (default smol,tiny; --quick: tiny)")
    p.add_argument("--requests", type=int, default=None, help="JSON requests per preset (default 200; --quick 4)")
    p.add_argument("--tool-requests", type=int, default=None, help="tool-call requests (default 100; --quick 3)")
    p.add_argument("--max-tokens-json", type=int, default=200)
    p.add_argument("--max-tokens-tools", type=int, default=120)
    a = p.parse_args()
    C.one_thread()
    presets = (a.presets or ("tiny" if a.quick else "smol,tiny")).split(",")
    n_json = a.requests if a.requests is not None else (4 if a.quick else 200)
    n_tools = a.tool_requests if a.tool_requests is not None else (3 if a.quick else 100)
    results: dict[str, Any] = {"requests": n_json, "tool_requests": n_tools, "presets": {}, "examples": []}
    examples: list = []
    for name in presets:
        results["presets"][name] = bench_preset(name, n_json, n_tools, a.max_tokens_json, a.max_tokens_tools,
                                                examples)
    results["examples"] = [dict(zip(("preset", "task", "side", "answer", "request"), e)) for e in examples]
    rows = []
    for name, r in results["presets"].items():
        for task in ("json", "tools"):
            c, u = r[task]["constrained"], r[task]["unconstrained"]
            rows.append([name, task, c["requests"], f"{c['valid_share']:.1%}", f"{u['valid_share']:.1%}",
                         f"{c['field_accuracy']:.1%}", f"{u['field_accuracy']:.1%}", c["tokens_per_s"],
                         u["tokens_per_s"], r[task]["slowdown_x"]])
    C.print_table(f"Structured outputs, greedy, with vs without the grammar ({n_json} JSON, {n_tools} tool requests)",
                  ["preset", "task", "n", "valid (mask)", "valid (none)", "fields (mask)", "fields (none)",
                   "tok/s (mask)", "tok/s (none)", "slowdown x"], rows)
    for e in results["examples"]:
        print(f"  e.g. {e['preset']} {e['task']} #{e['request']} {e['side']}: {e['answer'][:160]!r}")
    C.finish(results, a.out)


if __name__ == "__main__":
    main()
