"""A created model's defaults under what a request sends; serve's sizes."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from souverain.server.defaults import with_defaults
from souverain.server.protocol.chat import ChatCompletionRequest, CompletionRequest
from souverain.server.settings import parse_size

PIRATE = {"system": "You are a pirate.", "parameters": {"temperature": 0.0, "max_tokens": 6, "stop": ["Captain"],
                                                        "top_k": 4, "context": 512},
          "messages": [{"role": "user", "content": "Ahoy"}, {"role": "assistant", "content": "Arr"}]}


def _apply(body: dict[str, Any], kind: type = ChatCompletionRequest) -> Any:
    return with_defaults(kind.model_validate({"model": "pirate", **body}), SimpleNamespace(defaults=PIRATE))  # type: ignore[arg-type]


def test_defaults_fill_only_what_the_request_left_out() -> None:
    req = _apply({"messages": [{"role": "user", "content": "hi"}], "temperature": 0.9})
    assert [(m.role, m.content) for m in req.messages] == [("system", "You are a pirate."), ("user", "Ahoy"),
                                                          ("assistant", "Arr"), ("user", "hi")]
    assert req.temperature == 0.9 and req.stop == ["Captain"] and req.top_k == 4
    assert req.max_tokens is None and req._default_max_tokens == 6  # capped by the prompt's room, never a 400
    assert "context" not in req.model_dump()  # num_ctx sets the served context, not a request field


def test_the_requests_own_system_message_and_limits_win() -> None:
    req = _apply({"messages": [{"role": "system", "content": "Be formal."}, {"role": "user", "content": "hi"}],
                  "max_completion_tokens": 50, "stop": []})
    assert [m.content for m in req.messages] == ["Be formal.", "Ahoy", "Arr", "hi"]
    assert req.max_tokens is None and req.max_completion_tokens == 50 and req.stop == []
    assert req._default_max_tokens is None


def test_text_completions_take_the_parameters_only() -> None:
    req = _apply({"prompt": "Once"}, CompletionRequest)
    assert req.prompt == "Once" and req._default_max_tokens == 6 and req.temperature == 0.0


@pytest.mark.parametrize(("text", "size"), [("1073741824", 1 << 30), ("2GiB", 2 << 30), ("512 MiB", 512 << 20),
                                            ("1.5G", 1_500_000_000), ("800MB", 800_000_000), ("64k", 64_000)])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "2 GiBs", "lots", "-1G", "1e9"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_a_default_num_predict_is_fitted_to_the_room_a_caller_max_tokens_is_not() -> None:
    from souverain.server.errors import APIError
    from souverain.server.generation import sampling_params

    model = SimpleNamespace(max_context=100, engine=SimpleNamespace(engine=SimpleNamespace(
        args=SimpleNamespace(vocab_size=258))))
    req = _apply({"messages": [{"role": "user", "content": "hi"}]})
    req._default_max_tokens = 64
    assert sampling_params(req, model, 90, None).max_tokens == 10  # type: ignore[arg-type]
    assert sampling_params(req, model, 10, None).max_tokens == 64  # type: ignore[arg-type]
    asked = _apply({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 64})
    with pytest.raises(APIError, match="exceeds"):
        sampling_params(asked, model, 90, None)  # type: ignore[arg-type]
