"""The chat app in a real browser (Debian's Chromium driven by Playwright) against a real server.

The model is scripted (tests/web/scripted.py) so the answer's markdown is known; everything else is the
product: the engine, the API, the database and the page. Screenshots go to docs/screenshots/.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from souverain.db import accounts
from souverain.db.bootstrap import bootstrap
from souverain.db.database import Database, open_database, sqlite_url
from souverain.engine.async_engine import AsyncEngine
from souverain.engine.engine import EngineConfig, LLMEngine
from souverain.server.app import create_app
from souverain.server.registry import LoadedModel, Registry
from souverain.server.settings import Settings
from tests.serving import running
from tests.web.scripted import ScriptedModel, ScriptTokenizer

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
FREE_EMAIL, FREE_PASSWORD = "free@example.org", "free user password"

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Chromium not installed (scripts/services.sh)")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    db: Database = open_database(sqlite_url(tmp_path_factory.mktemp("web") / "souverain.db"))
    first = bootstrap(db)
    assert first is not None
    with db.session() as s:
        accounts.set_plan_limits(s, name="free", actor="t", tokens_per_month=60, requests_per_second=None)
        org = accounts.create_org(s, name="freeco", plan="free", actor="t")
        user = accounts.create_user(s, email=FREE_EMAIL, password=FREE_PASSWORD, actor="t")
        accounts.add_member(s, org=org, user=user, role="member", actor="t")
    registry = Registry()
    tok = ScriptTokenizer()
    for name in ("mistral-scripted", "llama-scripted"):
        engine = AsyncEngine(LLMEngine(ScriptedModel(), tok, EngineConfig(kv_cache_memory=8 << 20)))
        engine.start()
        registry.add(LoadedModel(name, engine, tok, {"capabilities": ["chat"]}))
    with running(lambda port: create_app(Settings(port=port), registry, db)) as url:
        yield {"url": url, "email": first.email, "password": first.password, "db": db}
    registry.shutdown()
    db.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    # bypass_csp: Playwright's waits evaluate strings, which the page's CSP forbids. It also makes the XSS check
    # stricter: the sanitiser alone must stop the attack (test_security_headers checks the CSP itself).
    context = browser.new_context(viewport={"width": 1280, "height": 860}, bypass_csp=True)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, errors


def sign_in(page: Any, site: dict[str, Any], email: str | None = None, password: str | None = None) -> None:
    page.goto(site["url"] + "/")
    page.fill("#login-email", email or site["email"])
    page.fill("#login-password", password or site["password"])
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#app-view:not([hidden])")


def send(page: Any, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def finish(page: Any) -> None:
    """Wait until the exchange under way is over and saved (the page marks itself busy until then)."""
    page.wait_for_selector("body:not([data-busy])", state="attached", timeout=30_000)


def last_answer(page: Any) -> Any:
    return page.locator(".msg.assistant").last


def test_stream_render_stop_regenerate_reload(page: Any, site: dict[str, Any]) -> None:
    sign_in(page, site)
    send(page, "Show me a table and some Python")
    # Tokens appear while the answer is still being made (the Stop button is up).
    page.wait_for_function("document.querySelector('.msg.assistant .body')?.textContent.includes('table')")
    assert page.locator("#stop").is_visible()
    assert "word39" not in last_answer(page).inner_text()
    finish(page)
    answer = last_answer(page)
    # Markdown: a real table, and a highlighted code block with a copy button.
    assert answer.locator("table td").first.inner_text() == "Paris"
    assert answer.locator("pre code.hljs .hljs-keyword").first.inner_text() == "def"
    assert answer.locator("pre .copy-code").count() == 1
    # Raw HTML from the model is shown as text and runs nothing.
    body = answer.locator(".body").inner_text()
    assert "<script>window.__pwned = 1</script>" in body and '<img src=x onerror="window.__pwned = 2">' in body
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#messages img, #messages script").count() == 0
    assert page.locator("#conversations li").first.inner_text().startswith("Show me a table")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "conversation.png"))

    # Regenerate, and stop it mid-answer: what arrived is kept and marked.
    old = answer.get_attribute("data-id")
    page.click(".msg.assistant >> text=Regenerate")
    page.wait_for_function(f"(() => {{ const a = document.querySelector('.msg.assistant'); return a && "
                           f"a.dataset.id !== '{old}' && a.textContent.includes('Italy'); }})()")
    page.click("#stop")
    finish(page)
    stopped = last_answer(page)
    assert stopped.locator(".flag").inner_text() == "stopped"
    partial = stopped.locator(".body").inner_text()
    assert "Italy" in partial and "word39" not in partial
    assert "2/2" in stopped.locator(".actions").inner_text()

    # Reload: the conversation, its stopped answer and both branches are intact.
    page.reload()
    page.wait_for_selector(".msg.assistant")
    assert page.locator(".msg.user .body").inner_text() == "Show me a table and some Python"
    again = last_answer(page)
    assert again.locator(".flag").inner_text() == "stopped" and again.locator(".body").inner_text() == partial
    again.get_by_title("Previous version").click()
    page.wait_for_function("document.querySelector('.msg.assistant .body').textContent.includes('word39')")
    assert "1/2" in last_answer(page).locator(".actions").inner_text()


def test_export_dark_mode_and_favicon(browser: Any, site: dict[str, Any]) -> None:
    """The conversation downloads as Markdown (the visible thread) and JSON (every message); the page follows the
    system's dark setting; the tab has an icon."""
    import json

    context = browser.new_context(viewport={"width": 1280, "height": 860}, bypass_csp=True, accept_downloads=True,
                                  color_scheme="dark")
    page = context.new_page()
    sign_in(page, site)
    assert page.locator("#export-md").is_hidden()  # nothing to export before the first message
    send(page, "Tell me about Paris")
    finish(page)
    answer = last_answer(page).locator(".body").inner_text()
    with page.expect_download() as got:
        page.click("#export-md")
    markdown = Path(got.value.path()).read_text()
    assert got.value.suggested_filename.endswith(".md")
    assert "**You**\n\nTell me about Paris" in markdown and answer.split("\n")[0] in markdown
    with page.expect_download() as got:
        page.click("#export-json")
    data = json.loads(Path(got.value.path()).read_text())
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"] and data["thread"]
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(22, 22, 26)", background  # the dark palette
    page.screenshot(path=str(SHOTS / "dark.png"))
    assert page.locator('link[rel="icon"]').count() == 1
    icon = page.request.get(site["url"] + "/favicon.ico")
    assert icon.ok and icon.headers["content-type"] == "image/svg+xml"
    other = page.request.get(site["url"] + f"/app/api/conversations/{data['id']}/export?format=pdf")
    assert other.status == 400
    context.close()


