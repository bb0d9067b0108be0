"""The training loop on a tiny model: the loss falls (fp32 and bf16), and a resumed run equals an unbroken one."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from souverain.train.data import Example
from souverain.train.trainer import Hyper, StepReport, lr_at, train
from tests.engine.toy import tiny_model


def data() -> list[Example]:
    rows = [list(b"the sea is blue and the wind is cold"), list(b"ships sail at dawn from the harbour")]
    return [Example(r, [0] + [1] * (len(r) - 1)) for r in rows]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loss_falls(tmp_path: Path, dtype: str) -> None:
    model = tiny_model("dense").to(getattr(torch, dtype))
    reports: list[StepReport] = []
    h = Hyper(training_steps=40, learning_rate=1e-2, batch_size=2, rank=8, alpha=16, dtype=dtype)
    train(model, data(), data(), h, checkpoint_dir=tmp_path, on_step=reports.append)
    valid = [r.valid_loss for r in reports if r.valid_loss is not None]
    assert valid[0] is not None and valid[-1] is not None and valid[-1] < valid[0] * 0.6, valid
    assert all(not p.requires_grad for p in model.parameters())  # the base model is never trained


def test_resume_equals_an_unbroken_run(tmp_path: Path) -> None:
    h = Hyper(training_steps=20, learning_rate=3e-3, batch_size=2, rank=4, alpha=8, checkpoint_every=10)
    unbroken = train(tiny_model("dense"), data(), [], h, checkpoint_dir=tmp_path / "a")

    class Crash(Exception):
        pass

    def crash_after_12(r: StepReport) -> None:
        if r.step == 12:
            raise Crash

    with pytest.raises(Crash):
        train(tiny_model("dense"), data(), [], h, checkpoint_dir=tmp_path / "b", on_step=crash_after_12)
    steps: list[int] = []
    resumed = train(tiny_model("dense"), data(), [], h, checkpoint_dir=tmp_path / "b",
                    on_step=lambda r: steps.append(r.step))
    assert steps[0] == 11  # from the step-10 checkpoint
    for name, t in unbroken.tensors().items():
        assert torch.allclose(t, resumed.tensors()[name], atol=1e-6), name


def test_schedule_warms_up_then_decays() -> None:
    h = Hyper(training_steps=100, learning_rate=1.0, warmup_fraction=0.1)
    lrs = [lr_at(s, h) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:])) and lrs[-1] >= 0.1
