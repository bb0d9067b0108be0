"""The llguidance glue: vocabularies, compile cache, masks against what the matcher accepts, mask application."""

from __future__ import annotations

import json

import pytest
import torch

from souverain.engine.grammar import GrammarCompiler, GrammarError, MaskComputer
from souverain.engine.sampling import apply_mask
from souverain.tokenizer import load_tokenizer
from tests.engine.toy import EOS, ByteTokenizer
from tests.tokenizer.mistral_files import mistral_file

SCHEMA = {"type": "object", "properties": {"k": {"enum": ["yes", "no"]}, "n": {"type": "integer", "minimum": 1,
                                                                              "maximum": 3}},
          "required": ["k", "n"], "additionalProperties": False}


def test_compiled_grammars_are_cached_by_hash() -> None:
    c = GrammarCompiler(ByteTokenizer(), 258)
    a, b = c.json_schema(SCHEMA), c.json_schema(json.loads(json.dumps(SCHEMA)))
    assert a is b and a.key == b.key
    assert c.json_schema({**SCHEMA, "required": ["k"]}) is not a
    m1, m2 = a.matcher(), a.matcher()
    assert m1.consume_tokens(list(b'{"k": "no"'))
    assert m2.consume_tokens(list(b'{"k": "yes"')) and not m2.is_error()  # each sequence has its own state


@pytest.mark.parametrize("schema, word", [({"type": "object", "properties": {"x": {"not": {}}}}, "not"),
                                          ({"type": "string", "pattern": "(?<=a)b"}, "look"),
                                          ({"type": "bogus"}, "bogus")])
def test_unsupported_schemas_name_the_problem(schema: dict, word: str) -> None:
    with pytest.raises(GrammarError, match=word):
        GrammarCompiler(ByteTokenizer(), 258).json_schema(schema)


def test_masks_allow_exactly_what_the_matcher_accepts() -> None:
    grammar = GrammarCompiler(ByteTokenizer(), 258).json_schema(SCHEMA)
    masks = MaskComputer(258)
    prefixes = [b"", b'{"k"', b'{"k": "y', b'{"k": "yes", "n": ', b'{"k":"no","n":2}']
    matchers = [grammar.matcher() for _ in prefixes]
    for m, p in zip(matchers, prefixes, strict=True):
        assert m.consume_tokens(list(p))
    allowed = masks.allowed(masks.compute(matchers, masks.buffer(len(matchers))))
    assert allowed.shape == (len(prefixes), 258)
    for row, m in enumerate(matchers):
        for token in range(256 if m.is_stopped() else 258):
            trial = m.deep_copy()
            assert bool(allowed[row, token]) == (trial.try_consume_tokens([token]) == 1), (prefixes[row], token)
    assert allowed[2].nonzero().flatten().tolist() == [ord("e")]
    assert allowed[3].nonzero().flatten().tolist() == [ord(c) for c in "123"]
    assert allowed[4].nonzero().flatten().tolist() == [EOS]  # complete: only the end


def test_apply_mask_touches_only_constrained_rows() -> None:
    logits = torch.randn(3, 10, dtype=torch.bfloat16)
    allowed = torch.zeros(1, 10, dtype=torch.bool)
    allowed[0, [2, 7]] = True
    out = apply_mask(logits.clone(), torch.tensor([1]), allowed)
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert torch.isinf(out[1]).sum() == 8 and out[1, 2] == logits[1, 2] and out[1, 7] == logits[1, 7]
    every = apply_mask(logits.clone(), torch.tensor([0, 1, 2]), allowed.expand(3, 10))
    assert torch.isinf(every).sum() == 24


@pytest.mark.parametrize("version", ["v3", "v7", "tekken"])
def test_mistral_vocabularies_spell_their_text(version: str) -> None:
    """Each id's bytes (what the grammar matches) concatenate to the decoded text; control tokens are special."""
    tok = load_tokenizer(mistral_file(version))
    table = tok.token_bytes()  # type: ignore[attr-defined]
    assert len(table) == tok.vocab_size
    text = 'Il fait 21 °C à Paris: {"ok": true} 日本'
    ids = tok.encode(text, add_special=False)
    assert b"".join(table[i] for i in ids).decode().strip() == text
    call = tok.special_id("[TOOL_CALLS]")  # type: ignore[attr-defined]
    assert call is not None and table[call] == b"\xff[TOOL_CALLS]"
    # Spell a valid document through the masks alone: the longest allowed token each step (this crosses
    # the text llguidance forces and tokenises itself, e.g. the rest of a property name).
    grammar = GrammarCompiler(tok, tok.vocab_size).json_schema(SCHEMA)
    masks, m, rest = MaskComputer(tok.vocab_size), grammar.matcher(), b'{"k": "no", "n": 3}'
    while rest:
        allowed = masks.allowed(masks.compute([m], masks.buffer(1)))[0].nonzero().flatten().tolist()
        token = max((i for i in allowed if rest.startswith(table[i]) and table[i]), key=lambda i: len(table[i]))
        assert m.consume_token(token), m.get_error()
        rest = rest[len(table[token]):]
    assert m.is_accepting()
