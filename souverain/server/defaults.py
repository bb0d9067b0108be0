"""A model's own defaults (from its Modelfile: `souverain create`) applied to what a request leaves out."""

from __future__ import annotations

from typing import Any, TypeVar

from souverain.server.protocol.chat import ChatCompletionRequest, Message, Sampling
from souverain.server.registry import LoadedModel

R = TypeVar("R", bound=Sampling)
_SAME = {"max_tokens": "max_completion_tokens", "seed": "random_seed"}  # a request setting either sets both


def with_defaults(req: R, model: LoadedModel) -> R:
    """The request with the model's default parameters where it set none, and (chat) the model's system
    message when it sends none, after which its MESSAGE turns come before the request's."""
    defaults = model.defaults
    if not defaults:
        return req
    given = req.model_fields_set
    update: dict[str, Any] = {k: v for k, v in defaults.get("parameters", {}).items()
                              if k in Sampling.model_fields and k not in given and _SAME.get(k) not in given}
    default_max = update.pop("max_tokens", None)  # kept aside: the prompt's room caps it (as Ollama's num_predict)
    if isinstance(req, ChatCompletionRequest) and ("system" in defaults or "messages" in defaults):
        messages = list(req.messages)
        if messages[0].role in ("system", "developer"):  # the request's own system message wins
            head, rest = messages[:1], messages[1:]
        else:
            head = [Message(role="system", content=defaults["system"])] if "system" in defaults else []
            rest = messages
        turns = [Message(role=m["role"], content=m["content"]) for m in defaults.get("messages", [])]
        update["messages"] = head + turns + rest
    out = req.model_copy(update=update)
    out._default_max_tokens = default_max
    return out
