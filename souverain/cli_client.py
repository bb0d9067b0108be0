"""Commands that talk to a running server (`ps`, `jobs`, `finetune`, `login`): where it is, with which key.

The server and key come from, first to last: the `--url`/`--api-key` options, `SOUVERAIN_URL`/`SOUVERAIN_API_KEY`,
the client config `souverain login` writes (`client.json` in the user's config folder, mode 0600), and
http://127.0.0.1:8000 without a key.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from platformdirs import user_config_dir

from souverain.cli_common import err, fail

DEFAULT_URL = "http://127.0.0.1:8000"
Url = Annotated[str | None, typer.Option(envvar="SOUVERAIN_URL", show_envvar=True,
                                         help="The server (default: from `souverain login`, else " + DEFAULT_URL + ")")]
Key = Annotated[str | None, typer.Option(envvar="SOUVERAIN_API_KEY", show_envvar=True,
                                         help="An API key (default: from `souverain login`)")]


def config_path() -> Path:
    return Path(os.environ.get("SOUVERAIN_CLIENT_CONFIG") or Path(user_config_dir("souverain")) / "client.json")


@dataclass(frozen=True)
class Server:
    url: str
    key: str | None

    def path(self, *parts: str) -> str:
        """A URL under the server; each part percent-encoded (ids pasted from a terminal may hold anything)."""
        return self.url.rstrip("/") + "/" + "/".join(urllib.parse.quote(p, safe="") for p in parts)


def server(url: str | None, key: str | None) -> Server:
    saved: dict[str, Any] = {}
    path = config_path()
    if (url is None or key is None) and path.exists():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise fail(f"cannot read the client config {path}: {e}") from None
    chosen = url or saved.get("url") or DEFAULT_URL
    # A saved key belongs to its saved server: never sent to another one named by --url.
    same = chosen.rstrip("/") == str(saved.get("url", "")).rstrip("/")
    return Server(chosen, key if key is not None else saved.get("api_key") if same else None)


def save(target: Server) -> Path:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": target.url, "api_key": target.key}, f)
    path.chmod(0o600)
    return path


def call(target: Server, method: str, parts: tuple[str, ...], body: bytes | None = None,
         content_type: str = "application/json", timeout: float = 120) -> Any:
    """One API call; every failure is one line that says which: unreachable, refused key, or the server's
    own error message."""
    headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {target.key}"} if target.key else {})}
    request = urllib.request.Request(target.path(*parts), body, headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("message")
        except ValueError:
            message = e.reason
        if e.code == 401:
            how = "the key was refused" if target.key else "it needs an API key"
            raise fail(f"the server at {target.url} answered 401: {how} ({message}). Give one with --api-key, "
                       "SOUVERAIN_API_KEY, or `souverain login URL`") from None
        raise fail(f"{e.code}: {message}") from None
    except (OSError, ValueError) as e:  # ValueError: a URL urllib cannot use
        reason = getattr(e, "reason", e)
        raise fail(f"cannot reach a server at {target.url}: {reason}. Is `souverain serve` running there? "
                   "(--url, SOUVERAIN_URL or `souverain login URL` point elsewhere)") from None


def login(
    url: Annotated[str, typer.Argument(help="The server, e.g. http://10.0.0.5:8000")],
    api_key: Annotated[str | None, typer.Option(envvar="SOUVERAIN_API_KEY",
                                                help="The key (default: asked without echo, or read from stdin)")
                       ] = None,
) -> None:
    """Remember a server and its key for `ps`, `jobs` and `finetune` (checked first; saved with mode 0600)."""
    import sys

    if not url.startswith(("http://", "https://")):
        raise fail(f"{url!r} is not a URL: give http://HOST:PORT or https://...")
    if api_key is None:
        api_key = (typer.prompt("API key", hide_input=True, default="", show_default=False) if sys.stdin.isatty()
                   else sys.stdin.readline()).strip() or None
    target = Server(url.rstrip("/"), api_key)
    models = call(target, "GET", ("v1", "models"), timeout=15)
    path = save(target)
    err.print(f"logged in to {target.url} ({len(models.get('data', []))} models served); saved in {path}",
              highlight=False)


def logout() -> None:
    """Forget the saved server and key."""
    path = config_path()
    path.unlink(missing_ok=True)
    err.print(f"removed {path}", highlight=False)
