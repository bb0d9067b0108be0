"""Fuzz the HTTP API with schemathesis against its own /openapi.json (not part of the default suite).

Run: .venv/bin/pip install schemathesis && .venv/bin/python scripts/fuzz_api.py [--examples 200]

Serves a tiny random-weight model (Mistral v3 tokenizer, so FIM is exercised too) and the packaged
minilm embedder on a free loopback port, runs every operation with generated inputs, and fails on
any 5xx; then checks that /health still answers 200.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch
import uvicorn

from souverain.db.bootstrap import bootstrap
from souverain.db.database import open_database, sqlite_url
from souverain.embed import Embedder
from souverain.engine.async_engine import AsyncEngine
from souverain.engine.engine import EngineConfig, LLMEngine
from souverain.hub import pull_packaged_model
from souverain.model import ModelArgs, Transformer
from souverain.server.app import create_app
from souverain.server.registry import LoadedEmbedder, LoadedModel, Registry
from souverain.server.settings import Settings
from souverain.tokenizer.mistral import MistralTokenizer

KEY = "sk-fuzz"


def registry() -> Registry:
    import mistral_common

    from souverain.hub.describe import describe

    data = __import__("pathlib").Path(mistral_common.__file__).parent / "data"
    tok = MistralTokenizer(data / "mistral_instruct_tokenizer_240323.model.v3")
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=32768,
                                  max_seq_len=256)).eval()
    reg = Registry()
    engine = LLMEngine(model, tok, EngineConfig(kv_cache_memory=16 << 20, max_waiting=64))
    reg.add(LoadedModel("tiny", AsyncEngine(engine), tok, {"capabilities": ["chat", "fim"]}))
    minilm = pull_packaged_model("minilm")
    reg.add_embedder(LoadedEmbedder("minilm", Embedder(minilm), describe(minilm)))
    return reg


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=200)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reg = registry()
    # With the platform database: admin, files, fine-tuning and chat-app routes are fuzzed too.
    tmp = Path(tempfile.mkdtemp(prefix="souverain-fuzz-"))
    db = open_database(sqlite_url(tmp / "souverain.db"))
    bootstrap(db)
    settings = Settings(port=port, api_keys=[KEY], data_dir=str(tmp / "data"))
    server = uvicorn.Server(uvicorn.Config(create_app(settings, reg, db), host="127.0.0.1",
                                           port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    done = subprocess.run([sys.executable, "-m", "schemathesis.cli", "run", f"{base}/openapi.json",
                           "--max-examples", str(args.examples), "--checks", "not_a_server_error",
                           "--header", f"Authorization: Bearer {KEY}"], check=False)
    with urllib.request.urlopen(f"{base}/health", timeout=10) as r:
        healthy = r.status == 200
    print(f"schemathesis exit code {done.returncode}; /health afterwards: {'200' if healthy else 'FAILED'}")
    server.should_exit = True
    reg.shutdown()
    return 0 if done.returncode == 0 and healthy else 1


if __name__ == "__main__":
    raise SystemExit(main())
