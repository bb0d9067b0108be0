"""The SmolLM2 server the API tests share (one per test package run: loading the model takes seconds)."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from souverain.embed import Embedder
from souverain.engine.async_engine import AsyncEngine
from souverain.engine.engine import EngineConfig, LLMEngine
from souverain.server.app import create_app
from souverain.server.loader import freeze_heap
from souverain.server.registry import LoadedEmbedder, LoadedModel, Registry
from souverain.server.settings import Settings

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

KEY = "sk-test-key"


def serve_smollm2(smollm2_path: Path, minilm_path: Path) -> Iterator[str]:
    import torch

    from souverain import load_model, load_tokenizer
    from souverain.hub.describe import describe
    from souverain.kernels.backend import choose
    from souverain.model.quant import prepare, quantize

    backend = choose()
    model = prepare(quantize(load_model(smollm2_path, dtype=torch.bfloat16), bits=4), backend)
    tok = load_tokenizer(smollm2_path)
    registry = Registry()
    info = describe(smollm2_path)
    for name, waiting in (("smollm2", 64), ("busy", 0)):
        engine = AsyncEngine(LLMEngine(model, tok, EngineConfig(kv_cache_memory=256 << 20, max_waiting=waiting),
                                       backend=backend))
        registry.add(LoadedModel(name, engine, tok, info))
    registry.add_embedder(LoadedEmbedder("minilm", Embedder(minilm_path), describe(minilm_path)))
    # A tiny random model with Mistral's v3 tokenizer: FIM and tool-call plumbing (its words are noise).
    from souverain.model import ModelArgs, Transformer
    from tests.tokenizer.mistral_files import mistral_file

    torch.manual_seed(0)
    tiny = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=32768,
                                 max_seq_len=512)).eval()
    v3 = load_tokenizer(mistral_file("v3"))
    registry.add(LoadedModel("tiny-fim", AsyncEngine(LLMEngine(tiny, v3, EngineConfig(kv_cache_memory=8 << 20),
                                                               backend=backend)), v3,
                             {"capabilities": ["chat", "fim"], "architecture": "mistral"}))
    # And one with a tekken tokenizer (131k vocabulary): Mistral's tool-call format on both tokenizer kinds.
    tekken = load_tokenizer(mistral_file("tekken"))
    torch.manual_seed(0)
    tiny_tekken = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=128,
                                        vocab_size=tekken.vocab_size, max_seq_len=512)).eval()
    registry.add(LoadedModel("tiny-tekken", AsyncEngine(LLMEngine(tiny_tekken, tekken, EngineConfig(
        kv_cache_memory=8 << 20), backend=backend)), tekken, {"capabilities": ["chat"], "architecture": "mistral"}))
    freeze_heap()  # as `souverain serve` does once its models are loaded
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(Settings(port=port, api_keys=[KEY]), registry)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)
    registry.shutdown()


def call(url: str, path: str, body: dict[str, Any] | None = None, key: str | None = KEY,
         headers: dict[str, str] | None = None) -> tuple[int, Any, str]:
    h = {"Content-Type": "application/json", **(headers or {})}
    if key:
        h["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + path, data=json.dumps(body).encode() if body is not None else None, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


