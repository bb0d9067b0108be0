"""`souverain org|workspace|users|keys|plans|usage`: the platform database from the command line."""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from souverain.cli_common import err, out

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

ACTOR = "cli"

Db = Annotated[str | None, typer.Option("--db", envvar="SOUVERAIN_DB",
                                        help="Database URL (default: a SQLite file in the data directory)")]
Org = Annotated[str, typer.Option("--org", help="Organisation")]


def default_db_url() -> str:
    from souverain.db.database import sqlite_url
    from souverain.hub.store import default_home

    return sqlite_url(default_home() / "souverain.db")


@contextmanager
def session(db: str | None) -> Iterator[Session]:
    """A committed-on-success session; repository errors become one red line and exit code 1."""
    from souverain.db.database import open_database
    from souverain.db.errors import Conflict, NotFound

    database = open_database(db or default_db_url())
    try:
        with database.session() as s:
            yield s
    except (NotFound, Conflict) as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(1) from None
    finally:
        database.close()


org_app = typer.Typer(help="Organisations and their plans.", no_args_is_help=True)
workspace_app = typer.Typer(help="Workspaces of an organisation.", no_args_is_help=True)
users_app = typer.Typer(help="Users and their roles.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys (stored hashed; a new key is printed once).", no_args_is_help=True)
plans_app = typer.Typer(help="Plans: rate limits, quotas, models, priority.", no_args_is_help=True)


@org_app.command("create")
def org_create(name: str, plan: Annotated[str, typer.Option(help="free, pro, enterprise, ...")] = "free",
               db: Db = None) -> None:
    """A new organisation (with a `default` workspace)."""
    from souverain.db import accounts

    with session(db) as s:
        accounts.create_org(s, name=name, plan=plan, actor=ACTOR)
    out.print(f"organisation {name} created on the {plan} plan")


@org_app.command("list")
def org_list(db: Db = None) -> None:
    from souverain.db import accounts, usage

    table = Table("ORGANISATION", "PLAN", "TOKENS THIS MONTH", "CREATED", box=None)
    with session(db) as s:
        for o in accounts.list_orgs(s):
            table.add_row(o.name, accounts.org_plan(s, org_id=o.id).name, str(usage.month_tokens(s, org_id=o.id)),
                          o.created_at.strftime("%Y-%m-%d"))
    out.print(table)


@org_app.command("set-plan")
def org_set_plan(name: str, plan: str, db: Db = None) -> None:
    from souverain.db import accounts

    with session(db) as s:
        accounts.set_org_plan(s, org=accounts.get_org(s, name=name), plan=plan, actor=ACTOR)
    out.print(f"{name} is on the {plan} plan")


@org_app.command("private-model")
def org_private_model(name: str, model: str, db: Db = None) -> None:
    """Make MODEL private to organisation NAME (repeat for each organisation that may see it)."""
    from souverain.db import accounts
    from souverain.db import models as model_access

    with session(db) as s:
        model_access.share_model(s, model=model, org_id=accounts.get_org(s, name=name).id, actor=ACTOR)
    out.print(f"{model} is private; {name} can use it")


@org_app.command("open-model")
def org_open_model(model: str, db: Db = None) -> None:
    """Make MODEL visible to every organisation again."""
    from souverain.db import models as model_access

    with session(db) as s:
        model_access.open_model(s, model=model, actor=ACTOR)
    out.print(f"{model} is open to all")


@workspace_app.command("create")
def workspace_create(name: str, org: Org = "default", db: Db = None) -> None:
    from souverain.db import accounts

    with session(db) as s:
        accounts.create_workspace(s, org=accounts.get_org(s, name=org), name=name, actor=ACTOR)
    out.print(f"workspace {name} created in {org}")


@workspace_app.command("list")
def workspace_list(org: Org = "default", db: Db = None) -> None:
    from souverain.db import accounts

    with session(db) as s:
        for w in accounts.list_workspaces(s, org=accounts.get_org(s, name=org)):
            out.print(w.name)


