"""The single recovery fine-tune after pruning: one recipe (optimiser, epochs/steps, lr, schedule) for every
scorer (docs/algorithm.md section 9 fairness rules), resumable at epoch boundaries with the same result.

Determinism across a resume: the data order of epoch e comes from the caller's ``batches(e)`` (seeded by the
epoch), the torch RNG (dropout) is re-seeded from (seed, epoch) at the start of every epoch, and the
optimiser/scheduler states travel in the checkpoint.

Losses: ``loss="ce"`` (default) minimises the task loss ``loss_fn(model, batch)``. ``loss="kd"`` distils the
dense teacher: kd_alpha x T^2 x KL(teacher || student) at temperature T, averaged over the predicted positions
(non-padding tokens of dict batches with an ``attention_mask``; every row otherwise), plus (1 - kd_alpha) x
the task loss. The student's logits are the output of the forward that ``loss_fn`` runs (read by a hook on the
model, so one forward serves both terms); the teacher's logits come from the same ``loss_fn`` run on the
teacher without gradients, on the fly per batch: caching them would hold batches x tokens x vocabulary floats
(64 SmolLM2 batches of 8 x 128 tokens: 13 GB in fp32) where one batch's teacher forward costs about a third of
a student step. A caller with its own cache passes ``teacher`` as a callable batch -> logits instead.

LoRA (``lora_rank``, through the optional ``peft`` package: ``pip install 'spectra_gpu[lora]'``): the fine-tune
wraps the modules of :func:`lora_targets` with rank-r adapters (peft's ``LoraModel``, in place: the model object
stays the one passed in), trains only the adapter parameters, and after the last step merges them into the
weights and unwraps (``merge_and_unload``), so the model comes back as the same plain module type with the same
widths and no adapter tensors (a failed fine-tune unwraps without merging: the weights are the ones it started
from). The adapters' initial values are drawn from ``seed`` alone. While wrapped, :func:`plain_state_dict` is
the model's state under its plain names (what a checkpoint stores as the model) and the adapter tensors travel
in the fine-tune state (``"adapters"``), so a resume loads the plain model strictly, re-wraps it, and loads the
adapters strictly.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Sized
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import faults
from ._progress import progress
from .families import repeated_blocks

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant")
LOSSES = ("ce", "kd")
# recorded by ``FinetuneConfig.to_dict`` only when they differ from these defaults
_OPTIONAL_DEFAULTS: dict[str, Any] = {"loss": "ce", "temperature": 1.0, "kd_alpha": 1.0, "lora_rank": None,
                                      "lora_alpha": None, "lora_dropout": 0.0}
LORA_INSTALL = "pip install 'spectra_gpu[lora]'"


@dataclass(frozen=True)
class FinetuneConfig:
    """Recovery fine-tune recipe. epochs: passes over the training batches; steps: optional cap on the total
    number of optimiser steps (the schedule spans min(epochs x batches, steps)); epochs=0 skips the stage.
    loss: "ce" (the task loss) or "kd" (distillation from the dense teacher, module docstring) with
    ``temperature`` and ``kd_alpha`` (the KD term's weight; 1 - kd_alpha goes to the task loss). lora_rank: None
    (default: every parameter trained) or the rank r of LoRA adapters on :func:`lora_targets`, the only
    parameters trained, merged into the weights at the end (module docstring; needs peft); lora_alpha: their
    scale numerator (the update is alpha / r x B A; default 2 r); lora_dropout: dropout on the adapters' input."""

    optimizer: str = "adam"
    lr: float = 1e-3
    epochs: int = 1
    steps: int | None = None
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "cosine"
    grad_clip: float | None = 1.0
    loss: str = "ce"
    temperature: float = 1.0
    kd_alpha: float = 1.0
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("loss", self.loss, LOSSES)
        _check_number("lr", self.lr, "a number > 0", lambda v: v > 0)
        _check_int("epochs", self.epochs, 0, none_ok=False)
        _check_int("steps", self.steps, 1, none_ok=True)
        _check_number("weight_decay", self.weight_decay, "a number >= 0", lambda v: v >= 0)
        _check_number("momentum", self.momentum, "a number in [0, 1)", lambda v: 0 <= v < 1)
        if self.grad_clip is not None:
            _check_number("grad_clip", self.grad_clip, "None or a number > 0", lambda v: v > 0)
        _check_number("temperature", self.temperature, "a number > 0", lambda v: v > 0)
        _check_number("kd_alpha", self.kd_alpha, "a number in [0, 1]", lambda v: 0 <= v <= 1)
        _check_int("lora_rank", self.lora_rank, 1, none_ok=True)
        if self.lora_alpha is not None:
            _check_number("lora_alpha", self.lora_alpha, "None or a number > 0", lambda v: v > 0)
        _check_number("lora_dropout", self.lora_dropout, "a number in [0, 1)", lambda v: 0 <= v < 1)
        if self.lora_rank is None:
            for name, off in (("lora_alpha", None), ("lora_dropout", 0.0)):
                if getattr(self, name) != off:
                    raise ValueError(f"FinetuneConfig.{name}: expected {off} without lora_rank (LoRA is off), got "
                                     f"{getattr(self, name)!r}; set lora_rank to use LoRA")

    @property
    def lora_alpha_used(self) -> float | None:
        """The LoRA alpha in use: ``lora_alpha``, or 2 x ``lora_rank`` when not given (None without LoRA)."""
        if self.lora_rank is None:
            return None
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.lora_rank

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict; the distillation and LoRA fields only when they differ from their defaults, so
        a full cross-entropy recipe's record (and the configuration a resumed run is checked against) is the one
        it had before distillation and LoRA existed."""
        d = asdict(self)
        for k, v in _OPTIONAL_DEFAULTS.items():
            if d[k] == v:
                del d[k]
        return d


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"FinetuneConfig.{name}: expected one of {', '.join(choices)}, got {value!r}")


def _check_number(name: str, value: Any, expected: str, ok: Callable[[float], bool]) -> None:
    """A real number (not a bool; finite) for which ``ok`` holds, else a ValueError / TypeError naming
    ``expected`` and what came."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"FinetuneConfig.{name}: expected {expected}, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and ok(value)):
        raise ValueError(f"FinetuneConfig.{name}: expected {expected}, got {value!r}")


