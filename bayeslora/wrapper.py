"""BayesianLoRA: the research-code façade.

It composes a peft model, an :class:`~bayeslora.params.AdapterParams` selection, a
:class:`~bayeslora.readout.Readout` and a :class:`~bayeslora.posteriors.Posterior`; it does not
subclass ``PeftModel`` and owns no optimizer or logger::

    bl = BayesianLoRA(peft_model, readout=AnswerTokenLogits.from_tokenizer(tok, ["A", "B", "C", "D"]),
                      method="kfac_laplace")
    bl.fit_map(train_loader)           # optional: bring your own trained adapter instead
    bl.fit(train_loader)               # fits the posterior around the adapter
    pred = bl.predict(batch)           # Predictive [S, B, C]
    bl.evaluate(test_loader)           # {"acc", "ece", "nll", "brier", "aurc"}
    bl.save(path); BayesianLoRA.load(base_model, path)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .fingerprint import base_fingerprint
from .function import AdapterFn
from .io import load_torch
from .metrics import Predictions, predict_loader
from .params import AdapterParams
from .posteriors import Posterior, TunablePrior, accepts, make_posterior
from .predictive import Predictive
from .readout import Readout, readout_from_config
from .train import TrainConfig, TrainResult, fit_noise_std, train_map

_META = "bayeslora.json"
_STATE = "posterior.pt"
_ADAPTER = "adapter"
FORMAT_VERSION = 1  # docs/saved_format.md; bump when the files or their keys change
logger = logging.getLogger(__name__)


class BayesianLoRA:
    """A LoRA model with a posterior over its adapter.

    Args:
        model: a peft model with LoRA layers.
        readout: maps model outputs to class logits ``[B, C]``.
        method: a registered method name (see ``bayeslora.posteriors.METHODS``) or a Posterior instance.
        params: the adapter selection: an :class:`AdapterParams`, or a dict of its keyword arguments
            (``adapter_name``, ``include``, ``exclude``, ``include_head``, ``lora_tensors``).
        prior_precision: λ of the Gaussian prior; used as the MAP L2 in :meth:`fit_map` and passed to
            methods that take a prior precision. None: keep each side's own default.
        autocast_dtype: ``"auto"`` (compute in the base model's dtype: autocast to bf16 / fp16 on CUDA when its
            weights are bf16 / fp16, none for fp32 weights, so ``dtype=float32`` computes in fp32), None (no
            autocast), or a dtype (autocast to it on CUDA, e.g. bf16 compute over fp32 weights).
        **method_kwargs: options of the method.
    """

    def __init__(
        self,
        model: nn.Module,
        readout: Readout,
        method: str | Posterior = "map",
        *,
        params: AdapterParams | Mapping[str, Any] | None = None,
        prior_precision: float | None = None,
        autocast_dtype: str | torch.dtype | None = "auto",
        **method_kwargs: Any,
    ):
        if not isinstance(readout, Readout):
            raise TypeError(
                f"readout: expected a Readout (SequenceClassificationLogits, SequenceRegression or AnswerTokenLogits), "
                "got "
                f"{type(readout).__name__}."
            )
        if not isinstance(params, AdapterParams):
            params = AdapterParams(model, **dict(params or {}))
        if autocast_dtype == "auto":
            autocast_dtype = compute_dtype(model)
        self.fn = AdapterFn(model, params, readout, autocast_dtype=autocast_dtype)
        self._map_checkpoints: list[str] = []  # the adapter checkpoints of the last fit_map (for fit)
        self.prior_precision = prior_precision
        if isinstance(method, str):
            if prior_precision is not None and accepts(method, "prior_precision"):
                method_kwargs.setdefault("prior_precision", prior_precision)
            if prior_precision is not None and accepts(method, "prior_fit"):
                method_kwargs.setdefault("prior_fit", "none")  # an explicit λ is the prior unless a fit is asked for
            self.posterior: Posterior = make_posterior(method, **method_kwargs)
        elif isinstance(method, Posterior):
            if method_kwargs:
                raise TypeError(
                    f"method_kwargs: {sorted(method_kwargs)} given with a Posterior instance; configure it."
                )
            self.posterior = method
        else:
            raise TypeError(f"method: expected a method name or a Posterior, got {type(method).__name__}.")

    # ------------------------------------------------------------------ properties
    @property
    def model(self) -> nn.Module:
        return self.fn.model

    @property
    def params(self) -> AdapterParams:
        return self.fn.params

    @property
    def method(self) -> str:
        return self.posterior.name

    # ------------------------------------------------------------------ fitting
    def cache_prefix(
        self, loader, *, dtype: str = "float16", store=None, batch_size: int | None = None, progress: bool = False
    ):
        """The same batches with the frozen prefix computed once (:func:`bayeslora.prefix.cache_loader`): with LoRA on
        the top blocks only (``LoraSpec(layers=k)``), every later call (training, fit, prediction) runs only the
        blocks above. ``store``: a directory that keeps the states for later runs (keyed, never stale)."""
        from .prefix import cache_loader

        return cache_loader(self.fn, loader, dtype=dtype, store=store, batch_size=batch_size, progress=progress)

    def fit_map(self, loader, config: TrainConfig | Mapping[str, Any] | None = None, callbacks=()) -> TrainResult:
        """Train the adapter to its MAP with :func:`~bayeslora.train.train_map` (``callbacks``: TrainCallbacks); a
        regression readout with ``noise="fit"`` then gets its maximum-likelihood σ
        (:func:`~bayeslora.train.fit_noise_std`)."""
        if config is None or isinstance(config, Mapping):
            config = TrainConfig(**dict(config or {}))
        if self.prior_precision is not None:
            config = dataclasses.replace(config, prior_precision=self.prior_precision)
        result = train_map(self.fn, loader, config, callbacks=callbacks)
        self._map_checkpoints = list(result.checkpoints)
        if getattr(self.fn.readout, "noise", None) == "fit":  # a regression readout: σ by ML at the MAP
            fit_noise_std(self.fn, loader)
        return result

    def fit(self, loader, val_loader=None, checkpoints=None) -> BayesianLoRA:
        """Fit the posterior (around the current adapter unless the method trains its own; see ``posterior.needs``).

        Args:
            loader: the training batches.
            val_loader: the validation split, for methods that need one (``needs.validation``).
            checkpoints: the MAP training's adapter checkpoints for methods that need them (``needs.checkpoints``);
                default: those of the last :meth:`fit_map` (with ``TrainConfig(checkpoint_every=...)``).
        """
        needs = self.posterior.needs
        if needs.validation and val_loader is None:
            raise ValueError(
                f"val_loader: method {self.method!r} fits on a validation split; pass fit(loader, val_loader=...)."
            )
        if val_loader is not None and not needs.validation:
            warnings.warn(
                f"val_loader: method {self.method!r} does not use a validation split in fit (it is ignored); "
                "for a Laplace prior tuned on it call bl.optimize_prior_precision('val_nll', val_loader=...).",
                UnusedArgumentWarning,
                stacklevel=2,
            )
            val_loader = None
        if needs.checkpoints and checkpoints is None:
            checkpoints = self._map_checkpoints or None
        self.posterior.fit(self.fn, loader, val_loader=val_loader, checkpoints=checkpoints)
        return self

    def optimize_prior_precision(
        self, method: str = "marglik", *, val_loader=None, grid: Sequence[float] | None = None
    ) -> torch.Tensor:
        """Fit the prior precision λ of the fitted posterior (laplace-torch's verb): ``"marglik"`` (the Laplace
        evidence) or ``"val_nll"`` (the predictive's NLL on ``val_loader`` over a log ``grid`` ``[low, high, n]``).

        ``BayesianLoRA(..., prior_precision=λ)`` keeps λ as the prior (``prior_fit="none"``) until this is called;
        the fitted λ is logged and saved with :meth:`save`. Returns λ per layer ``[L]``.
        """
        if not isinstance(self.posterior, TunablePrior):
            raise ValueError(
                f"method: {self.method!r} has no prior precision to fit; the Laplace methods (kfac_laplace, "
                "diag_laplace, last_layer_laplace) do."
            )
        prior = self.posterior.optimize_prior_precision(self.fn, method, val_loader=val_loader, grid=grid)
        logger.info("prior precision by %s: %s", method, [round(float(x), 6) for x in prior.reshape(-1)])
        return prior

    # ------------------------------------------------------------------ prediction
    def predict(self, batch: Mapping[str, torch.Tensor], n_samples: int | None = None, generator=None) -> Predictive:
        """Predictive logit samples ``[S, B, C]`` for one batch."""
        return self.posterior.predict(self.fn, batch, n_samples=n_samples, generator=generator)

    def predictions(self, loader, n_samples: int | None = None, seed: int = 0) -> Predictions:
        """Per-example predictions over a loader."""
        return predict_loader(self.posterior, self.fn, loader, n_samples=n_samples, seed=seed)

    def evaluate(self, loader, n_samples: int | None = None, seed: int = 0) -> dict[str, float]:
        """acc, ece, nll, brier, aurc over a whole loader."""
        return self.predictions(loader, n_samples=n_samples, seed=seed).metrics()

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        n_samples: int = 1,
        generator: torch.Generator | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Generate under the posterior (:mod:`bayeslora.generation`): ``n_samples`` adapter draws, one HF
        ``generate`` call of the whole batch per draw; returns token ids ``[n_samples, B, L]``. Prompts are padded on
        the left; ``generate_kwargs`` go to HF ``generate`` (``max_new_tokens``, ``do_sample``, ...); ``generator``
        seeds the draws and the decoding; the model's adapter values are restored afterwards."""
        from .generation import generate

        return generate(self.posterior, self.fn, input_ids, attention_mask, n_samples=n_samples, generator=generator,
                        **generate_kwargs)  # fmt: skip

    def answer_uncertainty(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        tokenizer: Any = None,
        *,
        decode=None,
        n_samples: int = 8,
        max_new_tokens: int = 16,
        generator: torch.Generator | None = None,
    ) -> list:
        """Answer-level uncertainty of free-form answers (:mod:`bayeslora.answers`): ``n_samples`` posterior draws
        each answer the left-padded prompts greedily; answers grouped by normalised text, scored by every draw.
        ``tokenizer`` gives the decoding, EOS and padding (or pass ``decode``: ids -> text). Returns one
        :class:`~bayeslora.answers.AnswerRecord` per prompt; ``bayeslora.answers.answer_metrics`` scores them."""
        from .answers import answer_samples

        if decode is None:
            if tokenizer is None:
                raise ValueError("tokenizer: expected the model's tokenizer (or decode=, token ids -> text).")

            def decode(ids):
                return tokenizer.decode(ids, skip_special_tokens=True)

        eos = getattr(tokenizer, "eos_token_id", None)
        pad = getattr(tokenizer, "pad_token_id", None)
        return answer_samples(self.posterior, self.fn, input_ids, attention_mask, decode, n_samples=n_samples,
                              max_new_tokens=max_new_tokens, eos_token_id=eos,
                              pad_token_id=int(pad if pad is not None else 0), generator=generator)  # fmt: skip

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Save the adapter (peft format), the posterior state and the metadata into directory ``path``.

        The directory is written next to ``path`` first and renamed into place, so an interrupted save
        never leaves a half-written result.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            self.model.save_pretrained(tmp / _ADAPTER, selected_adapters=[self.params.adapter_name])
            torch.save(self.posterior.state_dict(), tmp / _STATE)
            meta = {
                "format_version": FORMAT_VERSION,
                "base_model": base_fingerprint(self.model),
                "method": self.posterior.name,
                "config": self.posterior.config(),
                "readout": self.fn.readout.config(),
                "params": {
                    "adapter_name": self.params.adapter_name,
                    "include": self.params.include,
                    "exclude": self.params.exclude,
                    "include_head": self.params.include_head,
                    "lora_tensors": self.params.lora_tensors,
                },
                "prior_precision": self.prior_precision,
                "fitted_prior_precision": self.fitted_prior_precision(),
            }
            (tmp / _META).write_text(json.dumps(meta, indent=2) + "\n")
            _replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def from_pretrained(
        cls, base_model: nn.Module, adapter_dir: str | os.PathLike, readout: Readout, method: str | Posterior = "map",
        *, adapter_name: str = "default", **kwargs: Any,
    ) -> BayesianLoRA:  # fmt: skip
        """A BayesianLoRA around a peft LoRA adapter trained anywhere (``PeftModel.from_pretrained`` order).

        Args:
            base_model: the base model the adapter was trained on.
            adapter_dir: the directory ``save_pretrained`` wrote (``adapter_config.json`` + weights).
            readout: maps the model output to class logits (e.g. ``AnswerTokenLogits.from_tokenizer``).
            method: the posterior to fit around the adapter (``bl.fit(loader)`` next).
            adapter_name: the adapter's name in the peft model.
            **kwargs: the constructor's keyword arguments (``params``, ``prior_precision``, method options).
        """
        from peft import PeftModel

        if not (Path(adapter_dir) / "adapter_config.json").is_file():
            raise ValueError(
                f"adapter_dir: {str(adapter_dir)!r} holds no adapter_config.json; pass the directory that peft's "
                "save_pretrained wrote."
            )
        model = PeftModel.from_pretrained(base_model, str(adapter_dir), adapter_name=adapter_name, is_trainable=True)
        model.eval()
        params = kwargs.pop("params", None) or {}
        if isinstance(params, Mapping):
            params = {"adapter_name": adapter_name, **params}
        return cls(model, readout, method, params=params, **kwargs)

    @classmethod
    def from_trainer(cls, trainer, readout: Readout, method: str | Posterior = "kfac_laplace", **kwargs: Any):
        """Fit ``method`` around the adapter a Hugging Face ``Trainer`` trained, on the trainer's own training
        loader (its eval loader for methods that need a validation split); ``**kwargs`` as in the constructor."""
        bl = cls(trainer.model, readout, method, **kwargs)
        val = trainer.get_eval_dataloader() if bl.posterior.needs.validation else None
        bl.fit(trainer.get_train_dataloader(), val_loader=val)
        return bl

    @classmethod
    def load(cls, *args: Any, base_model: nn.Module | None = None, path: str | os.PathLike | None = None,
             autocast_dtype="auto") -> BayesianLoRA:  # fmt: skip
        """Load a saved BayesianLoRA onto a fresh base model (the same architecture and weights).

        The argument order is ``PeftModel.from_pretrained``'s (model, then path); the old ``load(path, base_model)``
        still works and warns (``DeprecationWarning``).

        Refuses (``ValueError`` naming the file, the field and the fix) a directory of another format version, a
        base model whose fingerprint differs from the one the posterior was fit on, a posterior state that fails
        its own checks, and stored adapter values that differ from the saved adapter's.
        """
        from peft import PeftModel

        if len(args) == 2:
            base_model, path = args
            if isinstance(base_model, (str, os.PathLike)) and isinstance(path, nn.Module):
                warnings.warn(
                    "BayesianLoRA.load(path, base_model) is deprecated; pass load(base_model, path), the order of "
                    "PeftModel.from_pretrained.",
                    DeprecationWarning,
                    stacklevel=2,
                )
                base_model, path = path, base_model
        elif len(args) == 1:  # load(base_model, path=...) or the old load(path, base_model=...)
            if isinstance(args[0], nn.Module):
                base_model = args[0]
            else:
                path = args[0]
        elif len(args) > 2:
            raise TypeError(f"load: expected load(base_model, path), got {len(args)} positional arguments.")
        if base_model is None or path is None:
            raise TypeError("load: expected load(base_model, path) (PeftModel.from_pretrained's order).")
        if not isinstance(base_model, nn.Module):
            raise TypeError(f"base_model: expected a torch model (the fresh base), got {type(base_model).__name__}.")
        path = Path(path)
        meta_file = path / _META
        if not meta_file.is_file():
            raise ValueError(
                f"path: {str(path)!r} is not a saved BayesianLoRA (no {_META}); pass the directory save() wrote."
            )
        meta = json.loads(meta_file.read_text())
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{meta_file}: field 'format_version' is {version!r}; this bayeslora reads version {FORMAT_VERSION} "
                "(docs/saved_format.md). Re-save the posterior with this version (fit it again, or load it with the "
                "version that wrote it and save)."
            )
        stored = meta.get("base_model") or {}
        try:
            found = base_fingerprint(base_model, list((stored.get("tensors") or {}).keys()))
        except ValueError as err:
            raise ValueError(f"{meta_file}: field 'base_model': {err}; pass the base model it was saved with.") from err
        if found != stored:
            what = "config" if found["config"] != stored.get("config") else "weights"
            raise ValueError(
                f"{meta_file}: field 'base_model': the {what} of the given base model differ from those the posterior "
                "was fit on (fingerprint mismatch); load it onto the same base model (same checkpoint, quantisation "
                "and dtype), or fit a new posterior for this one."
            )
        adapter_dir = path / _ADAPTER
        adapter_name = meta["params"]["adapter_name"]
        sub = adapter_dir / adapter_name if (adapter_dir / adapter_name).is_dir() else adapter_dir
        model = PeftModel.from_pretrained(base_model, sub, adapter_name=adapter_name)
        model.eval()
        posterior = make_posterior(meta["method"], **meta["config"])
        state_file = path / _STATE
        state = load_torch(state_file)
        try:
            posterior.load_state_dict(state)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"{state_file}: {err} Re-fit and save the posterior; the file is not a valid state."
            ) from err
        bl = cls(
            model,
            readout_from_config(meta["readout"]),
            posterior,
            params=meta["params"],
            prior_precision=meta["prior_precision"],
            autocast_dtype=autocast_dtype,
        )
        bl._check_stored_values(state_file, state.get("values"))
        return bl

    def fitted_prior_precision(self) -> list[float] | None:
        """The posterior's fitted λ per layer (None for methods without one)."""
        try:
            if not isinstance(self.posterior, TunablePrior):
                return None
            return [float(x) for x in self.posterior.prior.reshape(-1)]
        except (RuntimeError, ValueError, AttributeError):  # not fitted, or a laplace-torch state not rebuilt yet
            return None

    def _check_stored_values(self, state_file: Path, values: Any) -> None:
        """A posterior state that stores the adapter values it was fit at (``values``) must match the adapter."""
        if not isinstance(values, Mapping) or not values:
            return
        live = self.params.values()
        for name, value in values.items():
            if name in live and not torch.equal(value.to(live[name].device, live[name].dtype), live[name]):
                raise ValueError(
                    f"{state_file}: field 'values' ({name}) differs from the saved adapter's value; the posterior and "
                    f"{_ADAPTER}/ come from different fits. Save them together again with BayesianLoRA.save()."
                )


class UnusedArgumentWarning(UserWarning):
    """An argument that the chosen method does not use (it is ignored)."""


def compute_dtype(model: nn.Module) -> torch.dtype | None:
    """The half dtype (bf16 / fp16) most of the model's base weights have, else None (fp32: no autocast)."""
    counts: dict[torch.dtype, int] = {}
    for name, p in model.named_parameters():
        if p.is_floating_point() and "lora_" not in name:
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    if not counts:
        return None
    dtype = max(counts, key=counts.get)
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


def _replace_dir(src: Path, dst: Path) -> None:
    """Move directory ``src`` onto ``dst`` (replacing an existing one with minimal exposure)."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