def test_tool_calls_render_as_collapsible_blocks(page: Any, site: dict[str, Any]) -> None:
    """An answer's tool calls show as "called X with ..." blocks, collapsed; the name is text, never HTML."""
    sign_in(page, site)
    send(page, "Call a tool please")
    finish(page)
    mid = last_answer(page).get_attribute("data-id")
    status = page.evaluate("""async (mid) => {
        const me = await (await fetch('/app/api/me')).json();
        const convs = await (await fetch('/app/api/conversations')).json();
        const cid = (convs.data || convs)[0].id;
        const r = await fetch(`/app/api/conversations/${cid}/messages/${mid}`, {method: 'PATCH',
            headers: {'Content-Type': 'application/json', 'x-csrf-token': me.csrf},
            body: JSON.stringify({tool_calls: [
                {id: 'call_1', type: 'function', function: {name: 'get_weather', arguments: '{"city": "Paris"}'}},
                {id: 'call_2', type: 'function', function: {name: '<img src=x onerror=window.__pwned=3>',
                                                            arguments: '{}'}}]})});
        return r.status; }""", mid)
    assert status == 200
    page.reload()
    page.wait_for_selector(".msg.assistant .calls")
    calls = last_answer(page).locator(".calls details")
    assert calls.count() == 2
    assert calls.first.locator("summary").inner_text() == 'called get_weather with {"city": "Paris"}'
    assert not calls.first.locator("pre").is_visible()  # collapsed until opened
    calls.first.locator("summary").click()
    assert calls.first.locator("pre").inner_text() == '{\n  "city": "Paris"\n}'
    assert "<img" in calls.nth(1).locator("summary").inner_text() and page.locator("#messages img").count() == 0
    assert page.evaluate("window.__pwned") is None
    page.screenshot(path=str(SHOTS / "tool-call.png"))


def test_edit_resend_keeps_the_old_branch(page: Any, site: dict[str, Any]) -> None:
    sign_in(page, site)
    send(page, "First question")
    finish(page)
    page.click(".msg.user >> text=Edit")
    page.fill(".msg.user textarea.edit", "Second question")
    page.click("text=Save & send")
    finish(page)
    user = page.locator(".msg.user")
    assert user.locator(".body").inner_text() == "Second question" and "2/2" in user.inner_text()
    user.get_by_title("Previous version").click()
    page.wait_for_function("document.querySelector('.msg.user .body').textContent === 'First question'")