def _check_int(name: str, value: Any, low: int, *, none_ok: bool) -> None:
    expected = f"{'None or ' if none_ok else ''}an integer >= {low}"
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"FinetuneConfig.{name}: expected {expected}, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"FinetuneConfig.{name}: expected {expected}, got {value}")


def check_batches_fn(train_batches: Any, name: str = "train_batches") -> None:
    """Refuse, with a TypeError naming what was expected and what came, anything but a callable
    ``epoch -> that epoch's batches`` (a list, a DataLoader or a tensor given directly included: the fine-tune
    asks for each epoch's batches by the epoch, so a shuffled order is reproduced on resume). ``None`` (no
    fine-tune) is the caller's to allow."""
    if callable(train_batches) and not isinstance(train_batches, (torch.Tensor, nn.Module)):
        return
    got = type(train_batches).__name__
    hint = (f"; to reuse the same batches every epoch pass `lambda epoch: {name}`"
            if isinstance(train_batches, Iterable) and not isinstance(train_batches, (str, bytes)) else "")
    raise TypeError(f"{name}: expected a callable epoch -> that epoch's batches (e.g. `lambda epoch: batches`), "
                    f"got a {got}{hint}")


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


Teacher = nn.Module | Callable[[Any], torch.Tensor]


def _logits(out: Any) -> torch.Tensor:
    """The logits in a model's output: ``.logits`` (Hugging Face), the first element of a tuple, or the tensor."""
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"distillation: expected the model to return logits (a tensor, or an output with .logits), "
                        f"got {type(out).__name__}")
    return out


