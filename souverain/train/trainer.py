"""The LoRA training loop: packed sequences, gradient accumulation, AdamW with warmup and cosine decay,
checkpoints to resume from, and a stop flag checked every step."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from souverain.model.lora import LoraArgs, LoraBatch, LoraWeights
from souverain.model.transformer import Transformer
from souverain.train.data import Example


@dataclass(frozen=True)
class Hyper:
    training_steps: int = 50
    learning_rate: float = 1e-4
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    seq_len: int = 512
    batch_size: int = 4  # sequences per optimiser step
    micro_batch: int = 4  # sequences per forward; batch_size / micro_batch forwards are accumulated
    rank: int = 16
    alpha: float = 32.0
    seed: int = 0
    eval_every: int = 10
    checkpoint_every: int = 10
    dtype: str = "float32"  # the frozen base model's compute dtype (float32 or bfloat16); LoRA weights stay fp32


@dataclass
class StepReport:
    step: int
    train_loss: float
    valid_loss: float | None
    lr: float
    tokens: int


class Stopped(Exception):
    """The job was cancelled between two steps."""


def lr_at(step: int, h: Hyper) -> float:
    """Linear warmup, then cosine decay to a tenth (step is 0-based)."""
    warm = max(1, round(h.warmup_fraction * h.training_steps)) if h.warmup_fraction > 0 else 0
    if step < warm:
        return h.learning_rate * (step + 1) / warm
    progress = (step - warm) / max(1, h.training_steps - warm)
    return h.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_loss(model: Transformer, lora: LoraWeights, batch: list[Example]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the learned targets of a batch, and their count.

    The sequences are right-padded into one [B, T] forward (padding comes after every real token, so causal
    attention never lets it change them), and only the rows that predict a learned token are projected to
    the vocabulary: with a 49k vocabulary that projection would otherwise dominate the step.
    """
    width = max(len(ex.ids) for ex in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    rows: list[int] = []
    targets: list[int] = []
    for b, ex in enumerate(batch):
        ids[b, : len(ex.ids)] = torch.tensor(ex.ids)
        for t in range(len(ex.ids) - 1):
            if ex.mask[t + 1]:
                rows.append(b * width + t)
                targets.append(ex.ids[t + 1])
    if not rows:
        return torch.zeros((), requires_grad=True), 0
    logits = model(ids, output_rows=torch.tensor(rows), lora=LoraBatch.single(lora))  # [R, V]
    return F.cross_entropy(logits.float(), torch.tensor(targets), reduction="sum"), len(rows)


def evaluate(model: Transformer, lora: LoraWeights, examples: list[Example]) -> float | None:
    """Mean loss per learned token."""
    if not examples:
        return None
    with torch.no_grad():
        total, count = batch_loss(model, lora, examples)
    return float(total) / max(count, 1)


def train(model: Transformer, train_set: list[Example], valid_set: list[Example], h: Hyper, *,
          checkpoint_dir: Path, on_step: Callable[[StepReport], None] = lambda r: None,
          should_stop: Callable[[], bool] = lambda: False) -> LoraWeights:
    """Train a LoRA adapter on the frozen `model`; resume from `checkpoint_dir` when it holds a checkpoint."""
    if not train_set:
        raise ValueError("no training sequences")
    for p in model.parameters():
        p.requires_grad_(False)
    lora = LoraWeights(model.args, LoraArgs(h.rank, h.alpha))
    opt = torch.optim.AdamW(lora.parameters(), lr=h.learning_rate, weight_decay=h.weight_decay)
    start = load_checkpoint(checkpoint_dir, lora, opt)
    if start == 0 and valid_set:  # where validation starts, so the job's metrics show it fall
        on_step(StepReport(0, float("nan"), evaluate(model, lora, valid_set), 0.0, 0))
    rng = random.Random(h.seed)
    for step in range(start, h.training_steps):
        if should_stop():
            raise Stopped
        rng.seed(h.seed * 1_000_003 + step)  # the batches of step N are the same after a resume
        lr = lr_at(step, h)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        batch = [train_set[rng.randrange(len(train_set))] for _ in range(h.batch_size)]
        total_tokens = sum(sum(ex.mask[1:]) for ex in batch)
        loss_sum = 0.0
        for i in range(0, len(batch), h.micro_batch):  # accumulate: each micro-batch adds its share
            loss, _n = batch_loss(model, lora, batch[i : i + h.micro_batch])
            (loss / max(total_tokens, 1)).backward()
            loss_sum += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(lora.parameters(), 1.0)
        opt.step()
        last = step + 1 == h.training_steps
        valid = evaluate(model, lora, valid_set) if (last or (step + 1) % h.eval_every == 0) else None
        if last or (step + 1) % h.checkpoint_every == 0:
            save_checkpoint(checkpoint_dir, lora, opt, step + 1)
        on_step(StepReport(step + 1, loss_sum / max(total_tokens, 1), valid, lr, total_tokens))
    return lora


def save_checkpoint(folder: Path, lora: LoraWeights, opt: torch.optim.Optimizer, step: int) -> None:
    """Adapter and optimiser state, written to a temporary name and renamed: a kill never leaves half a file."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "checkpoint.tmp"
    tmp.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in lora.tensors().items()}, str(tmp / "adapter.safetensors"))
    torch.save({"step": step, "optimizer": opt.state_dict()}, tmp / "optimizer.pt")
    final = folder / "checkpoint"
    if final.exists():
        old = folder / "checkpoint.old"
        final.rename(old)
        tmp.rename(final)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        tmp.rename(final)


def load_checkpoint(folder: Path, lora: LoraWeights, opt: torch.optim.Optimizer) -> int:
    """The step to continue from (0 without a checkpoint)."""
    for name in ("checkpoint", "checkpoint.old"):  # .old survives a kill between the two renames
        ck = folder / name
        if (ck / "optimizer.pt").exists() and (ck / "adapter.safetensors").exists():
            lora.load_tensors(load_file(str(ck / "adapter.safetensors")))
            state = torch.load(ck / "optimizer.pt", weights_only=True)
            opt.load_state_dict(state["optimizer"])
            return int(state["step"])
    return 0


def hyper_json(h: Hyper) -> dict[str, object]:
    return asdict(h)