def test_conversation_list_search_rename_delete(page: Any, site: dict[str, Any]) -> None:
    sign_in(page, site)
    for text in ("Alpha planning notes", "Beta release checklist"):
        page.click("#new-chat")
        send(page, text)
        finish(page)
    titles = page.locator("#conversations li .open").all_inner_texts()
    assert titles[0] == "Beta release checklist"  # newest first
    page.fill("#search", "alpha")
    page.wait_for_function("document.querySelectorAll('#conversations li').length === 1")
    page.fill("#search", "word17")  # message text is searched too
    page.wait_for_function("document.querySelectorAll('#conversations li').length >= 2")
    page.fill("#search", "")
    page.wait_for_function("document.querySelectorAll('#conversations li').length >= 2")
    page.screenshot(path=str(SHOTS / "conversation-list.png"))
    page.once("dialog", lambda d: d.accept("Renamed beta"))
    page.get_by_label("Rename Beta release checklist").click()
    page.wait_for_selector("#conversations >> text=Renamed beta")
    page.once("dialog", lambda d: d.accept())
    page.get_by_label("Delete Renamed beta").click()
    page.wait_for_function("![...document.querySelectorAll('#conversations .open')]"
                           ".some(b => b.textContent === 'Renamed beta')")
    page.reload()
    page.wait_for_selector("#conversations li")
    assert "Renamed beta" not in page.locator("#conversations").inner_text()


def test_free_plan_limit_message(page: Any, site: dict[str, Any]) -> None:
    sign_in(page, site, FREE_EMAIL, FREE_PASSWORD)
    assert page.locator("#plan-name").inner_text() == "free"
    send(page, "hello")
    finish(page)
    send(page, "and again")  # the first answer spent the month's 60 tokens
    page.wait_for_selector("#notice:not([hidden])")
    finish(page)
    assert "used this month's tokens on the free plan" in page.locator("#notice").inner_text()
    refused = last_answer(page)  # the refused answer says why, in place, and is not a broken stream
    assert "error" in (refused.get_attribute("class") or "") and "quota" in refused.locator(".body").inner_text()
    assert re.search(r"\d+ of 60 tokens this month", page.locator("#usage-text").inner_text())
    box = page.evaluate("(() => { const b = document.getElementById('messages'); "
                        "return [b.scrollTop, b.scrollHeight, b.clientHeight]; })()")
    assert box[0] + box[2] >= box[1] - 2  # scrolled to the newest message
    page.screenshot(path=str(SHOTS / "plan-usage.png"))


def test_member_of_two_organisations_switches_between_them(page: Any, site: dict[str, Any]) -> None:
    with site["db"].session() as s:
        user = accounts.create_user(s, email="two@example.org", password=FREE_PASSWORD, actor="t")
        for name in ("freeco", "default"):
            accounts.add_member(s, org=accounts.get_org(s, name=name), user=user, role="member", actor="t")
    sign_in(page, site, "two@example.org", FREE_PASSWORD)  # the first organisation by default
    assert page.locator("#plan-name").inner_text() == "enterprise" and page.locator("#org-switch").is_visible()
    page.select_option("#org-switch", "freeco")
    page.wait_for_function("document.getElementById('plan-name').textContent === 'free'")
    assert page.locator("#org-switch").input_value() == "freeco"
    page.reload()  # the new session holds
    page.wait_for_function("document.getElementById('plan-name').textContent === 'free'")


def test_phone_width(browser: Any, site: dict[str, Any]) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                                  bypass_csp=True)
    page = context.new_page()
    try:
        sign_in(page, site)
        assert not page.locator("#sidebar").is_visible() or page.locator("#sidebar").bounding_box()["x"] < 0
        send(page, "Hello from a phone")
        finish(page)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390  # nothing overflows sideways
        page.screenshot(path=str(SHOTS / "phone.png"))
        page.click("#toggle-sidebar")
        page.wait_for_timeout(300)
        assert page.locator("#sidebar").bounding_box()["x"] >= 0
    finally:
        context.close()