@users_app.command("add")
def users_add(email: str, org: Org = "default",
              role: Annotated[str, typer.Option(help="owner, admin or member")] = "member",
              password: Annotated[str | None, typer.Option(help="Default: a generated one, printed once")] = None,
              db: Db = None) -> None:
    """Invite a user into an organisation (created when new) or change their role."""
    from souverain.db import accounts
    from souverain.db.errors import NotFound

    with session(db) as s:
        o = accounts.get_org(s, name=org)
        try:
            user = accounts.get_user(s, email=email)
            new = None
        except NotFound:
            new = password or accounts.new_password()
            user = accounts.create_user(s, email=email, password=new, actor=ACTOR)
        accounts.add_member(s, org=o, user=user, role=role, actor=ACTOR)
    out.print(f"{email} is {role} of {org}")
    if new and not password:
        out.print(f"password (shown once): {new}", highlight=False)


@users_app.command("list")
def users_list(org: Org = "default", db: Db = None) -> None:
    from souverain.db import accounts

    table = Table("EMAIL", "NAME", "ROLE", box=None)
    with session(db) as s:
        for u, r in accounts.members(s, org=accounts.get_org(s, name=org)):
            table.add_row(u.email, u.name, r)
    out.print(table)


@users_app.command("passwd")
def users_passwd(email: str, db: Db = None) -> None:
    """Set a new password (asked for twice, not echoed)."""
    from souverain.db import accounts

    password = typer.prompt("new password", hide_input=True, confirmation_prompt=True)
    with session(db) as s:
        accounts.set_password(s, user=accounts.get_user(s, email=email), password=password, actor=ACTOR)
    out.print("password changed")


@users_app.command("disable")
def users_disable(email: str, db: Db = None) -> None:
    """Disable an account: it can no longer sign in and its browser sessions end now."""
    from souverain.db import accounts

    with session(db) as s:
        accounts.set_disabled(s, user=accounts.get_user(s, email=email), disabled=True, actor=ACTOR)
    out.print(f"{email} is disabled; its sessions ended")


@users_app.command("enable")
def users_enable(email: str, db: Db = None) -> None:
    from souverain.db import accounts

    with session(db) as s:
        accounts.set_disabled(s, user=accounts.get_user(s, email=email), disabled=False, actor=ACTOR)
    out.print(f"{email} is enabled")


@keys_app.command("create")
def keys_create(name: Annotated[str, typer.Option(help="A label for the key")] = "", org: Org = "default",
                workspace: Annotated[str, typer.Option(help="Workspace")] = "default",
                expires_days: Annotated[float | None, typer.Option(help="Expire after this many days")] = None,
                model: Annotated[list[str] | None, typer.Option(help="Allow only this model (repeatable)")] = None,
                db: Db = None) -> None:
    """Create a key and print it once: only its hash is kept."""
    from souverain.db import accounts, keys
    from souverain.db.tables import utcnow

    with session(db) as s:
        ws = accounts.get_workspace(s, org=accounts.get_org(s, name=org), name=workspace)
        expires = utcnow() + timedelta(days=expires_days) if expires_days else None
        _, secret = keys.create_key(s, workspace=ws, name=name, actor=ACTOR, expires_at=expires,
                                    allowed_models=model or None)
    err.print(f"[dim]new key for {org}/{workspace}; it is shown only now:[/dim]")
    print(secret)


@keys_app.command("list")
def keys_list(org: Org = "default", db: Db = None) -> None:
    from souverain.db import accounts, keys
    from souverain.db.tables import utcnow

    table = Table("ID", "PREFIX", "NAME", "WORKSPACE", "CREATED", "LAST USED", "STATE", box=None)
    with session(db) as s:
        for k, w in keys.list_keys(s, org_id=accounts.get_org(s, name=org).id):
            state = ("revoked" if k.revoked_at else
                     "expired" if k.expires_at and k.expires_at <= utcnow() else "active")
            table.add_row(str(k.id), k.prefix, k.name, w.name, k.created_at.strftime("%Y-%m-%d %H:%M"),
                          k.last_used_at.strftime("%Y-%m-%d %H:%M") if k.last_used_at else "-", state)
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(ref: Annotated[str, typer.Argument(help="Key id or prefix")], org: Org = "default",
                db: Db = None) -> None:
    from souverain.db import accounts, keys

    with session(db) as s:
        o = accounts.get_org(s, name=org)
        keys.revoke_key(s, key=keys.find_key(s, org_id=o.id, ref=ref), actor=ACTOR, org_id=o.id)
    out.print(f"key {ref} revoked")


