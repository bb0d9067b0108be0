"""Fine-tuning data: validation names lines; the loss mask covers exactly the assistant turns that count."""

from __future__ import annotations

import json
from pathlib import Path

from souverain.tokenizer import load_tokenizer
from souverain.train.data import Example, pack, tokenize, validate_jsonl


def lines(*objs: object) -> bytes:
    return "\n".join(json.dumps(o) for o in objs).encode()


def test_validation_reports_each_bad_line() -> None:
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    raw = lines(good, {"messages": []}, {"prompt": "x"}) + b"\n{nope\n" + lines(
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 2}]},
        {"messages": [{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}]})
    v = validate_jsonl(raw)
    assert not v.ok and len(v.samples) == 1
    assert [e.split(":")[0] for e in v.errors] == ["line 2", "line 3", "line 4", "line 5", "line 6"]
    assert "weight must be 0 or 1" in v.errors[3] and "last message" in v.errors[4]
    assert validate_jsonl(b"\xff\xfe").errors == ["the file is not UTF-8 (byte 0)"]
    assert "mixes" in validate_jsonl(lines(good, {"text": "t"})).errors[-1]
    assert validate_jsonl(lines({"text": "hello"})).kind == "pretrain"


def test_mask_is_the_assistant_turns(smollm2_path: Path) -> None:
    tok = load_tokenizer(smollm2_path)
    sample = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "First?"},
        {"role": "assistant", "content": "Shown, not learned.", "weight": 0},
        {"role": "user", "content": "Second?"},
        {"role": "assistant", "content": "Learned answer."},
    ]}
    ex = tokenize(sample, tok)
    assert ex.ids == tok.apply_chat_template(sample["messages"], add_generation_prompt=False)
    learned = tok.decode([t for t, m in zip(ex.ids, ex.mask, strict=True) if m], skip_special=False)
    assert learned.startswith("Learned answer.") and "Shown" not in learned and "Second" not in learned
    assert learned.strip().endswith("<|im_end|>")  # the model learns to stop, too


def test_packing_keeps_every_token_and_its_mask() -> None:
    exs = [Example([1, 2, 3], [0, 1, 1]), Example([4, 5], [0, 1]), Example(list(range(10, 19)), [1] * 9)]
    packed = pack(exs, seq_len=6)
    assert [e.ids for e in packed] == [[1, 2, 3, 4, 5], [10, 11, 12, 13, 14, 15]]  # the long one is cut
    assert packed[0].mask == [0, 1, 1, 0, 1]