def test_keyboard_only(page: Any, site: dict[str, Any]) -> None:
    sign_in(page, site)
    page.focus("#input")
    page.keyboard.type("line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("line two")
    assert page.input_value("#input") == "line one\nline two"
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelector('.msg.assistant .body')?.textContent.includes('table')")
    page.keyboard.press("Escape")  # stops the answer
    page.wait_for_selector(".msg.assistant .flag")
    assert page.locator(".msg.user .body").inner_text() == "line one\nline two"
    page.keyboard.press("Shift+Tab")
    focused = page.evaluate("document.activeElement.id || document.activeElement.textContent")
    assert focused  # focus moved to a real control


def test_closing_the_page_mid_answer_keeps_what_arrived(browser: Any, site: dict[str, Any]) -> None:
    context = browser.new_context(bypass_csp=True)
    page = context.new_page()
    sign_in(page, site)
    send(page, "An answer I will not wait for")
    page.wait_for_function("document.querySelector('.msg.assistant .body')?.textContent.includes('word3')")
    url = page.url
    context.close()  # the tab goes away mid-stream
    context = browser.new_context(bypass_csp=True)
    page = context.new_page()
    try:
        sign_in(page, site)
        page.goto(url)
        answer = page.locator(".msg.assistant")
        answer.wait_for()
        assert answer.locator(".flag").inner_text() in ("stopped", "interrupted")
        assert "Paris" in answer.locator(".body").inner_text()  # saved as far as it got
    finally:
        context.close()


def test_two_hundred_long_messages_stay_responsive(page: Any, site: dict[str, Any]) -> None:
    from souverain.db import chat

    db = site["db"]
    with db.session() as s:
        user = accounts.get_user(s, email=site["email"])
        org = accounts.memberships(s, user=user)[0][0]
        conv = chat.create_conversation(s, user_id=user.id, org_id=org.id, model="llama-scripted", title="Long one")
        parent = None
        for i in range(200):
            role = "user" if i % 2 == 0 else "assistant"
            text = (f"## Part {i}\n\n" + "A long paragraph with **bold** and `code`. " * 60
                    + "\n\n```python\nprint('block')\n```\n")
            parent = chat.add_message(s, conv=conv, role=role, content=text, parent_id=parent).id
        cid = conv.id
    sign_in(page, site)
    started = time.monotonic()
    page.goto(f"{site['url']}/c/{cid}")
    page.wait_for_function("document.querySelectorAll('.msg').length === 200")
    opened = time.monotonic() - started
    send(page, "Still quick?")
    page.wait_for_function("document.querySelectorAll('.msg').length === 202")
    page.wait_for_function("[...document.querySelectorAll('.msg.assistant .body')].at(-1).textContent"
                           ".includes('table')")
    finish(page)  # the history outgrew the context: the oldest turns were left out, and the answer came
    print(f"opened a 200-message conversation in {opened:.2f} s")  # reported, not asserted: machines vary


def test_security_headers_cookie_and_csrf(site: dict[str, Any]) -> None:
    import http.cookiejar
    import json
    import urllib.error
    import urllib.request

    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    with opener.open(site["url"] + "/") as r:
        csp = r.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp.split("style-src")[0]
    login = urllib.request.Request(site["url"] + "/app/api/login", json.dumps(
        {"email": site["email"], "password": site["password"]}).encode(), {"Content-Type": "application/json"})
    with opener.open(login) as r:
        cookie = r.headers["set-cookie"].lower()
        csrf = json.loads(r.read())["csrf"]
    assert "httponly" in cookie and "samesite=strict" in cookie
    body = json.dumps({"model": "llama-scripted", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 2}).encode()
    forged = urllib.request.Request(site["url"] + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        opener.open(forged)  # the cookie alone, as a cross-site form would send it
    assert e.value.code == 403
    ok = urllib.request.Request(site["url"] + "/v1/chat/completions", body,
                                {"Content-Type": "application/json", "x-csrf-token": csrf})
    with opener.open(ok) as r:
        assert json.loads(r.read())["usage"]["completion_tokens"] == 2
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(site["url"] + "/app/api/me"))  # no session
    assert e.value.code == 401


def test_another_users_conversation_cannot_be_exported(site: dict[str, Any]) -> None:
    """Export is read access: a conversation id of someone else (another organisation) is a 404, as opening it."""
    import http.cookiejar
    import json
    import urllib.error
    import urllib.request

    from souverain.db import chat

    with site["db"].session() as s:
        owner = accounts.get_user(s, email=site["email"])
        org = accounts.memberships(s, user=owner)[0][0]
        secret = chat.create_conversation(s, user_id=owner.id, org_id=org.id, model="llama-scripted", title="Secret")
        chat.add_message(s, conv=secret, role="user", content="the launch codes", parent_id=None)
        cid = secret.id
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    login = urllib.request.Request(site["url"] + "/app/api/login", json.dumps(
        {"email": FREE_EMAIL, "password": FREE_PASSWORD}).encode(), {"Content-Type": "application/json"})
    opener.open(login).close()
    for fmt in ("md", "json"):
        with pytest.raises(urllib.error.HTTPError) as e:
            opener.open(site["url"] + f"/app/api/conversations/{cid}/export?format={fmt}")
        assert e.value.code == 404 and b"launch codes" not in e.value.read()
    with pytest.raises(urllib.error.HTTPError) as e:  # and without a session at all
        urllib.request.urlopen(site["url"] + f"/app/api/conversations/{cid}/export")
    assert e.value.code == 401
