"""The `souverain` command: the one place that wires the packages together."""

from __future__ import annotations

import errno
import os
import socket
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from souverain import cli_client, cli_finetune, cli_platform, cli_run, cli_store
from souverain.cli_common import DTYPES, err, errors, fail, out, pull_with_progress
from souverain.cli_platform import Db, default_db_url

app = typer.Typer(help="Souverain: self-hosted, open-weight AI.", no_args_is_help=True, add_completion=False)



def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("souverain")
        except PackageNotFoundError:
            number = "unknown (not installed)"
        out.print(f"souverain {number}", highlight=False)
        raise typer.Exit()


@app.callback()
def _process(
    show_version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Print the version and exit")] = False,
) -> None:
    """Souverain: self-hosted, open-weight AI."""
    # Before torch loads OpenMP (commands import it lazily): its idle threads sleep at once instead of
    # spinning for a while after each parallel op, which took the cores from the kernels' own pool
    # (souverain/kernels/pool.cpp) mid-step: SmolLM2's decode on the main thread (`run`) went from ~80 to
    # ~130 tok/s. An OMP_WAIT_POLICY the user set is kept.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # PyTorch's allocator asks for transparent huge pages (2 MB) for its tensors of 2 MB and more (the
    # weights, the KV cache) where the kernel leaves THP to madvise, as most distributions do: attention
    # reads a sequence's KV blocks wherever the pool put them and each 4 KB page cost a TLB miss. A
    # 32-stream SmolLM2 run in one process, alternating processes with and without: 404/529/495 against
    # 379/431/469 tok/s, the decode steps 13-17% faster. A value the user set is kept ("0": off).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


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


