"""Run by test_finetune_sdk.py in its own process, with Mistral's SDK 1.12.4 (the last with fine-tuning) on
PYTHONPATH: upload, create a job, poll it, then ask the fine-tuned and the base model. Prints JSON."""

from __future__ import annotations

import json
import sys
import time

from mistralai import Mistral


def main(url: str, key: str, train_path: str, valid_path: str, questions: list[str]) -> None:
    client = Mistral(api_key=key, server_url=url)
    with open(train_path, "rb") as f:
        train = client.files.upload(file={"file_name": "facts.jsonl", "content": f.read()})
    with open(valid_path, "rb") as f:
        valid = client.files.upload(file={"file_name": "valid.jsonl", "content": f.read()})
    job = client.fine_tuning.jobs.create(
        model="smollm2", training_files=[{"file_id": train.id, "weight": 1}], validation_files=[valid.id],
        suffix="quorvex", hyperparameters={"training_steps": 12, "learning_rate": 1e-3}, auto_start=True)
    deadline = time.monotonic() + 900
    while True:
        detail = client.fine_tuning.jobs.get(job_id=job.id)
        if detail.status in ("SUCCESS", "FAILED", "FAILED_VALIDATION", "CANCELLED") or time.monotonic() > deadline:
            break
        time.sleep(2)
    out = {"status": detail.status, "model": detail.fine_tuned_model, "events": [e.model_dump() for e in
                                                                                   detail.events or []],
           "checkpoints": [{"step": c.step_number, "valid_loss": c.metrics.valid_loss,
                            "train_loss": c.metrics.train_loss} for c in detail.checkpoints or []],
           "files": [train.id, valid.id], "answers": {}, "base": {}}
    if detail.status == "SUCCESS":
        for q in questions:
            for name, model in (("answers", detail.fine_tuned_model), ("base", "smollm2")):
                r = client.chat.complete(model=model, messages=[{"role": "user", "content": q}], temperature=0,
                                         max_tokens=40)
                out[name][q] = r.choices[0].message.content
        out["listed"] = [m.id for m in client.models.list().data]
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5]))