def loss_and_logits(model: nn.Module, batch: Any,
                    loss_fn: Callable[[nn.Module, Any], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_fn(model, batch), the logits of the forward it ran: the last output of ``model`` itself)."""
    seen: list[Any] = []
    h = model.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        loss = loss_fn(model, batch)
    finally:
        h.remove()
    if not seen:
        raise ValueError("distillation: loss_fn(model, batch) did not call the model's forward")
    return loss, _logits(seen[-1])


def _positions(batch: Any, logits: torch.Tensor) -> torch.Tensor | None:
    """[..] bool mask of the logits' positions that count (non-padding tokens), or None for all."""
    if isinstance(batch, dict) and batch.get("attention_mask") is not None and logits.dim() == 3:
        m = torch.as_tensor(batch["attention_mask"]).to(logits.device).bool()
        if tuple(m.shape) == tuple(logits.shape[:2]):
            return m
    return None


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 x KL(softmax(teacher / T) || softmax(student / T)) summed over the last (class) axis, averaged over
    the positions (those where ``mask`` is True)."""
    if student.shape != teacher.shape:
        raise ValueError(f"distillation: expected teacher logits of the student's shape {tuple(student.shape)}, "
                         f"got {tuple(teacher.shape)}")
    s, t = student.float() / temperature, teacher.detach().float().to(student.device) / temperature
    if mask is not None:
        s, t = s[mask], t[mask]
    s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    lt = F.log_softmax(t, -1)
    kl = (lt.exp() * (lt - F.log_softmax(s, -1))).sum(-1)
    return kl.mean() * temperature**2 if kl.numel() else s.sum() * 0.0


def teacher_logits(teacher: Teacher, batch: Any, loss_fn: Callable[[nn.Module, Any], torch.Tensor]) -> torch.Tensor:
    """The teacher's logits of ``batch``: a module runs ``loss_fn`` without gradients (eval mode, flag
    restored); any other callable is called with the batch (a cache)."""
    if isinstance(teacher, nn.Module):
        was = teacher.training
        teacher.eval()
        try:
            with torch.no_grad():
                return loss_and_logits(teacher, batch, loss_fn)[1].detach()
        finally:
            teacher.train(was)
    with torch.no_grad():
        return _logits(teacher(batch)).detach()


# ---- LoRA -------------------------------------------------------------------------------------------------
def lora_available() -> bool:
    """Whether peft is installed (found on the path; not imported, which takes seconds)."""
    return importlib.util.find_spec("peft") is not None


def _peft(cfg: FinetuneConfig) -> tuple[Any, Any]:
    """(peft's LoraConfig, LoraModel), or an ImportError saying how to install peft."""
    try:
        from peft import LoraConfig
        from peft.tuners.lora import LoraModel
    except ImportError as e:
        raise ImportError(f"FinetuneConfig.lora_rank={cfg.lora_rank}: LoRA recovery needs peft, which cannot be "
                          f"imported ({e}): {LORA_INSTALL}") from None
    return LoraConfig, LoraModel


def lora_targets(model: nn.Module) -> list[str]:
    """The names of the nn.Linear modules a LoRA fine-tune adapts: those inside repeated blocks
    (:func:`families.repeated_blocks`: a transformer's layers, an MLP's hidden layers), so not the
    embeddings, LM head or classifier head. A model without such blocks: every nn.Linear but the last one
    registered (its head, by the usual order), or that one when it is the only one. The output embeddings of a
    Hugging Face model (the LM head, often tied to the input embeddings) are never adapted. Empty when the model
    has no other nn.Linear."""
    get_out = getattr(model, "get_output_embeddings", None)
    try:
        head = get_out() if callable(get_out) else None
    except (NotImplementedError, AttributeError):
        head = None
    linear = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    blocks = [n for n, _ in repeated_blocks(model)]
    inside = [n for n, _ in linear if any(n.startswith(f"{b}.") for b in blocks)]
    if inside:
        return inside
    return [n for n, _ in linear[:-1]] or [n for n, _ in linear]


def check_lora(model: nn.Module, cfg: FinetuneConfig) -> None:
    """Refuse a LoRA fine-tune (``cfg.lora_rank`` set) that cannot run: ValueError for a model with no nn.Linear
    to adapt (:func:`lora_targets`), ImportError without peft. Nothing without LoRA."""
    if cfg.lora_rank is None:
        return
    if not lora_targets(model):
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"FinetuneConfig.lora_rank: LoRA expected a model with nn.Linear layers besides its output "
                         f"embeddings, got a {type(model).__name__} with "
                         f"{'only ' + ', '.join(linear) if linear else 'none'}; fine-tune without lora_rank")
    _peft(cfg)