def _config_file(ctx: typer.Context, value: Path | None) -> Path | None:
    """`--config FILE.yaml`: serve's options as a YAML mapping (`max-model-len: 4096` or `max_model_len: 4096`),
    as `vllm serve --config`; the command line and the environment win over it."""
    if value is None:
        return None
    import yaml

    try:
        data = yaml.safe_load(value.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise typer.BadParameter(f"cannot read {value}: {e}") from None
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{value} must hold a mapping of option names to values")
    mapping = {str(k).replace("-", "_"): v for k, v in data.items()}
    known = {p.name for p in ctx.command.params if p.name} - {"config"}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise typer.BadParameter(f"{value}: unknown option(s) {', '.join(unknown)}; see `souverain serve --help`")
    ctx.default_map = {**(ctx.default_map or {}), **mapping}
    return value


def _names(values: list[str] | None) -> list[str]:
    """Repeated options or one value of several: `a,b`, `a b`, or a JSON list `["a", "b"]` (vLLM's form)."""
    import json

    out: list[str] = []
    for value in values or []:
        value = value.strip()
        if value.startswith("["):
            try:
                out += [str(v) for v in json.loads(value)]
            except ValueError:
                raise typer.BadParameter(f"{value!r} is not a JSON list") from None
        else:
            out += [v for v in value.replace(",", " ").split() if v]
    return out


def _template(value: str | None) -> str | None:
    """--chat-template: a file holding a Jinja template, or the template itself."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if "{" not in value:
        try:
            value = path.read_text(encoding="utf-8")
        except OSError as e:
            raise fail(f"--chat-template: cannot read {path}: {e.strerror or e}") from None
    from souverain.tokenizer.chat import ChatTemplateError, render_chat

    try:
        render_chat(value, [{"role": "user", "content": "u"}], add_generation_prompt=True, bos_token="", eos_token="")
    except ChatTemplateError as e:
        raise fail(f"--chat-template: {e}") from None
    return value


@app.command()
def serve(
    host: Annotated[str, typer.Option(envvar="SOUVERAIN_HOST", help="Address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="SOUVERAIN_PORT", help="Port to bind")] = 8000,
    model: Annotated[list[str] | None, typer.Option(
        help="Model to serve, repeatable: an installed name, a .gguf file or a folder; NAME=MODEL serves it as NAME "
             "(default: smollm2 and minilm; env SOUVERAIN_MODELS)")] = None,
    api_key: Annotated[list[str] | None, typer.Option(help="A static API key (repeatable; env SOUVERAIN_API_KEY)")
                       ] = None,
    kv_cache_memory: Annotated[str, typer.Option(
        envvar="SOUVERAIN_KV_CACHE_MEMORY", help="KV cache per model: bytes or a size (2GiB, 512MiB, 1G)")] = "1GiB",
    max_model_len: Annotated[int | None, typer.Option(
        envvar="SOUVERAIN_MAX_MODEL_LEN", help="Context length (prompt + answer); default: the model's, capped by "
                                               "the KV cache")] = None,
    max_num_seqs: Annotated[int, typer.Option(envvar="SOUVERAIN_MAX_NUM_SEQS", min=1,
                                              help="Most sequences decoded together")] = 64,
    max_num_batched_tokens: Annotated[int, typer.Option(
        envvar="SOUVERAIN_MAX_NUM_BATCHED_TOKENS", min=16,
        help="Most tokens per engine step (prompt chunks + decodes): lower keeps streams smooth during long prompts"
    )] = 1024,
    kv_values: Annotated[str, typer.Option(
        envvar="SOUVERAIN_KV_VALUES",
        help="Values generated tokens attend to: int8 (a copy beside the cache's bf16 values, half the bytes a decode "
             "step reads, 1.25x the KV memory a token; needs the C++ kernels), bf16, or auto: int8 where prompts "
             "prefill on AMX or AVX-512 BF16 (which read the bf16 values)")] = "auto",
    served_model_name: Annotated[list[str] | None, typer.Option(
        help="The first chat model's id in the API; further names are aliases (repeatable, or 'a b')")] = None,
    chat_template: Annotated[str | None, typer.Option(
        help="A Jinja chat template (a file, or the template itself) for the first chat model")] = None,
    dtype: Annotated[str, typer.Option(envvar="SOUVERAIN_DTYPE", help="Compute dtype: " + ", ".join(DTYPES))
                     ] = "bfloat16",
    bits: Annotated[str, typer.Option(envvar="SOUVERAIN_BITS", help="Weight quantisation: auto, 0, 4 or 8")] = "auto",
    db: Db = None,
    api_key_file: Annotated[Path | None, typer.Option(
        envvar="SOUVERAIN_API_KEY_FILE", help="Static API keys, one per line (kept out of the process list)")] = None,
    metrics_key: Annotated[str | None, typer.Option(
        envvar="SOUVERAIN_METRICS_KEY", help="A key that may read /metrics only (for a Prometheus scraper)")] = None,
    allowed_origins: Annotated[list[str] | None, typer.Option(
        envvar="SOUVERAIN_ALLOWED_ORIGINS",
        help="Origins browsers may call the API from (CORS; off by default): repeatable, 'a,b' or '[\"*\"]'")
                               ] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="Serve HTTPS with this private key (PEM)")] = None,
    ssl_certfile: Annotated[Path | None, typer.Option(help="... and this certificate chain (PEM)")] = None,
    root_path: Annotated[str, typer.Option(
        envvar="SOUVERAIN_ROOT_PATH", help="The path prefix a reverse proxy serves this server under (/souverain)")
                         ] = "",
    keep_alive: Annotated[str, typer.Option(
        envvar="SOUVERAIN_KEEP_ALIVE", help="How long an idle model stays in memory (30s, 5m, 1h; -1: for ever); the "
                                            "next request loads it again")] = "-1",
    max_loaded_models: Annotated[int | None, typer.Option(
        envvar="SOUVERAIN_MAX_LOADED_MODELS", min=1,
        help="Most models in memory at once: loading another unloads the least recently used")] = None,
    access_log: Annotated[bool, typer.Option(
        help="One line per request: method, path, status, duration, request id, organisation")] = True,
    log_level: Annotated[str, typer.Option(envvar="SOUVERAIN_LOG_LEVEL",
                                           help="debug, info, warning, error")] = "warning",
    log_format: Annotated[str, typer.Option(envvar="SOUVERAIN_LOG_FORMAT", help="text or json (one object a line)")
                          ] = "text",
    config: Annotated[Path | None, typer.Option(
        help="A YAML file of these options (max-model-len: 4096, ...); the command line wins",
        callback=_config_file, is_eager=True, exists=True, dir_okay=False)] = None,
) -> None:
    """Serve the Mistral/OpenAI-compatible API and the chat app (the default model is pulled on first use).

    The first start creates an owner account and a first API key: printed once the server is up on a terminal,
    otherwise written to first-start.txt in the data folder (mode 0600), never into a log."""
    import uvicorn
    from pydantic import ValidationError

    from souverain.db.bootstrap import bootstrap
    from souverain.db.database import open_database
    from souverain.hub.catalogue import CATALOGUE
    from souverain.hub.store import Store, default_home
    from souverain.server.access import configure
    from souverain.server.app import create_app
    from souverain.server.loader import freeze_heap, load_models
    from souverain.server.residency import parse_duration
    from souverain.server.settings import Settings, parse_size

    static_keys = list(api_key or _env_list("SOUVERAIN_API_KEY") or [])
    if api_key_file is not None:
        try:
            static_keys += [k.strip() for k in api_key_file.read_text().splitlines() if k.strip()]
        except OSError as e:
            raise fail(f"cannot read --api-key-file: {e}") from None
    if (ssl_keyfile is None) != (ssl_certfile is None):
        raise fail("HTTPS needs both --ssl-keyfile and --ssl-certfile")
    if root_path and (not root_path.startswith("/") or root_path.endswith("/")):
        raise fail(f"--root-path must start with / and not end with one, e.g. /souverain (got {root_path!r})")
    if dtype not in DTYPES:
        raise fail(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if log_format not in ("text", "json"):
        raise fail(f"--log-format must be text or json, got {log_format!r}")
    if kv_values not in ("auto", "int8", "bf16"):
        raise fail(f"--kv-values must be auto, int8 or bf16, got {kv_values!r}")
    try:
        settings = Settings(
            host=host, port=port, models=model or _env_list("SOUVERAIN_MODELS") or ["smollm2", "minilm"],
            api_keys=static_keys, metrics_keys=[metrics_key] if metrics_key else [],
            kv_cache_memory=parse_size(kv_cache_memory),
            max_model_len=max_model_len, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            kv_values="int8" if kv_values == "int8" else "bf16" if kv_values == "bf16" else "auto",
            served_model_names=_names(served_model_name), chat_template=_template(chat_template), dtype=dtype,
            bits=bits, allowed_origins=_names(allowed_origins), keep_alive=parse_duration(keep_alive),
            max_loaded_models=max_loaded_models, root_path=root_path, access_log=access_log,
            log_format="json" if log_format == "json" else "text",
            usage_stale_seconds=float(os.environ.get("SOUVERAIN_USAGE_STALE_SECONDS", "60")))
        log_config = configure(log_level, settings.log_format, settings.access_log)
    except ValidationError as e:
        raise fail("; ".join(f"--{'-'.join(str(x) for x in p['loc']).replace('_', '-')}: {p['msg']}"
                              for p in e.errors())) from None
    except ValueError as e:
        raise fail(str(e)) from None

    # The port first: a port in use is said in a second, before the database, the credentials and the models.
    listener = _bind(host, port)
    home = default_home()  # models, uploads, adapters, the database: the owner's only
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o700)
    try:
        database = open_database(db or default_db_url())  # migrations run here, in one transaction
    except Exception as e:
        raise fail(f"cannot open the database {db or default_db_url()}: {e}") from None
    try:
        for entry in settings.models:  # the first start's downloads, with progress (not minutes of silence)
            ref = entry.partition("=")[2] or entry
            if ref in CATALOGUE and Store().get(ref) is None:
                pull_with_progress(ref)
        registry = load_models(settings, say=lambda m: err.print(f"[dim]{m}[/dim]", highlight=False))
    except errors() as e:
        raise fail(str(e)) from None
    freeze_heap()
    # The owner and first key only now: a start that failed above used nothing up.
    first = bootstrap(database)
    from souverain.train.runner import JobRunner

    def trainable(model_id: str) -> Path | None:
        found = registry.models.get(model_id)
        return found.path if found is not None else None

    jobs = JobRunner(database, settings.data_path(), trainable)
    jobs.start()
    api = create_app(settings, registry, database)
    settled = api.state.platform.settle_stale()
    if settled:
        err.print(f"{settled} usage rows of a server that stopped mid-request marked interrupted (their tokens "
                  "stay billed)", highlight=False)
    url = f"{'https' if ssl_certfile else 'http'}://{host}:{port}{root_path}"

    def started() -> None:  # the socket listens and the app is up: now the credentials are usable
        err.print(f"serving on {url} (database {database.url.split('@')[-1]})", highlight=False, soft_wrap=True)
        if first is not None:
            _tell_first_start(first, url + "/")

    api.router.on_startup.append(started)
    try:
        uvicorn.Server(uvicorn.Config(
            api, log_config=log_config, access_log=False, root_path=root_path,
            ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None,
            ssl_certfile=str(ssl_certfile) if ssl_certfile else None)).run(sockets=[listener])
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
        raise fail(f"cannot bind {host}:{port}: {e}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise fail(f"port {port} is in use on {host}; try --port {port + 1} (or SOUVERAIN_PORT)") from None
        raise fail(f"cannot bind {host}:{port}: {e.strerror or e}") from None
    return sock


@app.command()
def ps(url: cli_client.Url = None, api_key: cli_client.Key = None) -> None:
    """What a running server serves: loaded or not, its memory, until when an idle one stays, how busy it is."""
    import time

    from rich.table import Column

    from souverain.cli_store import human_size

    data = cli_client.call(cli_client.server(url, api_key), "GET", ("v1", "models"), timeout=10)
    table = Table(Column("MODEL", no_wrap=True), "STATE", "MEMORY", "UNTIL", "CONTEXT", "QUANT", "RUNNING", "WAITING",
                  "KV BLOCKS", box=None)
    for m in data.get("data", []):
        s = m.get("status", {})
        loaded = s.get("loaded", True)
        until = s.get("expires_at")
        when = "-" if not loaded else "forever" if until is None else \
            f"{max(0, int(until - time.time()))} s from now"
        memory = s.get("memory_bytes")
        table.add_row(m["id"], "-" if not s else "loaded" if loaded else "unloaded",
                      human_size(memory) if memory else "-", when if s else "-", str(m.get("max_context_length")),
                      str(m.get("quantization") or "-"), str(s.get("running", "-")), str(s.get("waiting", "-")),
                      f"{s.get('kv_blocks_used', '-')}/{s.get('kv_blocks_total', '-')}" if s else "-")
    out.print(table)


@app.command()
def stop(
    model: Annotated[str, typer.Argument(help="A model the server serves")],
    url: cli_client.Url = None, api_key: cli_client.Key = None,
) -> None:
    """Unload a model from a running server's memory now (its next request loads it again)."""
    target = cli_client.server(url, api_key)
    cli_client.call(target, "POST", ("v1", "admin", "models", model, "unload"), timeout=120)
    err.print(f"{model} unloaded from {target.url}", highlight=False)


app.command()(cli_client.login)
app.command()(cli_client.logout)
cli_store.install(app)
cli_run.install(app)
cli_platform.install(app)
cli_finetune.install(app)


def main() -> None:
    app()
