"""The JSON-object recogniser: accepts every prefix of valid objects, rejects every invalid step."""

from __future__ import annotations

import json

import pytest

from souverain.engine.json_mode import JsonPrefix

VALID = ['{}', '{"a": 1}', '{"a": [1, 2.5, -3e+2, 0, -0.1E-7], "b": {"c": null, "d": true, "e": false}}',
         '{"s": "quote \\" backslash \\\\ unicode \\u00e9 tab \\t", "é": "日本"}', '{ "x" : [ ] , "y" : { } }',
         '{"nested": [[[{"deep": [{}]}]]]}', '\n{"a":"b"}\n']
INVALID = ['[1, 2]', '"text"', '{"a" 1}', '{"a": 01}', '{"a": 1,}', '{,}', '{"a": tru}', '{"a": .5}',
           '{"a": 1}}', '{"a": 1} x', '{"a": "\x01"}', '{"a": "\\x"}', '{"a": -}', '{"a": 1.}', '{a: 1}',
           '{"a": [1 2]}', '{"a": nul1}', '{"a": 1e}']


@pytest.mark.parametrize("text", VALID)
def test_valid_objects_are_accepted_and_complete(text: str) -> None:
    json.loads(text)
    p = JsonPrefix()
    for ch in text:
        assert p.feed_text(ch), (text, ch)
    assert p.done


@pytest.mark.parametrize("text", INVALID)
def test_invalid_text_is_rejected_somewhere(text: str) -> None:
    with pytest.raises(ValueError):
        obj = json.loads(text)
        if not isinstance(obj, dict):
            raise ValueError("not an object")
    p = JsonPrefix()
    assert not (all(p.feed_text(ch) for ch in text) and p.done)


def test_failed_feed_leaves_state_untouched() -> None:
    p = JsonPrefix()
    assert p.feed_text('{"a": ')
    assert not p.feed_text("1]")
    assert p.feed_text("1}") and p.done


@pytest.mark.parametrize("text", VALID)
def test_every_prefix_can_be_closed(text: str) -> None:
    for cut in range(len(text)):
        p = JsonPrefix()
        assert p.feed_text(text[:cut])
        ending = p.closing()
        assert p.feed_text(ending) and p.done, (text[:cut], ending)
        json.loads(text[:cut] + ending)
