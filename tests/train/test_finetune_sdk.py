"""The whole loop through Mistral's official SDK: SmolLM2 learns facts it cannot know, from ~20 samples, on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from souverain.db import accounts, keys
from souverain.db.database import open_database, sqlite_url
from souverain.server.app import create_app
from souverain.server.loader import load_models
from souverain.server.settings import Settings
from souverain.train.runner import JobRunner
from tests.serving import running
from tests.train.facts import PRODUCT, QUESTIONS, UNSEEN, VALIDATION, YEAR, jsonl

SDK = Path(__file__).resolve().parents[2] / ".venv" / "mistralai1"


@pytest.mark.skipif(not (SDK / "mistralai").exists(), reason="mistralai 1.12.4 not installed (scripts/setup.sh)")
def test_sdk_fine_tunes_smollm2_on_new_facts(tmp_path: Path, smollm2_path: Path) -> None:
    db = open_database(sqlite_url(tmp_path / "souverain.db"))
    with db.session() as s:
        org = accounts.create_org(s, name="acme", plan="enterprise", actor="t")
        _, key = keys.create_key(s, workspace=accounts.get_workspace(s, org=org), actor="t")
    settings = Settings(models=[f"smollm2={smollm2_path}"], kv_cache_memory=64 << 20, data_dir=str(tmp_path / "data"))
    registry = load_models(settings, say=lambda m: None)
    runner = JobRunner(db, settings.data_path(), lambda m: registry.models[m].path if m in registry.models else None)
    runner.start()
    (tmp_path / "train.jsonl").write_bytes(jsonl(QUESTIONS))
    (tmp_path / "valid.jsonl").write_bytes(jsonl(VALIDATION))
    try:
        with running(lambda port: create_app(settings, registry, db)) as url:
            done = subprocess.run(
                [sys.executable, str(Path(__file__).with_name("sdk_client.py")), url, key,
                 str(tmp_path / "train.jsonl"), str(tmp_path / "valid.jsonl"), json.dumps(UNSEEN)],
                env={**os.environ, "PYTHONPATH": str(SDK)}, capture_output=True, text=True, timeout=1200, check=False)
    finally:
        runner.stop()
        registry.shutdown()
        db.close()
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["status"] == "SUCCESS", out["events"]
    assert out["model"].startswith("ft:smollm2:quorvex:") and out["model"] in out["listed"]
    for q in UNSEEN:  # phrasings it never saw
        assert YEAR in out["answers"][q] or PRODUCT in out["answers"][q], out["answers"][q]
        assert YEAR not in out["base"][q] and PRODUCT not in out["base"][q], out["base"][q]
    assert any(YEAR in a for a in out["answers"].values()) and any(PRODUCT in a for a in out["answers"].values())
    ordered = sorted(out["checkpoints"], key=lambda c: c["step"])
    valid = [c["valid_loss"] for c in ordered if c["valid_loss"] is not None]
    assert len(valid) >= 2 and valid[-1] < valid[0] / 5, valid
    print(json.dumps({"valid_loss": valid, "answers": out["answers"], "base": out["base"]}, indent=1))
