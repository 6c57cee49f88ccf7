"""The single recovery fine-tune after pruning: one recipe (optimiser, epochs/steps, lr, schedule) for every
scorer (docs/algorithm.md section 9 fairness rules), resumable at epoch boundaries with the same result.

Determinism across a resume: the data order of epoch e comes from the caller's ``batches(e)`` (seeded by the
epoch), the torch RNG (dropout) is re-seeded from (seed, epoch) at the start of every epoch, and the
optimiser/scheduler states travel in the checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sized
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ._progress import progress

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class FinetuneConfig:
    """Recovery fine-tune recipe. epochs: passes over the training batches; steps: optional cap on the total
    number of optimiser steps (the schedule spans min(epochs x batches, steps)); epochs=0 skips the stage."""

    optimizer: str = "adam"
    lr: float = 1e-3
    epochs: int = 1
    steps: int | None = None
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "cosine"
    grad_clip: float | None = 1.0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: expected one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ValueError(f"lr: expected a positive number, got {self.lr!r}")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"epochs: expected an int >= 0, got {self.epochs!r}")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise ValueError(f"steps: expected None or an int >= 1, got {self.steps!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay: expected >= 0, got {self.weight_decay!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip: expected None or > 0, got {self.grad_clip!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_optimizer(model: torch.nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("finetune: the model has no trainable parameters (requires_grad is False everywhere)")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _lr_factor(cfg: FinetuneConfig, total: int) -> Callable[[int], float]:
    if cfg.schedule == "constant":
        return lambda step: 1.0
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def finetune(model: torch.nn.Module, batches: Callable[[int], Iterable[Any]],
             loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor], cfg: FinetuneConfig, *, seed: int = 0,
             state: dict[str, Any] | None = None,
             on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
             desc: str = "fine-tune") -> list[dict[str, Any]]:
    """Train ``model`` in place; return one record per epoch {epoch, steps, loss, seconds}.

    batches(epoch) -> the epoch's batches (a sized iterable, same for the same epoch); loss_fn(model, batch)
    -> scalar loss. state: a dict previously handed to ``on_epoch_end`` (resume from it); on_epoch_end gets,
    after every epoch, {epoch (completed), step, optimizer, scheduler, history} to checkpoint.
    """
    if not isinstance(cfg, FinetuneConfig):
        raise TypeError(f"cfg: expected a FinetuneConfig, got {type(cfg).__name__}")
    history: list[dict[str, Any]] = list(state["history"]) if state else []
    if cfg.epochs == 0:
        return history
    first = batches(0)
    if not isinstance(first, Sized) or len(first) == 0:
        raise ValueError("finetune: expected batches(epoch) to return a non-empty sized iterable of batches")
    per_epoch = len(first)
    total = per_epoch * cfg.epochs if cfg.steps is None else min(per_epoch * cfg.epochs, cfg.steps)
    epochs = math.ceil(total / per_epoch)
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(cfg, total))
    start, step = 0, 0
    if state:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, step = int(state["epoch"]), int(state["step"])
    params = [p for g in opt.param_groups for p in g["params"]]
    for epoch in range(start, epochs):
        torch.manual_seed(seed * 1_000_003 + epoch)
        t0 = time.perf_counter()
        model.train()
        tot, cnt = 0.0, 0
        data = first if epoch == 0 else batches(epoch)
        for batch in progress(data, desc=f"{desc} epoch {epoch + 1}/{epochs}", total=len(data)):  # type: ignore[arg-type]
            if step >= total:
                break
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"finetune: non-finite loss {float(loss)} at step {step}; lower the lr")
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            tot += float(loss.detach())
            cnt += 1
        model.eval()
        history.append({"epoch": epoch + 1, "steps": step, "loss": tot / max(cnt, 1),
                        "seconds": time.perf_counter() - t0})
        if on_epoch_end is not None:
            on_epoch_end({"epoch": epoch + 1, "step": step, "optimizer": opt.state_dict(),
                          "scheduler": sched.state_dict(), "history": list(history)})
    model.eval()
    return history


__all__ = ["OPTIMIZERS", "SCHEDULES", "FinetuneConfig", "finetune", "make_optimizer"]
