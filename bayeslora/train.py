"""train_map: the one small training loop for MAP LoRA adapters (and ensemble members).

Objective (per step, mean over the batch):

    L(θ) = CE(f_θ(x), y) + λ / (2N) · ||θ||²,

i.e. the negative log-posterior divided by N under the Gaussian prior N(0, λ⁻¹ I) over the
selected adapter tensors θ. ``prior_precision`` λ is therefore the *one* number that is both the
MAP weight decay (coupled L2, not AdamW's decoupled decay) and the prior precision of the
posteriors built around the MAP.

Features: AdamW (or any optimizer from an ``optimizer`` factory), linear warm-up then linear decay (or a constant
or cyclic learning rate: ``schedule``), gradient accumulation, gradient clipping,
bf16 autocast on CUDA (via the AdapterFn), max steps or epochs, seeded (dropout RNG and data
order; the caller's global RNG is left untouched), a tqdm bar with the loss, periodic adapter
checkpoints (for checkpoint ensembles), and a clear error on a non-finite or diverging loss.

Divergence rule (``divergence_factor`` k, default 10): training stops with :class:`TrainingDiverged` at the first
optimizer step whose loss exceeds the first step's by more than ``k · max(|first|, 1)`` nats (for a C-class
cross-entropy that starts near log C, a loss above ~10.7 at C=2: examples confidently wrong; the rule holds for a
Gaussian NLL, which can be negative, too). A finite but exploding loss (``lr=1e6``: 2.3e6) is thus never written
up as a finished MAP. Under ``torch.distributed`` (``torchrun``) the gradients and the loss of every optimizer
step are averaged over the ranks, so a loader sharded with :func:`bayeslora.distributed.shard` trains like one process
with a ``world_size``-times larger batch.

Optimizer seam: ``train_map(..., optimizer=factory)`` trains with ``factory(params)`` instead of AdamW (SGD for a
SWAG collection, IVON). An optimizer with a ``sampled_params(train=True)`` context (a variational optimizer: IVON's
API) computes each optimizer step's gradients inside it: the weights are sampled when the step's first micro-batch
starts, and the mean is restored (the optimizer reading the gradient) after the last micro-batch's backward, the
gradient sync and the clipping.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.data import DataLoader

from . import distributed
from .adapter_state import save_checkpoint, trainable_parameters
from .data.collate import dataset_size
from .function import AdapterFn, model_mode
from .progress import bar as progress_bar
from .rng import seeded
from .validate import positive

SCHEDULES = ("linear", "constant", "cyclic")
OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train_map`.

    Attributes:
        lr: peak AdamW learning rate.
        epochs: passes over the loader (may be fractional); ignored when ``max_steps`` is set.
        max_steps: optimizer steps; overrides ``epochs``.
        grad_accum: micro-batches per optimizer step.
        warmup_ratio: fraction of the steps with linear warm-up (then linear decay to 0).
        clip: max gradient norm (None: no clipping).
        prior_precision: λ of the Gaussian prior; coupled L2 λ/(2N)·||θ||² in the loss.
        seed: seeds dropout and the data order of a shuffling loader.
        checkpoint_every: save the adapter every this many optimizer steps (None: never).
        checkpoint_dir: where checkpoints go (required with checkpoint_every).
        progress: show a tqdm progress bar.
        divergence_factor: the divergence rule of the module docstring (None: no check).
        betas, eps: AdamW.
        schedule: the learning rate after the warm-up: ``"linear"`` (decay to 0 at the last step), ``"constant"``,
            or ``"cyclic"`` (in each cycle of ``cycle_steps`` steps from ``lr`` down linearly to ``lr / cycle_steps``).
        cycle_steps: the cycle length of ``schedule="cyclic"``.
    """

    lr: float = 5e-4
    epochs: float = 1.0
    max_steps: int | None = None
    grad_accum: int = 1
    warmup_ratio: float = 0.06
    clip: float | None = 1.0
    prior_precision: float = 0.0
    seed: int = 0
    checkpoint_every: int | None = None
    checkpoint_dir: str | None = None
    progress: bool = True
    divergence_factor: float | None = 10.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "linear"
    cycle_steps: int | None = None

    def __post_init__(self):
        positive("lr", self.lr)
        if self.max_steps is None:
            positive("epochs", self.epochs)
        else:
            positive("max_steps", self.max_steps)
        positive("grad_accum", self.grad_accum)
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio: expected a value in [0, 1), got {self.warmup_ratio!r}.")
        if self.prior_precision < 0:
            raise ValueError(f"prior_precision: expected >= 0, got {self.prior_precision!r}.")
        if self.divergence_factor is not None:
            positive("divergence_factor", self.divergence_factor)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {list(SCHEDULES)}, got {self.schedule!r}.")
        if self.schedule == "cyclic":
            if self.cycle_steps is None:
                raise ValueError("cycle_steps: required with schedule='cyclic'; pass the cycle length in steps.")
            positive("cycle_steps", self.cycle_steps, int)
        if self.checkpoint_every is not None:
            positive("checkpoint_every", self.checkpoint_every)
            if not self.checkpoint_dir:
                raise ValueError("checkpoint_dir: required when checkpoint_every is set; pass a directory path.")


