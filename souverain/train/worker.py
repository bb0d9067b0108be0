"""One fine-tuning job, run in its own process: `python -m souverain.train.worker --db URL --job ID ...`.

It loads the base model (fp32, or bf16 when the job asks), trains, and writes progress (per-step losses,
checkpoints) to the database, so the server stays responsive and a killed worker resumes from its last
checkpoint when started again.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch

from souverain.db import finetune
from souverain.db import models as model_access
from souverain.db.database import Database, open_database
from souverain.tokenizer.base import Tokenizer
from souverain.train.adapter import save_adapter
from souverain.train.data import Example, pack, tokenize, validate_jsonl
from souverain.train.trainer import Hyper, StepReport, Stopped, train


def hyper_from(params: dict[str, object], train_sequences: int) -> Hyper:
    """The job's hyperparameters (Mistral's names) as ours; `epochs` becomes a step count."""
    known = {k: v for k, v in params.items() if k in Hyper.__dataclass_fields__ and v is not None}
    h = Hyper(**known)  # type: ignore[arg-type]
    epochs = params.get("epochs")
    if params.get("training_steps") is None and isinstance(epochs, int | float) and epochs > 0:
        steps = max(1, math.ceil(float(epochs) * train_sequences / h.batch_size))
        h = Hyper(**{**known, "training_steps": steps})  # type: ignore[arg-type]
    cap = params.get("max_steps")  # the plan's cap, recorded with the job
    if isinstance(cap, int) and h.training_steps > cap:
        h = Hyper(**{**known, "training_steps": cap})  # type: ignore[arg-type]
    return h


def load_examples(db: Database, job_id: str, tok: Tokenizer, seq_len: int) -> tuple[list[Example], list[Example]]:
    with db.session() as s:
        job = finetune.get_job(s, job_id=job_id, org_id=None)
        train_refs = [(finetune.get_file(s, file_id=f["file_id"], org_id=None).path, float(f.get("weight", 1)))
                      for f in job.training_files]
        valid_paths = [finetune.get_file(s, file_id=f, org_id=None).path for f in job.validation_files]
    train_set: list[Example] = []
    for path, weight in train_refs:
        examples = pack([tokenize(x, tok) for x in validate_jsonl(Path(path).read_bytes()).samples], seq_len)
        # A file's weight repeats (or thins) its sequences in the sampling pool.
        keep = max(1, round(len(examples) * weight))
        train_set += examples * max(1, round(weight)) if weight >= 1 else examples[:keep]
    valid_set = [tokenize(x, tok) for p in valid_paths for x in validate_jsonl(Path(p).read_bytes()).samples]
    return train_set, [e for v in valid_set for e in pack([v], seq_len)]


def run(db_url: str, job_id: str, model_path: Path, data_dir: Path) -> int:
    from souverain.tokenizer import load_tokenizer
    from souverain.weights import load_model

    torch.manual_seed(0)
    db = open_database(db_url, migrate=False)
    job_dir = data_dir / "jobs" / job_id
    try:
        with db.session() as s:
            job = finetune.get_job(s, job_id=job_id, org_id=None)
            params, base, suffix, org_id = dict(job.hyperparameters), job.model, job.suffix, job.org_id
            resumed = (job_dir / "checkpoint").exists()
            finetune.add_event(job, "worker-started", {"resumed": resumed})
        tok = load_tokenizer(model_path)
        model = load_model(model_path, dtype=getattr(torch, str(params.get("dtype") or "float32")))
        train_set, valid_set = load_examples(db, job_id, tok, int(params.get("seq_len") or 512))
        h = hyper_from(params, len(train_set))

        def on_step(r: StepReport) -> None:
            with db.session() as s:
                job = finetune.get_job(s, job_id=job_id, org_id=None)
                finetune.add_checkpoint(job, r.step, r.train_loss, r.valid_loss, r.tokens)

        def should_stop() -> bool:
            with db.session() as s:
                return finetune.get_job(s, job_id=job_id, org_id=None).status == "CANCELLATION_REQUESTED"

        lora = train(model, train_set, valid_set, h, checkpoint_dir=job_dir, on_step=on_step,
                     should_stop=should_stop)
        model_id = f"ft:{base}:{suffix or 'custom'}:{job_id[:8]}"
        save_adapter(data_dir / "adapters" / job_id, lora, base=base, meta={"id": model_id, "job": job_id})
        with db.session() as s:
            job = finetune.get_job(s, job_id=job_id, org_id=None)
            job.fine_tuned_model = model_id
            finetune.set_status(job, "SUCCESS", fine_tuned_model=model_id)
            if org_id is not None:  # a fine-tuned model belongs to its organisation
                model_access.share_model(s, model=model_id, org_id=org_id, actor=f"job:{job_id}")
        return 0
    except Stopped:
        with db.session() as s:
            finetune.set_status(finetune.get_job(s, job_id=job_id, org_id=None), "CANCELLED")
        return 0
    except Exception as e:
        with db.session() as s:
            finetune.set_status(finetune.get_job(s, job_id=job_id, org_id=None), "FAILED",
                                error=f"{type(e).__name__}: {e}")
        return 1
    finally:
        db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--db", required=True, help="database URL, or `env` to read SOUVERAIN_DB")
    parser.add_argument("--job", required=True)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--threads", type=int, default=0)
    a = parser.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    url = os.environ["SOUVERAIN_DB"] if a.db == "env" else a.db
    raise SystemExit(run(url, a.job, a.model, a.data_dir))


if __name__ == "__main__":
    main()
