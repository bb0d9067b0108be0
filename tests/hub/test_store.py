"""The model store: import, list, show, remove; names; traversal; HF cache offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from souverain.hub import resolve
from souverain.hub.names import NameError_, check_name, folder_name
from souverain.hub.sources import import_path, pull_hf
from souverain.hub.store import Store, StoreError
from souverain.weights import load_model
from tests.writers import build_hf, our_state, write_gguf, write_mistral


@pytest.fixture(scope="module")
def formats(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats")
    build_hf("mistral", root / "hf", sliding_window=8)
    args, state = our_state(root / "hf")
    write_mistral(args, state, root / "mistral")
    write_gguf(args, state, root / "tiny.gguf")
    return {"hf": root / "hf", "mistral": root / "mistral", "gguf": root / "tiny.gguf"}


def logits(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_model(path)(torch.arange(12)[None])


@pytest.mark.parametrize("kind", ["hf", "mistral", "gguf"])
def test_import_list_show_rm(formats: dict[str, Path], kind: str, tmp_path: Path) -> None:
    store = Store(tmp_path)
    manifest = import_path(store, formats[kind], f"my-{kind}")
    assert manifest.info["format"] == kind and manifest.info["architecture"] in ("mistral", "llama")
    assert [m.name for m in store.list()] == [f"my-{kind}"]
    assert store.get(f"my-{kind}").size == manifest.size > 0
    assert torch.equal(logits(store.path(f"my-{kind}")), logits(formats[kind]))
    store.remove(f"my-{kind}")
    assert store.list() == [] and store.get(f"my-{kind}") is None
    with pytest.raises(StoreError, match="not installed"):
        store.remove(f"my-{kind}")


def test_names_and_resolution(formats: dict[str, Path], tmp_path: Path) -> None:
    store = Store(tmp_path)
    import_path(store, formats["gguf"], "mistralai/Tiny-v0.1")
    assert (tmp_path / "models" / "mistralai--Tiny-v0.1" / "manifest.json").exists()
    assert resolve("mistralai/Tiny-v0.1", store) == store.path("mistralai/Tiny-v0.1")
    assert resolve(str(formats["gguf"]), store) == formats["gguf"]  # a path is itself
    with pytest.raises(StoreError, match="not installed"):
        resolve("nothing-here", store, pull_missing=False)
    assert folder_name("a/b") == "a--b"


@pytest.mark.parametrize("bad", ["../evil", "/etc/passwd", "a/../../b", "a\\b", "..", ".hidden", "a/b/c", ""])
def test_traversal_names_refused(bad: str, formats: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(NameError_):
        check_name(bad)
    with pytest.raises(NameError_):
        import_path(Store(tmp_path / "store"), formats["gguf"], bad)
    assert not (tmp_path / "evil").exists()


def test_symlink_out_of_a_model_folder_refused(formats: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    for f in formats["hf"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    (folder / "notes.txt").symlink_to(secret)
    store = Store(tmp_path / "store")
    with pytest.raises(StoreError, match="symlink"):
        import_path(store, folder, "linked")
    assert store.list() == []


def test_pickle_only_folder_refused(tmp_path: Path) -> None:
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04.")
    with pytest.raises(StoreError, match="pickle"):
        import_path(Store(tmp_path / "store"), folder, "old")


def test_hf_cache_layout_offline(formats: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A repo already in the HF cache (blobs + snapshot symlinks) is used with HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hf-cache"
    repo = cache / "models--acme--tiny-mistral"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in formats["hf"].iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    store = Store(tmp_path / "store")
    manifest = pull_hf(store, "acme/tiny-mistral")
    assert manifest.source == "hf:acme/tiny-mistral@main"
    assert torch.equal(logits(store.path("acme/tiny-mistral")), logits(formats["hf"]))
    assert not any(p.is_symlink() for p in (tmp_path / "store").rglob("*"))
