"""A model that plays back a fixed answer, slowly: the browser tests need known markdown (a table, code, raw
HTML meant to attack the page) streamed token by token through the real engine and API.

The weights do nothing; `forward` maps each input token to its successor in the script, so generation is
deterministic whatever the sampling settings, and each step sleeps so a test can watch and stop a stream.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from souverain.model import ModelArgs, Transformer

ANSWER = [
    "Here", " is", " a", " table", ":\n\n",
    "| city | country |\n", "|---|---|\n", "| Paris | France |\n", "| Rome | Italy |\n\n",
    "And", " some", " code", ":\n\n",
    "```python\n", "def ", "greet", "(name):\n", "    return ", "f\"Hello, {name}\"\n", "```\n\n",
    "Raw", " HTML", " stays", " text", ": ",
    "<script>window.__pwned = 1</script>", " and ", "<img src=x onerror=\"window.__pwned = 2\">", "\n\n",
    *[f" word{i}" for i in range(40)], ".",
]
BOS, EOS, START = 256, 257, 258
FIRST = 259


class ScriptTokenizer:
    """Bytes for what users type; one token per piece of the scripted answer."""

    vocab_size = FIRST + len(ANSWER)
    bos_id = BOS
    eos_ids = frozenset([EOS])

    def encode(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return ([BOS] if add_special else []) + list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        out, raw = [], bytearray()
        for i in ids:
            if i < 256:
                raw.append(i)
                continue
            out.append(raw.decode("utf-8", errors="replace"))
            raw.clear()
            if i >= FIRST:
                out.append(ANSWER[i - FIRST])
        out.append(raw.decode("utf-8", errors="replace"))
        return "".join(out)

    def is_special(self, token_id: int) -> bool:
        return token_id in (BOS, EOS, START)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
                            tools: Any = None) -> list[int]:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return self.encode(text) + ([START] if add_generation_prompt else [])


class ScriptedModel(Transformer):
    def __init__(self, delay: float = 0.06) -> None:
        super().__init__(ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=32,
                                   vocab_size=ScriptTokenizer.vocab_size, max_seq_len=4096))
        self.delay = delay

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, kv: Any = None,
                output_rows: torch.Tensor | None = None, lora: Any = None, ops: Any = None,
                prompt: Any = None) -> torch.Tensor:
        time.sleep(self.delay)
        flat = tokens.reshape(-1)
        last = flat[output_rows] if output_rows is not None else flat
        nxt = torch.where(last == START, torch.tensor(FIRST), last + 1)
        nxt = torch.where((last < FIRST) & (last != START), torch.tensor(EOS), nxt)
        nxt = torch.where(nxt >= ScriptTokenizer.vocab_size, torch.tensor(EOS), nxt)
        logits = torch.full((last.numel(), ScriptTokenizer.vocab_size), -1e4)
        logits[torch.arange(last.numel()), nxt] = 0.0
        return logits
