"""Validate one fine-tuning job's files in a process of its own: `python -m souverain.train.validate --job ID`.

Parsing megabytes of JSONL is CPU work that would hold the server's GIL (and its event loop) for seconds; the
server's job runner starts this instead and reads the verdict from the job's status.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from souverain.db import finetune
from souverain.db.database import Database, open_database
from souverain.train.data import validate_jsonl


def validate(db: Database, job_id: str) -> list[str]:
    """The job's problems (empty: valid), each naming its file and line; the job's status says the same."""
    with db.reading() as s:
        job = finetune.get_job(s, job_id=job_id, org_id=None)
        refs = [f["file_id"] for f in job.training_files] + list(job.validation_files)
        org_id = job.org_id
        found = []
        errors: list[str] = []
        for file_id in refs:
            try:
                row = finetune.get_file(s, file_id=file_id, org_id=org_id)
                found.append((row.filename, row.path))
            except LookupError:
                errors.append(f"file {file_id}: not found")
    for name, path in found:
        errors += [f"{name}: {e}" for e in validate_jsonl(Path(path).read_bytes()).errors]
    with db.session() as s:
        job = finetune.get_job(s, job_id=job_id, org_id=None)
        if job.status == "VALIDATING":  # not cancelled meanwhile
            if errors:
                finetune.set_status(job, "FAILED_VALIDATION", errors=errors)
            else:
                finetune.set_status(job, "VALIDATED")
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--job", required=True)
    a = parser.parse_args()
    db = open_database(os.environ["SOUVERAIN_DB"], migrate=False)
    try:
        validate(db, a.job)
    finally:
        db.close()


if __name__ == "__main__":
    main()