def lora_summary(model: nn.Module, cfg: FinetuneConfig) -> dict[str, Any] | None:
    """What a LoRA fine-tune of ``model`` adapts and trains: {rank, alpha, dropout, modules (adapted), trainable_params
    (r x (in + out) per module: the adapters' A and B), params (the model's, without adapters)}; None without
    LoRA."""
    if cfg.lora_rank is None:
        return None
    r = cfg.lora_rank
    mods = dict(model.named_modules())
    names = lora_targets(model)
    return {"rank": r, "alpha": cfg.lora_alpha_used, "dropout": cfg.lora_dropout, "modules": len(names),
            "trainable_params": sum(r * (mods[n].in_features + mods[n].out_features) for n in names),
            "params": sum(p.numel() for p in model.parameters())}


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of the peft adapter layers wrapping modules of ``model`` (none when peft was never
    imported: then nothing can be wrapped)."""
    if sys.modules.get("peft") is None:
        return {}
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuner: Any = BaseTunerLayer  # Any: a peft layer is an nn.Module, which peft's annotations do not say
    return {n: m for n, m in model.named_modules() if isinstance(m, tuner)}


def _split_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the state_dict under the plain model's names: a wrapped layer's ``<name>.base_layer.<t>`` as
    ``<name>.<t>``, the adapter tensors of the wrapped layers under their own names), both views of the
    model's tensors."""
    state = model.state_dict()
    rename: dict[str, str] = {}
    adapters: set[str] = set()
    for name, layer in _lora_layers(model).items():
        base = f"{name}.base_layer."
        for key in layer.state_dict(prefix=f"{name}."):
            if key.startswith(base):
                rename[key] = f"{name}.{key[len(base):]}"
            else:
                adapters.add(key)
    plain = {rename.get(k, k): v for k, v in state.items() if k not in adapters}
    return plain, {k: v for k, v in state.items() if k in adapters}


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as the unwrapped model would have it: during a LoRA fine-tune the base layers'
    tensors under their plain names and no adapter tensor (``adapter_state`` has those); otherwise the state_dict
    itself. What a checkpoint stores as the model, so it always loads strictly into the plain model."""
    return _split_state(model)[0] if _lora_layers(model) else model.state_dict()


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of a model wrapped for a LoRA fine-tune ({} otherwise), as views."""
    return _split_state(model)[1] if _lora_layers(model) else {}


class _Lora:
    """A model wrapped in place for a LoRA fine-tune (see the module docstring)."""

    def __init__(self, model: nn.Module, cfg: FinetuneConfig, seed: int) -> None:
        check_lora(model, cfg)
        LoraConfig, LoraModel = _peft(cfg)
        self.model = model
        self.requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        names = lora_targets(model)
        pattern = "|".join(re.escape(n) for n in names)
        conf = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha_used, lora_dropout=cfg.lora_dropout,
                          target_modules=f"^(?:{pattern})$", bias="none")
        # the adapters' initial values depend on the seed only, not on what ran before in this process
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.tuner = LoraModel(model, conf, "default")

    def load(self, saved: dict[str, torch.Tensor]) -> None:
        """Copy the adapter tensors of a checkpoint (``adapter_state`` of the same run) into the adapters."""
        own = adapter_state(self.model)
        bad = sorted(set(own) ^ set(saved)) or [k for k in own if tuple(own[k].shape) != tuple(saved[k].shape)]
        if bad:
            raise ValueError(f"resume: the checkpoint's LoRA adapters do not fit the model's ({len(own)} expected, "
                             f"{len(saved)} stored; first mismatch {bad[0]!r})")
        with torch.no_grad():
            for k, t in own.items():
                t.copy_(saved[k])

    def unwrap(self, merge: bool) -> None:
        """Replace every adapter layer by its base layer, merging the adapters into its weight if ``merge``;
        the parameters' requires_grad flags as they were before wrapping."""
        if merge:
            self.tuner.merge_and_unload()
        else:
            self.tuner.unload()
        for n, p in self.model.named_parameters():
            p.requires_grad_(self.requires_grad.get(n, p.requires_grad))


