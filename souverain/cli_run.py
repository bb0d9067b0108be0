"""`souverain run` (chat, as `ollama run`) and `souverain generate` (a raw completion): the server's engine,
in process, with the model's Modelfile defaults under the options given."""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import typer

from souverain.cli_common import DTYPES, Bits, err, errors, fail, load, out

if TYPE_CHECKING:
    from souverain.engine.engine import LLMEngine

_turns = itertools.count()
# `run`'s own defaults, under a Modelfile's: small models wander at the usual 0.7-0.8; 0.2 is SmolLM2's advice.
RUN_DEFAULTS: dict[str, Any] = {"temperature": 0.2, "top_p": 0.9, "max_tokens": 512}
HELP = """Available commands:
  /set parameter NAME VALUE   temperature, top_p, top_k, min_p, seed, num_predict, repeat_penalty,
                              presence_penalty, frequency_penalty, stop, min_tokens
  /set system TEXT            the system message (/set system alone removes it)
  /show [info|parameters|system|template|license|modelfile]
  /load MODEL                 another model (an installed name, a .gguf file, a folder)
  /clear                      forget the conversation
  /bye                        leave
  /? or /help                 this help
Write \"\"\" to begin a message of several lines, and \"\"\" again to end it. Ctrl-C stops an answer."""


def _stream(engine: LLMEngine, ids: list[int], params: dict[str, Any], adapter: str | None = None) -> str:
    """Print the continuation of `ids` as the engine generates it (through `adapter`, a Modelfile's LoRA, when
    given); return its text."""
    from souverain.engine.request import Request, SamplingParams

    chosen = {k: v for k, v in params.items() if k in SamplingParams.__dataclass_fields__}
    chosen["stop"] = tuple(chosen.get("stop") or ())
    chosen["min_tokens"] = min(chosen.get("min_tokens", 0), chosen.get("max_tokens", 256))
    try:
        request = Request(f"cli-{next(_turns)}", ids, SamplingParams(**chosen), adapter=adapter)
        engine.add_request(request)
    except ValueError as e:
        raise fail(str(e)) from None
    text: list[str] = []
    count, first = 0, None
    try:
        while engine.has_unfinished():
            for delta in engine.step():
                if delta.error:
                    raise fail(delta.error)
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


def _given(**options: Any) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


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
    engine, _, _ = load(model, dtype, bits, pull_missing=False)
    tokenizer = engine.tokenizer
    try:
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        else:
            ids = tokenizer.encode(prompt)
            sys.stdout.write(prompt)
    except errors() as e:
        raise fail(str(e)) from None
    _stream(engine, ids, _given(max_tokens=max_tokens, min_tokens=min_tokens, temperature=temperature, top_p=top_p,
                                seed=seed))


@dataclass
class Session:
    """One `run` conversation: the model, its defaults, what /set changed, and the turns so far."""

    name: str
    engine: LLMEngine
    defaults: dict[str, Any]
    options: dict[str, Any]  # the command line's, over the Modelfile's
    system: str | None
    history: list[dict[str, str]] = field(default_factory=list)

    @property
    def params(self) -> dict[str, Any]:
        return {**RUN_DEFAULTS, **self.defaults.get("parameters", {}), **self.options}

    def answer(self, question: str) -> None:
        self.history.append({"role": "user", "content": question})
        head = [{"role": "system", "content": self.system}] if self.system else []
        try:
            ids = self.engine.tokenizer.apply_chat_template(
                head + list(self.defaults.get("messages", [])) + self.history, add_generation_prompt=True)
        except errors() as e:
            self.history.pop()
            raise fail(str(e)) from None
        adapter = "modelfile" if "adapter" in self.defaults else None
        self.history.append({"role": "assistant", "content": _stream(self.engine, ids, self.params, adapter)})


def run(
    model: Annotated[str | None, typer.Argument(
        help="An installed model (default smollm2, pulled if missing), a .gguf file or a model folder")] = None,
    prompt: Annotated[str | None, typer.Argument(
        help="Ask once and exit (piped input is added to it); without it, chat interactively")] = None,
    max_tokens: Annotated[int | None, typer.Option(min=1, help="Most tokens per answer (default 512)")] = None,
    min_tokens: Annotated[int | None, typer.Option(min=0, help="At least this many tokens (fixed-length benchmarks)")
                          ] = None,
    temperature: Annotated[float | None, typer.Option(min=0.0, help="Default 0.2, or the Modelfile's")] = None,
    top_p: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="Default 0.9, or the Modelfile's")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    system: Annotated[str | None, typer.Option(help="System message (default: the Modelfile's)")] = None,
    dtype: Annotated[str, typer.Option(help=f"Compute dtype: {', '.join(DTYPES)}")] = "bfloat16",
    bits: Bits = "auto",
) -> None:
    """Chat with a model: one question with PROMPT or piped input, else an interactive session (/? for help)."""
    piped = None if sys.stdin.isatty() else sys.stdin.read()
    if piped is not None and not piped.strip() and prompt is None:
        raise fail("nothing to ask: the input piped in is empty (give a PROMPT, or run on a terminal to chat)")
    engine, _, defaults = load(model, dtype, bits)
    session = Session(model or "smollm2", engine, defaults, _given(max_tokens=max_tokens, min_tokens=min_tokens,
                                                                   temperature=temperature, top_p=top_p, seed=seed),
                      system if system is not None else defaults.get("system"))
    if piped is not None or prompt is not None:  # as `ollama run`: the prompt, then what was piped in
        session.answer("\n\n".join(p for p in (prompt, (piped or "").strip()) if p))
        return
    err.print('[dim]/? for help, /bye to leave, """ to begin and end several lines[/dim]')
    while True:
        question = _read_question()
        if question is None:
            return
        if question.strip().startswith("/"):
            after = _command(session, question.strip(), dtype, bits)
            if after is None:
                return
            session = after
        elif question.strip():
            session.answer(question)