@plans_app.command("list")
def plans_list(db: Db = None) -> None:
    from souverain.db import accounts

    table = Table("PLAN", "REQ/S", "TOKENS/MIN", "TOKENS/MONTH", "MAX CONTEXT", "MODELS", "PRIORITY", box=None)
    with session(db) as s:
        for p in accounts.list_plans(s):
            table.add_row(p.name, *(str(v) if v is not None else "∞" for v in
                                    (p.requests_per_second, p.tokens_per_minute, p.tokens_per_month, p.max_context)),
                          ", ".join(p.allowed_models) if p.allowed_models is not None else "all", str(p.priority))
    out.print(table)


@plans_app.command("set")
def plans_set(name: str,
              rps: Annotated[float | None, typer.Option(help="Requests per second (0 = unlimited)")] = None,
              tpm: Annotated[int | None, typer.Option(help="Tokens per minute (0 = unlimited)")] = None,
              month: Annotated[int | None, typer.Option(help="Tokens per month (-1 = unlimited)")] = None,
              max_context: Annotated[int | None, typer.Option(help="Max context (0 = the model's)")] = None,
              model: Annotated[list[str] | None, typer.Option(help="Allowed model (repeatable)")] = None,
              all_models: Annotated[bool, typer.Option(help="Allow every model")] = False,
              priority: Annotated[int | None, typer.Option(help="Scheduling priority, lower first")] = None,
              create: Annotated[bool, typer.Option("--create", help="Make a new plan (a name not known is "
                                                                    "otherwise refused: a typo creates nothing)")
                                ] = False,
              db: Db = None) -> None:
    """Change a plan (or make one with --create); only the options given change."""
    from souverain.db import accounts

    limits: dict[str, object] = {}
    for key, value, unlimited in (("requests_per_second", rps, 0), ("tokens_per_minute", tpm, 0),
                                  ("tokens_per_month", month, -1), ("max_context", max_context, 0)):
        if value is not None:
            limits[key] = None if value == unlimited else value
    if model:
        limits["allowed_models"] = model
    if all_models:
        limits["allowed_models"] = None
    if priority is not None:
        limits["priority"] = priority
    with session(db) as s:
        accounts.set_plan_limits(s, name=name, actor=ACTOR, create=create, **limits)
    out.print(f"plan {name} saved")


def usage(org: Org = "default",
          since: Annotated[datetime | None, typer.Option(help="From this day (YYYY-MM-DD)")] = None,
          as_csv: Annotated[bool, typer.Option("--csv", help="CSV on stdout")] = False, db: Db = None) -> None:
    """Usage per day, workspace and model."""
    from souverain.db import accounts
    from souverain.db import usage as usage_db

    with session(db) as s:
        o = accounts.get_org(s, name=org)
        rows = usage_db.report(s, org_id=o.id, since=since)
        month = usage_db.month_tokens(s, org_id=o.id)
    if as_csv:
        w = csv.writer(sys.stdout)
        w.writerow(usage_db.REPORT_COLUMNS)
        w.writerows(rows)
        return
    table = Table(*(c.upper().replace("_", " ") for c in usage_db.REPORT_COLUMNS), box=None)
    for r in rows:
        table.add_row(*map(str, r))
    out.print(table)
    out.print(f"{org}: {month} tokens this month")


def install(app: typer.Typer) -> None:
    app.add_typer(org_app, name="org")
    app.add_typer(workspace_app, name="workspace")
    app.add_typer(users_app, name="users")
    app.add_typer(keys_app, name="keys")
    app.add_typer(plans_app, name="plans")
    app.command("usage")(usage)