@dataclass
class TrainStep:
    """What a :class:`TrainCallback` sees after an optimizer step (or at the end of an epoch).

    Attributes:
        step: optimizer steps taken so far (1 after the first).
        epoch: passes over the loader completed before this step (0 during the first).
        loss: the data loss of this step (mean over its micro-batches); at an epoch's end the last step's.
        lr: the learning rate this step used.
        fn: the AdapterFn being trained (its live adapter holds the values after the step).
        optimizer: the optimizer (read its state; do not step it).
    """

    step: int
    epoch: int
    loss: float
    lr: float
    fn: AdapterFn
    optimizer: torch.optim.Optimizer


class TrainCallback:
    """Hooks into :func:`train_map`: the one way for a method to see the training trajectory (snapshots for
    SWAG or checkpoint ensembles, optimizer statistics). Override either method; both default to doing nothing."""

    def on_step(self, state: TrainStep) -> None:
        """After every optimizer step."""

    def on_epoch_end(self, state: TrainStep) -> None:
        """After every full pass over the loader."""


class Checkpointer(TrainCallback):
    """Save the selected adapter values every ``every`` optimizer steps into ``directory`` (``step_XXXXXXX.pt``)."""

    def __init__(self, every: int, directory: str | os.PathLike):
        self.every, self.directory = int(every), directory
        self.paths: list[str] = []

    def on_step(self, state: TrainStep) -> None:
        if state.step % self.every == 0:
            self.paths.append(str(save_checkpoint(state.fn, self.directory, state.step)))


class TrainingDiverged(ValueError):
    """The training loss exploded (the divergence rule of :mod:`bayeslora.train`)."""


@dataclass
class TrainResult:
    """What :func:`train_map` did.

    Attributes:
        steps: optimizer steps taken.
        losses: training loss (data term) per optimizer step.
        checkpoints: paths of the saved adapter checkpoints, oldest first.
        seconds: wall time.
        num_train: N used in the prior term.
    """

    steps: int
    losses: list[float]
    checkpoints: list[str] = field(default_factory=list)
    seconds: float = 0.0
    num_train: int = 0
    config: dict = field(default_factory=dict)


def total_steps(config: TrainConfig, loader: DataLoader) -> int:
    if config.max_steps is not None:
        return int(config.max_steps)
    per_epoch = math.ceil(len(loader) / config.grad_accum)
    return max(1, math.ceil(config.epochs * per_epoch))