def _command(session: Session, line: str, dtype: str, bits: str) -> Session | None:
    """A REPL command; never sent to the model. None: leave."""
    word, _, rest = line.partition(" ")
    rest = rest.strip()
    if word in ("/bye", "/exit"):
        return None
    if word in ("/?", "/help"):
        err.print(HELP, markup=False, highlight=False)
    elif word == "/clear":
        session.history.clear()
        err.print("[dim]conversation cleared[/dim]")
    elif word == "/set":
        _set(session, rest)
    elif word == "/show":
        _show(session, rest or "info")
    elif word == "/load":
        if not rest:
            err.print("usage: /load MODEL", highlight=False)
            return session
        try:
            engine, _, defaults = load(rest, dtype, bits)
        except typer.Exit:  # the reason was printed; keep the model we have
            return session
        err.print(f"[dim]loaded {rest}; conversation cleared[/dim]", highlight=False)
        return Session(rest, engine, defaults, session.options, defaults.get("system"))
    else:
        err.print(f"unknown command {word!r}: /? for help (nothing was sent to the model)", highlight=False)
    return session


def _set(session: Session, rest: str) -> None:
    from souverain.hub.modelfile import PARAMETERS, ModelfileError, set_parameter

    kind, _, value = rest.partition(" ")
    if kind == "system":
        session.system = value.strip().strip('"') or None
        err.print("[dim]system message " + ("set" if session.system else "removed") + "[/dim]")
    elif kind == "parameter":
        name, _, raw = value.strip().partition(" ")
        if name == "num_ctx":
            err.print("num_ctx is fixed once the model is loaded: set it with PARAMETER num_ctx in a Modelfile "
                      "(`souverain create`)", highlight=False)
            return
        changed: dict[str, Any] = {}
        try:
            set_parameter(changed, name.lower(), raw.strip(), 1)
        except ModelfileError as e:
            err.print(str(e).removeprefix("line 1: "), highlight=False)
            return
        if "stop" in changed:
            changed["stop"] = [*session.options.get("stop", []), *changed["stop"]]
        session.options.update(changed)
        err.print(f"[dim]set {name} to {raw.strip()}[/dim]", highlight=False)
    else:
        err.print(f"usage: /set parameter NAME VALUE ({', '.join(sorted(PARAMETERS))}) | /set system TEXT",
                  highlight=False)


def _show(session: Session, what: str) -> None:
    from souverain.hub.modelfile import render

    tokenizer = session.engine.tokenizer
    if what == "info":
        args = session.engine.model.args
        out.print(f"model {session.name}: {args.n_layers} layers, dim {args.dim}, {args.n_heads} heads "
                  f"({args.n_kv_heads} KV), vocabulary {args.vocab_size}, context {session.engine.max_model_len}",
                  highlight=False)
    elif what == "parameters":
        for key, value in session.params.items():
            out.print(f"{key:<20} {value}", highlight=False)
    elif what == "system":
        out.print(session.system or "(no system message)", markup=False, highlight=False)
    elif what == "template":
        out.print(getattr(tokenizer, "chat_template", None) or "(the tokenizer's own instruct format)", markup=False,
                  highlight=False)
    elif what == "license":
        from souverain.hub.store import Store

        manifest = Store().get(session.name)
        out.print((manifest.license if manifest else None) or "(none recorded)", markup=False, highlight=False)
    elif what == "modelfile":
        defaults = {**session.defaults, "parameters": {**session.defaults.get("parameters", {}), **session.options}}
        if session.system:
            defaults["system"] = session.system
        out.print(render(session.name, session.name, {k: v for k, v in defaults.items() if v}, None), markup=False,
                  highlight=False)
    else:
        err.print(f"/show takes info, parameters, system, template, license or modelfile (not {what!r})",
                  highlight=False)


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


def install(app: typer.Typer) -> None:
    app.command()(generate)
    app.command()(run)
