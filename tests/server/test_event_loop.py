"""Nothing blocks the event loop, and no body is read that will be refused: huge prompts are rendered and
tokenised in worker threads, bodies over the limit are cut off as they stream in (chunked included), and a
request without credentials is answered 401 before its body is read."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.server.smollm2_app import KEY, call


def _health_while(server: str, work: threading.Thread) -> tuple[float, int]:
    """Poll /health while `work` runs: (slowest answer in seconds, number of answers)."""
    slowest, count = 0.0, 0
    work.start()
    while work.is_alive():
        started = time.monotonic()
        with urllib.request.urlopen(server + "/health", timeout=30) as r:
            assert r.status == 200
        slowest = max(slowest, time.monotonic() - started)
        count += 1
        time.sleep(0.02)
    work.join()
    return slowest, count


@pytest.mark.parametrize("megabytes", [9.0, 1.9])
def test_health_answers_while_a_huge_prompt_is_handled(server: str, megabytes: float) -> None:
    """9 MB cannot fit SmolLM2's 8k context whatever its tokens: refused from its size. 1.9 MB might: it is
    tokenised (2 s of CPU, off the event loop and without the GIL), then refused."""
    prompt = ("Le renard brun saute par-dessus le chien paresseux. " * 180_000)[:int(megabytes * 1_000_000)]
    outcome: dict[str, object] = {}

    def chat() -> None:
        status, _, body = call(server, "/v1/chat/completions", {
            "model": "smollm2", "max_tokens": 1, "messages": [{"role": "user", "content": prompt}]})
        outcome["chat"] = (status, json.loads(body).get("code"))

    def completion() -> None:
        status, _, body = call(server, "/v1/completions", {"model": "smollm2", "max_tokens": 1, "prompt": prompt})
        outcome["completion"] = (status, json.loads(body).get("code"))

    for name, work in (("chat", chat), ("completion", completion)):
        slowest, count = _health_while(server, threading.Thread(target=work))
        print(f"{megabytes} MB prompt ({name}): {count} health checks meanwhile, slowest {slowest:.3f} s; "
              f"{outcome[name]}")
        assert outcome[name] == (400, "context_length_exceeded")
        assert slowest < 0.5


def _chunked(server: str, path: str, headers: dict[str, str], total: int, chunk: int = 1 << 20) -> tuple[int, int]:
    """Send a chunked POST of up to `total` bytes, stopping when the server answers or closes.
    (status, bytes sent before the answer)."""
    host, port = server.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": host, "Transfer-Encoding": "chunked",
                                                 "Content-Type": "application/json", **headers}.items())
    sock.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode())
    sent = 0
    piece = b"%x\r\n" % chunk + b"x" * chunk + b"\r\n"
    sock.settimeout(0.2)
    answer = b""
    try:
        while sent < total:
            try:
                answer += sock.recv(65536)
                if answer:
                    break
            except TimeoutError:
                pass
            try:
                sock.sendall(piece)
                sent += chunk
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                break
        sock.settimeout(30)
        while b"\r\n" not in answer:
            more = sock.recv(65536)
            if not more:
                break
            answer += more
    finally:
        sock.close()
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1") else 0
    return status, sent


def test_chunked_50mb_without_a_key_is_refused_before_it_is_read(server: str) -> None:
    status, sent = _chunked(server, "/v1/chat/completions", {}, 50 << 20)
    print(f"chunked, no key: {status} after {sent >> 20} MiB sent")
    assert status == 401 and sent < 8 << 20  # answered at once: what was sent sits in socket buffers, unread


def test_chunked_50mb_with_a_key_is_cut_off_at_the_limit(server: str) -> None:
    status, sent = _chunked(server, "/v1/chat/completions", {"Authorization": f"Bearer {KEY}"}, 50 << 20)
    print(f"chunked, with a key: {status} after {sent >> 20} MiB sent (limit 16 MiB)")
    assert status == 413 and sent < 32 << 20


def test_announced_length_over_the_limit_is_refused_at_once(server: str) -> None:
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {100 << 20}\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")


def test_health_answers_while_a_57mb_upload_is_checked_and_stored(tmp_path: Path) -> None:
    """The JSONL check, the write and the database row of an upload run in a worker thread."""
    from souverain.db.database import open_database, sqlite_url
    from souverain.server.app import create_app
    from souverain.server.registry import Registry
    from souverain.server.settings import Settings
    from tests.serving import running

    db = open_database(sqlite_url(tmp_path / "souverain.db"))
    settings = Settings(api_keys=["sk-up"], data_dir=str(tmp_path / "data"))
    line = b'{"text": "' + b"x" * 1000 + b'"}\n'
    try:
        with running(lambda port: create_app(settings, Registry(), db)) as url:
            def upload(data: bytes) -> int:
                boundary = "b0undary"
                body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
                        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\n"
                        "Content-Type: application/jsonl\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
                req = urllib.request.Request(url + "/v1/files", body, {
                    "Authorization": "Bearer sk-up", "Content-Type": f"multipart/form-data; boundary={boundary}"})
                with urllib.request.urlopen(req, timeout=300) as r:
                    return int(r.status)

            assert upload(line * 10) == 200  # first use: the modules it needs are imported
            outcome: list[int] = []
            slowest, count = _health_while(url, threading.Thread(target=lambda: outcome.append(upload(line * 60_000))))
    finally:
        db.close()
    print(f"57 MiB upload: {count} health checks meanwhile, slowest {slowest:.3f} s")
    assert outcome == [200] and slowest < 0.5