def lr_factor(config: TrainConfig, steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier of optimizer step ``s`` (0-based) under ``config``'s warm-up and schedule."""
    warm = int(config.warmup_ratio * steps)

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        if config.schedule == "constant":
            return 1.0
        if config.schedule == "cyclic":
            return 1.0 - ((s - warm) % config.cycle_steps) / config.cycle_steps
        return min(1.0, max(0.0, (steps - s) / max(steps - warm, 1)))

    return factor


def train_map(
    fn: AdapterFn,
    loader: DataLoader,
    config: TrainConfig | None = None,
    callbacks: Sequence[TrainCallback] = (),
    optimizer: OptimizerFactory | None = None,
) -> TrainResult:
    """Train the adapter in place to the MAP of CE + Gaussian prior.

    Args:
        fn: the AdapterFn of the peft model (its live adapter tensors are trained).
        loader: training batches with ``labels``.
        config: hyper-parameters (defaults: :class:`TrainConfig`).
        callbacks: :class:`TrainCallback` hooks, called after every optimizer step and epoch (``checkpoint_every``
            adds a :class:`Checkpointer` after them).
        optimizer: a factory ``params -> torch.optim.Optimizer`` (the module docstring's optimizer seam; its
            learning rate is scaled by the schedule); None: AdamW with ``config``'s ``lr``, ``betas``, ``eps``.

    Returns:
        A :class:`TrainResult`. The model's adapter now holds the trained values.

    Raises:
        ValueError: on a non-finite loss (naming the step), an empty dataset or bad settings.
    """
    config = config or TrainConfig()
    n = dataset_size(loader)
    params = trainable_parameters(fn)
    for p in params.values():
        p.requires_grad_(True)
    prior_names = set(fn.params.names)
    if optimizer is None:
        opt = torch.optim.AdamW(
            list(params.values()), lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=0.0
        )
    else:
        opt = optimizer(list(params.values()))
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer: the factory returned {type(opt).__name__}; expected a torch.optim.Optimizer.")
    sampled = getattr(opt, "sampled_params", None)  # a variational optimizer: gradients at sampled weights
    steps = total_steps(config, loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(config, steps))
    result = TrainResult(steps=0, losses=[], num_train=n, config=asdict(config))
    checkpointer = Checkpointer(config.checkpoint_every, config.checkpoint_dir) if config.checkpoint_every else None
    hooks = [*callbacks, *([checkpointer] if checkpointer else [])]
    epoch = 0
    start = time.perf_counter()
    bar = progress_bar(desc="train_map", total=steps, enabled=config.progress)
    with seeded(loader, config.seed, fn.device), model_mode(fn.model, True), contextlib.ExitStack() as sampling:
        micro, running = 0, 0.0

        def end_epoch() -> None:
            nonlocal epoch
            epoch += 1
            if result.losses:
                done = TrainStep(result.steps, epoch, result.losses[-1], opt.param_groups[0]["lr"], fn, opt)
                for hook in hooks:
                    hook.on_epoch_end(done)

        while result.steps < steps:
            for i, batch in enumerate(loader):
                if sampled is not None and micro % config.grad_accum == 0:
                    sampling.enter_context(sampled(train=True))  # this step's weight sample
                logits = fn(None, batch)
                data_loss = fn.likelihood.nll(logits, fn.labels(batch))
                if not torch.isfinite(data_loss):
                    raise ValueError(
                        f"loss: non-finite training loss {data_loss.item()} at optimizer step {result.steps} "
                        f"(micro-batch {micro}); lower lr (now {config.lr}), enable clip, or check the data/labels."
                    )
                loss = data_loss
                if config.prior_precision > 0:
                    sq = sum((p.float() ** 2).sum() for name, p in params.items() if name in prior_names)
                    loss = loss + config.prior_precision / (2 * n) * sq
                (loss / config.grad_accum).backward()
                running += data_loss.item() / config.grad_accum
                micro += 1
                if micro % config.grad_accum:
                    continue
                running = distributed.sync_step_(list(params.values()), running)  # no-op on one process
                if config.clip is not None:
                    torch.nn.utils.clip_grad_norm_(list(params.values()), config.clip)
                sampling.close()  # a variational optimizer reads the gradient and restores its mean
                lr = opt.param_groups[0]["lr"]
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                result.steps += 1
                result.losses.append(running)
                _check_divergence(result.losses, config)
                bar.update(1)
                bar.set_postfix(loss=f"{running:.4f}")
                state = TrainStep(result.steps, epoch, running, lr, fn, opt)
                for hook in hooks:
                    hook.on_step(state)
                running = 0.0
                if result.steps >= steps:
                    if i + 1 == len(loader):  # the last step ended a full pass
                        end_epoch()
                    break
            else:
                end_epoch()
    bar.close()
    opt.zero_grad(set_to_none=True)
    result.checkpoints = list(checkpointer.paths) if checkpointer else []
    result.seconds = time.perf_counter() - start
    return result


def _check_divergence(losses: list[float], config: TrainConfig) -> None:
    k = config.divergence_factor
    if k is None or len(losses) < 2:
        return
    first, now = losses[0], losses[-1]
    if now - first > k * max(abs(first), 1.0):
        raise TrainingDiverged(
            f"loss: training diverged at optimizer step {len(losses)}: loss {now:.4g} exceeds the first step's "
            f"{first:.4g} by more than {k:g} x max(|first|, 1); lower lr (now {config.lr:g}), keep clip set (now "
            f"{config.clip}), or raise warmup_ratio. Nothing was saved as the MAP."
        )


@torch.no_grad()
def fit_noise_std(fn: AdapterFn, loader: DataLoader) -> float:
    """The maximum-likelihood observation std of a Gaussian readout at the current adapter (the MAP):
    ``σ̂ = √(mean_n ||y_n − f(x_n)||² / O)`` over ``loader`` (eval mode); sets it on the readout and returns it.

    Raises:
        ValueError: the readout is not a regression readout with ``noise="fit"``, or the loader is empty.
    """
    readout = fn.readout
    if getattr(readout, "noise", None) != "fit":
        raise ValueError(
            f"readout: fitting the observation noise needs a regression readout with noise='fit' "
            f"(SequenceRegression); got {type(readout).__name__} {readout.config()}."
        )
    total, count = 0.0, 0
    with model_mode(fn.model, False):
        for batch in loader:
            f = fn(None, batch).double()
            y = fn.labels(batch).double().reshape(f.shape)
            total += float((y - f).square().sum())
            count += y.numel()
    if count == 0:
        raise ValueError("loader: yielded no examples; the noise fit needs the training split.")
    sigma = max(math.sqrt(total / count), 1e-6)
    readout.set_noise_std(sigma)
    return sigma
