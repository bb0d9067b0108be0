"""Sentence embeddings: tokenizer + encoder + pooling, as sentence-transformers computes them."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch
from tokenizers import Tokenizer as RawTokenizer

from souverain.model.encoder import Encoder, mean_pool
from souverain.tokenizer.hf import hf_tokenizer_from_folder
from souverain.weights.encoder import load_encoder


class Embedder:
    def __init__(self, folder: Path, *, batch_size: int = 32) -> None:
        self.folder = Path(folder)
        self.tokenizer = hf_tokenizer_from_folder(self.folder)
        self.model: Encoder = load_encoder(self.folder)
        st = self.folder / "sentence_bert_config.json"
        self.max_len = int(json.loads(st.read_text()).get("max_seq_length", 512)) if st.exists() else 512
        self.max_len = min(self.max_len, self.model.args.max_positions)
        modules = self.folder / "modules.json"
        self.normalize = modules.exists() and "Normalize" in modules.read_text()
        pooling = self.folder / "1_Pooling" / "config.json"
        if pooling.exists() and not json.loads(pooling.read_text()).get("pooling_mode_mean_tokens", True):
            raise ValueError(f"{pooling}: only mean pooling is supported")
        self.batch_size = batch_size
        self.dim = self.model.args.dim
        # Truncation as sentence-transformers does it: the special tokens ([CLS] ... [SEP]) stay.
        self._raw = RawTokenizer.from_str(self.tokenizer.raw.to_str())
        self._raw.enable_truncation(self.max_len)
        self._lock = threading.Lock()

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._raw.encode_batch(texts, add_special_tokens=True)]

    def count_tokens(self, texts: list[str]) -> int:
        return sum(len(x) for x in self._ids(texts))

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """[N, D] float32 embeddings (unit length when the model normalises)."""
        out = []
        with self._lock:
            for i in range(0, len(texts), self.batch_size):
                ids = self._ids(texts[i : i + self.batch_size])
                width = max(len(x) for x in ids)
                tokens = torch.tensor([x + [0] * (width - len(x)) for x in ids])
                mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
                out.append(mean_pool(self.model(tokens, mask), mask, self.normalize))
        return torch.cat(out).float()