def finetune(model: torch.nn.Module, batches: Callable[[int], Iterable[Any]],
             loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor], cfg: FinetuneConfig, *, seed: int = 0,
             state: dict[str, Any] | None = None,
             on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
             desc: str = "fine-tune", teacher: Teacher | None = None) -> list[dict[str, Any]]:
    """Train ``model`` in place; return one record per epoch {epoch, steps, loss, seconds} (``loss="kd"``:
    also kd and task, the means of the two terms).

    batches(epoch) -> the epoch's batches (a sized iterable, same for the same epoch); loss_fn(model, batch)
    -> scalar loss. state: a dict previously handed to ``on_epoch_end`` (resume from it); on_epoch_end gets,
    after every epoch, {epoch (completed), step, optimizer, scheduler, history} to checkpoint (with
    ``lora_rank`` also adapters: ``adapter_state``, the model being wrapped then: store it with
    ``plain_state_dict``). teacher (needed by ``loss="kd"``, ignored otherwise): the dense model (a module, e.g. a
    copy kept before pruning; not trained, not stored in the state: pass the same one on resume) or a callable
    batch -> teacher logits. With ``cfg.lora_rank`` the model comes back plain, the adapters merged (module
    docstring); ImportError without peft.
    """
    if not isinstance(cfg, FinetuneConfig):
        raise TypeError(f"cfg: expected a FinetuneConfig, got {type(cfg).__name__}")
    check_batches_fn(batches, "batches")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable (model, batch) -> scalar loss, got {type(loss_fn).__name__}")
    kd = cfg.loss == "kd"
    if kd and (teacher is None or not callable(teacher)):
        raise ValueError("finetune: loss='kd' needs teacher= (the dense model, or a callable batch -> logits), "
                         f"got {type(teacher).__name__}")
    if kd and teacher is model:
        raise ValueError("finetune: the teacher must be a separate copy of the dense model, not the model trained")
    history: list[dict[str, Any]] = list(state["history"]) if state else []
    if cfg.epochs == 0:
        return history
    first = batches(0)
    if not isinstance(first, Sized) or len(first) == 0:
        raise ValueError("finetune: expected batches(epoch) to return a non-empty sized iterable of batches")
    lora = _Lora(model, cfg, seed) if cfg.lora_rank is not None else None  # checks peft and the model first
    try:
        if lora is not None and state:
            if "adapters" not in state:
                raise ValueError("resume: the fine-tune state holds no LoRA adapters, but the run uses lora_rank="
                                 f"{cfg.lora_rank}; start a new run directory")
            lora.load(state["adapters"])
        _train(model, first, len(first), batches, loss_fn, cfg, seed, state, on_epoch_end, desc, teacher, history)
    except BaseException:
        if lora is not None:
            lora.unwrap(merge=False)  # the weights the fine-tune started from, plain again
        raise
    if lora is not None:
        lora.unwrap(merge=True)
    model.eval()
    return history


def _train(model: torch.nn.Module, first: Iterable[Any], per_epoch: int, batches: Callable[[int], Iterable[Any]],
           loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor], cfg: FinetuneConfig, seed: int,
           state: dict[str, Any] | None, on_epoch_end: Callable[[dict[str, Any]], None] | None, desc: str,
           teacher: Teacher | None, history: list[dict[str, Any]]) -> None:
    """The epochs of :func:`finetune` (arguments checked there; ``first`` = batches(0), of ``per_epoch``
    batches), appending to ``history``."""
    kd = cfg.loss == "kd"
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
    alpha = float(cfg.kd_alpha)
    for epoch in range(start, epochs):
        torch.manual_seed(seed * 1_000_003 + epoch)
        t0 = time.perf_counter()
        model.train()
        tot, cnt, tot_kd, tot_task = 0.0, 0, 0.0, 0.0
        data = first if epoch == 0 else batches(epoch)
        this_epoch = min(len(data), total - step)  # type: ignore[arg-type]  # the steps this epoch runs (--steps)
        for batch in progress(data, desc=f"{desc} epoch {epoch + 1}/{epochs}", total=this_epoch):
            if step >= total:
                break
            opt.zero_grad(set_to_none=True)
            if kd:
                assert teacher is not None
                t_logits = teacher_logits(teacher, batch, loss_fn)
                task, s_logits = loss_and_logits(model, batch, loss_fn)
                dist = kd_loss(s_logits, t_logits, cfg.temperature, _positions(batch, s_logits))
                loss = alpha * dist + (1.0 - alpha) * task if alpha < 1.0 else dist
                tot_kd += float(dist.detach())
                tot_task += float(task.detach())
            else:
                loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"finetune: non-finite loss {float(loss)} at step {step}; lower the lr")
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            faults.point("finetune")
            tot += float(loss.detach())
            cnt += 1
        model.eval()
        rec: dict[str, Any] = {"epoch": epoch + 1, "steps": step, "loss": tot / max(cnt, 1),
                               "seconds": time.perf_counter() - t0}
        if kd:
            rec.update(kd=tot_kd / max(cnt, 1), task=tot_task / max(cnt, 1))
        history.append(rec)
        if on_epoch_end is not None:
            ft: dict[str, Any] = {"epoch": epoch + 1, "step": step, "optimizer": opt.state_dict(),
                                  "scheduler": sched.state_dict(), "history": list(history)}
            if cfg.lora_rank is not None:
                ft["adapters"] = adapter_state(model)
            on_epoch_end(ft)


__all__ = ["LORA_INSTALL", "LOSSES", "OPTIMIZERS", "SCHEDULES", "FinetuneConfig", "Teacher", "adapter_state",
           "check_batches_fn", "check_lora", "finetune", "kd_loss", "lora_available", "lora_summary", "lora_targets",
           "loss_and_logits", "make_optimizer", "plain_state_dict", "teacher_logits"]
