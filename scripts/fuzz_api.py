"""Fuzz the HTTP API with schemathesis against its own /openapi.json (not part of the default suite).

Run: .venv/bin/pip install schemathesis && .venv/bin/python scripts/fuzz_api.py [--examples 60]

Serves a tiny random-weight model (Mistral v3 tokenizer, so FIM is exercised too) and the packaged
minilm embedder, with the platform database, on a free loopback port. Runs every operation with generated
inputs twice: with the operator's static key and with an organisation's key (the first-start owner's).
Every request and answer is recorded (HAR) and counted by status; the run fails on any 5xx, on fewer than
`--min-total` requests, or when /health no longer answers 200 afterwards.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import torch
import uvicorn

from souverain.db.bootstrap import bootstrap
from souverain.db.database import open_database, sqlite_url
from souverain.embed import Embedder
from souverain.engine.async_engine import AsyncEngine
from souverain.engine.engine import EngineConfig, LLMEngine
from souverain.hub import pull_packaged_model
from souverain.kernels.backend import choose
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
    engine = LLMEngine(model, tok, EngineConfig(kv_cache_memory=16 << 20, max_waiting=64), backend=choose())
    reg.add(LoadedModel("tiny", AsyncEngine(engine), tok, {"capabilities": ["chat", "fim"]}))
    minilm = pull_packaged_model("minilm")
    reg.add_embedder(LoadedEmbedder("minilm", Embedder(minilm), describe(minilm)))
    return reg


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=60, help="test cases per operation and key")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--min-total", type=int, default=2000, help="fail below this many requests in all")
    parser.add_argument("--quiet", action="store_true", help="only the counts, not schemathesis' own report")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reg = registry()
    # With the platform database: admin, files, fine-tuning and chat-app routes are fuzzed too.
    tmp = Path(tempfile.mkdtemp(prefix="souverain-fuzz-"))
    db = open_database(sqlite_url(tmp / "souverain.db"))
    first = bootstrap(db)
    settings = Settings(port=port, api_keys=[KEY], data_dir=str(tmp / "data"))
    server = uvicorn.Server(uvicorn.Config(create_app(settings, reg, db), host="127.0.0.1",
                                           port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    with urllib.request.urlopen(f"{base}/openapi.json", timeout=10) as r:
        paths = json.loads(r.read())["paths"]
    templates = sorted(paths, key=lambda t: (t.count("{"), -len(t)))
    documented = {f"{m.upper()} {t}" for t, ops in paths.items() for m in ops}
    failures = 0
    total = 0
    for who, key in (("operator key", KEY), ("organisation key", first.api_key if first else KEY)):
        har = tmp / f"{who.split()[0]}.har"
        done = subprocess.run([sys.executable, "-m", "schemathesis.cli", "run", f"{base}/openapi.json",
                               "--max-examples", str(args.examples), "--checks", "not_a_server_error",
                               "--header", f"Authorization: Bearer {key}", "--seed", str(args.seed),
                               "--report", "har", "--report-har-path", str(har), "--no-shrink"],
                              check=False, stdout=subprocess.DEVNULL if args.quiet else None)
        counts = status_counts(har, templates)
        n = sum(c for by in counts.values() for c in by.values())
        total += n
        errors = sum(c for by in counts.values() for s, c in by.items() if s >= 500)
        failures += errors + (done.returncode != 0)
        hit = documented & set(counts)
        probes = sum(sum(by.values()) for op, by in counts.items() if op not in documented)
        print(f"{who}: {n} requests, {n - probes} to {len(hit)} of the {len(documented)} documented operations and "
              f"{probes} probing other methods or paths; statuses "
              f"{dict(sorted(Counter(s for by in counts.values() for s in by.elements()).items()))}; "
              f"5xx: {errors}; schemathesis exit code {done.returncode}")
        if documented - hit:
            print(f"  never reached: {', '.join(sorted(documented - hit))}")
        for op, by in sorted(counts.items()):
            if any(s >= 500 for s in by):
                print(f"  5xx on {op}: {dict(by)}")
    with urllib.request.urlopen(f"{base}/health", timeout=10) as r:
        healthy = r.status == 200
    print(f"in all: {total} requests; /health afterwards: {'200' if healthy else 'FAILED'}")
    server.should_exit = True
    reg.shutdown()
    return 0 if failures == 0 and healthy and total >= args.min_total else 1


def _pattern(template: str) -> re.Pattern[str]:
    """/v1/files/{file_id} -> a regex for its concrete paths ({name:path} spans slashes)."""
    parts = re.split(r"(\{[^}]+\})", template)
    body = "".join((".+" if p.endswith(":path}") else "[^/]+") if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(f"^{body}$")


def status_counts(har: Path, templates: list[str]) -> dict[str, Counter[int]]:
    """operation ("POST /v1/files/{file_id}") -> statuses, from a HAR recording."""
    patterns = [(t, _pattern(t)) for t in templates]
    out: dict[str, Counter[int]] = {}
    if not har.exists():
        return out
    for entry in json.loads(har.read_text()).get("log", {}).get("entries", []):
        path = urllib.parse.unquote(urllib.parse.urlsplit(entry["request"]["url"]).path)
        template = next((t for t, p in patterns if p.match(path)), path)
        op = f"{entry['request']['method']} {template}"
        out.setdefault(op, Counter())[int(entry["response"]["status"])] += 1
    return out


if __name__ == "__main__":
    raise SystemExit(main())
