"""Roles and sessions: owners are only touched by owners, the last owner stays, outsiders are invited (the API
never says whether an e-mail exists), and sessions end on password change, disable and removal. On SQLite and
PostgreSQL."""

from __future__ import annotations

import pytest

from souverain.db import accounts, keys
from souverain.db.database import Database
from tests.server.platform_app import Browser, call

PW = "a long password"


@pytest.fixture
def people(db: Database) -> dict[str, str]:
    """acme: an owner and an admin (with keys); globex: its own owner, who is also an existing account."""
    out = {}
    with db.session() as s:
        acme, globex = (accounts.create_org(s, name=n, plan="pro", actor="t") for n in ("acme", "globex"))
        for email, org, role in (("owner@acme.example", acme, "owner"), ("admin@acme.example", acme, "admin"),
                                 ("boss@globex.example", globex, "owner")):
            user = accounts.create_user(s, email=email, password=PW, actor="t")
            accounts.add_member(s, org=org, user=user, role=role, actor="t")
            out[role if org is acme else "outsider"] = keys.create_key(
                s, workspace=accounts.get_workspace(s, org=org), actor="t", user_id=user.id)[1]
    return out


def test_an_admin_cannot_touch_the_owner(url: str, people: dict[str, str]) -> None:
    admin, owner = people["admin"], people["owner"]
    for body in ({"email": "owner@acme.example", "role": "member"}, {"email": "admin@acme.example", "role": "owner"}):
        status, _, answer = call(url, "POST", "/v1/admin/members", admin, body)
        assert status == 403 and answer["type"] == "permission_error", answer
    assert call(url, "DELETE", "/v1/admin/members/owner@acme.example", admin)[0] == 403
    # The owner may not leave the organisation without an owner ...
    status, _, answer = call(url, "POST", "/v1/admin/members", owner, {"email": "owner@acme.example", "role": "admin"})
    assert status == 409 and "last owner" in answer["message"]
    assert call(url, "DELETE", "/v1/admin/members/owner@acme.example", owner)[0] == 409
    # ... but may hand over: a second owner first, then step down.
    assert call(url, "POST", "/v1/admin/members", owner, {"email": "admin@acme.example", "role": "owner"})[0] == 201
    assert call(url, "POST", "/v1/admin/members", owner, {"email": "owner@acme.example", "role": "member"})[0] == 201
    roles = {m["email"]: m["role"] for m in call(url, "GET", "/v1/admin/members", admin)[2]["data"]}
    assert roles == {"owner@acme.example": "member", "admin@acme.example": "owner"}


def test_outsiders_are_invited_and_existence_is_never_told(url: str, people: dict[str, str], db: Database) -> None:
    admin = people["admin"]
    existing = call(url, "POST", "/v1/admin/members", admin, {"email": "boss@globex.example", "role": "member"})
    unknown = call(url, "POST", "/v1/admin/members", admin, {"email": "new@nowhere.example", "role": "member"})
    assert existing[0] == unknown[0] == 201
    assert set(existing[2]) == set(unknown[2]) == {"email", "role", "invitation", "expires_at"}
    # Not a member yet: the globex owner's next sign-in still lands in globex only.
    boss = Browser(url)
    assert boss.login("boss@globex.example", PW)[1]["organisations"] == ["globex"]
    # Accepting needs the account's password; a wrong one is refused like a bad sign-in.
    token = existing[2]["invitation"]
    assert Browser(url).call("POST", "/app/api/invitations/accept", {"token": token, "password": "wrong"})[0] == 401
    assert Browser(url).call("POST", "/app/api/invitations/accept", {"token": "inv-forged-token", "password": PW}
                             )[0] == 401
    status, _, answer = Browser(url).call("POST", "/app/api/invitations/accept", {"token": token, "password": PW})
    assert status == 200 and answer["organisation"] == "acme" and answer["role"] == "member"
    assert Browser(url).call("POST", "/app/api/invitations/accept", {"token": token, "password": PW})[0] == 401
    # Now a member of both: sign-in lets them choose, and refuses an organisation they are not in.
    status, answer = boss.login("boss@globex.example", PW, organisation="acme")
    assert status == 200 and answer["organisation"] == "acme" and sorted(answer["organisations"]) == ["acme", "globex"]
    assert boss.call("GET", "/app/api/me")[2]["organisation"] == "acme"
    assert boss.login("boss@globex.example", PW, organisation="initech")[0] == 403
    boss.login("boss@globex.example", PW, organisation="acme")
    assert sorted(boss.call("GET", "/app/api/me")[2]["organisations"]) == ["acme", "globex"]
    status, _, answer = boss.call("POST", "/app/api/switch", {"organisation": "globex"})  # the app's selector
    assert status == 200 and boss.call("GET", "/app/api/me")[2]["organisation"] == "globex"
    assert boss.call("POST", "/app/api/switch", {"organisation": "initech"})[0] == 403
    # A new e-mail's invitation creates the account with the password given.
    status, _, answer = Browser(url).call("POST", "/app/api/invitations/accept",
                                          {"token": unknown[2]["invitation"], "password": "brand new password"})
    assert status == 200 and Browser(url).login("new@nowhere.example", "brand new password")[0] == 200


def test_sessions_end_on_password_change_disable_and_removal(url: str, people: dict[str, str], db: Database
                                                             ) -> None:
    first, second = Browser(url), Browser(url)
    for b in (first, second):
        assert b.login("admin@acme.example", PW)[0] == 200 and b.call("GET", "/app/api/me")[0] == 200
    # A password change: every other session ends, the changing browser keeps a fresh one.
    status, _, _ = first.call("POST", "/app/api/password", {"current": "wrong", "new": "another long one"})
    assert status == 403
    assert first.call("POST", "/app/api/password", {"current": PW, "new": "another long one"})[0] == 200
    assert first.call("GET", "/app/api/me")[0] == 200 and second.call("GET", "/app/api/me")[0] == 401
    # Disabled: the session ends and the user's API key stops working.
    with db.session() as s:
        accounts.set_disabled(s, user=accounts.get_user(s, email="admin@acme.example"), disabled=True, actor="t")
    assert first.call("GET", "/app/api/me")[0] == 401
    assert call(url, "GET", "/v1/models", people["admin"])[0] == 401
    assert first.login("admin@acme.example", "another long one")[0] == 401
    # Removed from the organisation: its sessions there end and the keys they made there are revoked.
    member = Browser(url)
    with db.session() as s:
        acme = accounts.get_org(s, name="acme")
        user = accounts.create_user(s, email="temp@acme.example", password=PW, actor="t")
        accounts.add_member(s, org=acme, user=user, role="member", actor="t")
        temp_key = keys.create_key(s, workspace=accounts.get_workspace(s, org=acme), actor="t", user_id=user.id)[1]
    assert member.login("temp@acme.example", PW)[0] == 200
    assert call(url, "DELETE", "/v1/admin/members/temp@acme.example", people["owner"])[0] == 200
    assert member.call("GET", "/app/api/me")[0] == 401
    assert call(url, "GET", "/v1/models", temp_key)[0] == 401
    assert call(url, "DELETE", "/v1/admin/members/nobody@acme.example", people["owner"])[0] == 404


def test_invitations_are_bounded_per_organisation(url: str, people: dict[str, str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accounts, "MAX_PENDING_INVITATIONS", 3)
    answers = [call(url, "POST", "/v1/admin/members", people["admin"], {"email": f"n{i}@x.example"})[0]
               for i in range(4)]
    assert answers == [201, 201, 201, 409]
