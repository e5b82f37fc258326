"""Readouts: turn a Hugging Face model output into the outputs ``f [B, O]`` of a task (class logits ``[B, C]``
or, for regression, the predicted mean ``[B, 1]``; for free text, the next-token logits ``[B, T, V]``).

A Readout has two jobs:

* ``model_inputs(batch)`` – the keyword arguments the model is called with (it may add e.g.
  ``position_ids`` or ``logits_to_keep``; it never passes ``labels``, so HF computes no loss);
* ``__call__(output, batch)`` – the outputs ``[B, O]`` in float32 (class logits for a categorical likelihood;
  ``[B, T, V]`` for a token-level one).

Its ``likelihood`` (:mod:`bayeslora.likelihoods`) says how the outputs explain the labels: categorical for
:class:`SequenceClassificationLogits` and :class:`AnswerTokenLogits`, Gaussian for :class:`SequenceRegression`,
token-level categorical for :class:`TokenLogits`.

Readouts are plain, serialisable objects: ``config()`` returns a JSON-able dict and
:func:`readout_from_config` rebuilds the readout, so a saved posterior can be reloaded without
the tokenizer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from .likelihoods import Categorical, Gaussian, Likelihood, TokenCategorical

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@runtime_checkable
class Readout(Protocol):
    """Maps a model output (and its batch) to class logits ``[B, C]``; ``likelihood`` says how they explain the
    labels (:mod:`bayeslora.likelihoods`: training loss, curvature, the VI observation take it from here)."""

    num_classes: int
    likelihood: Likelihood

    def model_inputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]: ...

    def __call__(self, output: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor: ...

    def config(self) -> dict[str, Any]: ...


def _base_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    if "input_ids" not in batch:
        raise ValueError(
            f"batch: expected a mapping with 'input_ids' (and 'attention_mask'), got keys {sorted(batch)}; "
            "build batches with bayeslora.data.make_loader or a tokenizer call."
        )
    return {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}


class SequenceClassificationLogits:
    """Class logits from a sequence-classification head (``output.logits`` is ``[B, C]``).

    Args:
        num_classes: C, the number of labels of the head.
    """

    def __init__(self, num_classes: int):
        if int(num_classes) < 2:
            raise ValueError(
                f"num_classes: expected an integer >= 2, got {num_classes!r}; for a one-output regression head use "
                "SequenceRegression (a Gaussian likelihood)."
            )
        self.num_classes = int(num_classes)
        self.likelihood: Likelihood = Categorical()

    def model_inputs(self, batch):
        return _base_inputs(batch)

    def __call__(self, output, batch):
        logits = output.logits
        if logits.ndim != 2 or logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"model output: expected sequence-classification logits [B, {self.num_classes}], got shape "
                f"{tuple(logits.shape)}; load the model with num_labels={self.num_classes} or use AnswerTokenLogits "
                "for a causal LM."
            )
        return logits.float()

    def config(self):
        return {"type": "seq_cls", "num_classes": self.num_classes}


NOISE_MODES = ("fixed", "fit")


class SequenceRegression:
    """One real output from a sequence-classification head loaded with ``num_labels=1`` (``output.logits [B, 1]``),
    explained by a Gaussian likelihood ``y ~ N(f, σ²)``.

    Args:
        noise_std: the observation std σ (for ``noise="fit"``: the value until the fit replaces it).
        noise: ``"fixed"`` (σ = ``noise_std`` throughout) or ``"fit"``: after the MAP training, σ is set to its
            maximum-likelihood value on the training residuals, ``σ̂² = mean_n (y_n − f_MAP(x_n))²``
            (:func:`bayeslora.train.fit_noise_std`, called by :meth:`BayesianLoRA.fit_map` and ``bayeslora-run``);
            the MAP itself is trained with the initial σ, and everything after the fit uses σ̂ (the Laplace
            curvature and evidence, the VI likelihood, the predictive, and the training of further ensemble members,
            whose data term is then scaled by 1/σ̂² against the prior where the MAP's was by 1/σ²).
    """

    num_classes = 1

    def __init__(self, noise_std: float = 1.0, noise: str = "fixed"):
        if noise not in NOISE_MODES:
            raise ValueError(f"noise: expected one of {list(NOISE_MODES)}, got {noise!r}.")
        self.likelihood: Likelihood = Gaussian(noise_std)  # checks noise_std
        self.noise = noise

    @property
    def noise_std(self) -> float:
        return self.likelihood.noise_std

    def set_noise_std(self, noise_std: float) -> None:
        """Replace the observation std (the ``noise="fit"`` step)."""
        self.likelihood = Gaussian(noise_std)

    def model_inputs(self, batch):
        return _base_inputs(batch)

    def __call__(self, output, batch):
        f = output.logits
        if f.ndim != 2 or f.shape[-1] != 1:
            raise ValueError(
                f"model output: expected one regression output per example [B, 1], got shape {tuple(f.shape)}; load "
                "the model with num_labels=1 (format 'seq_reg')."
            )
        return f if f.dtype == torch.float64 else f.float()  # float32 (a float64 model stays float64)

    def config(self):
        return {"type": "seq_reg", "noise_std": self.noise_std, "noise": self.noise}


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad position of each row ``[B]`` (left or right padding)."""
    length = attention_mask.shape[-1]
    flipped = attention_mask.flip(-1).to(torch.long)
    return (length - 1) - flipped.argmax(-1)


def causal_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore padding, so left- and right-padded rows see the same positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class AnswerTokenLogits:
    """Next-token multiple-choice readout (the Laplace-LoRA protocol).

    The class logits are the LM logits of the C answer tokens (e.g. ``" A"``..``" D"``) at the last
    non-pad position of the prompt. Position ids are computed from the attention mask, so left and
    right padding give the same logits. With left padding (the library's collator default) only the
    last position goes through the LM head (``logits_to_keep=1``), which keeps the ``[B, L, V]``
    logits tensor out of memory.

    Args:
        token_ids: the C vocabulary ids of the answer tokens.
        answers: optional answer strings, kept for display.
    """

    def __init__(self, token_ids: Sequence[int], answers: Sequence[str] | None = None):
        ids = [int(t) for t in token_ids]
        if len(ids) < 2 or len(set(ids)) != len(ids):
            raise ValueError(f"token_ids: expected >= 2 distinct token ids, got {ids}.")
        self.token_ids = ids
        self.answers = list(answers) if answers is not None else None
        self.num_classes = len(ids)
        self.likelihood: Likelihood = Categorical()

    @classmethod
    def from_tokenizer(cls, tokenizer, answers: Sequence[str], prefix: str = " ") -> AnswerTokenLogits:
        """Build the readout from answer strings; each ``prefix + answer`` must be one token."""
        ids = []
        for a in answers:
            toks = tokenizer(prefix + a, add_special_tokens=False)["input_ids"]
            if len(toks) != 1:
                raise ValueError(
                    f"answers: {prefix + a!r} is {len(toks)} tokens {toks} for tokenizer "
                    f"{type(tokenizer).__name__}; expected exactly one. Use single-token answers (e.g. letters), or "
                    "change the prefix (e.g. prefix='' or ' ')."
                )
            ids.append(toks[0])
        if len(set(ids)) != len(ids):
            raise ValueError(f"answers: {list(answers)} map to repeated token ids {ids}; use distinct answers.")
        return cls(ids, answers=list(answers))

    def model_inputs(self, batch):
        inputs = _base_inputs(batch)
        mask = batch.get("attention_mask")
        if mask is None:
            return {**inputs, "logits_to_keep": 1}
        inputs["position_ids"] = causal_position_ids(mask)
        if bool(mask[:, -1].all()):
            inputs["logits_to_keep"] = 1  # left padded: the last position is the answer position
        return inputs

    def __call__(self, output, batch):
        logits = output.logits  # [B, L', V]
        ids = torch.as_tensor(self.token_ids, device=logits.device)
        if logits.shape[1] == 1:
            last = logits[:, 0]
        else:
            mask = batch.get("attention_mask")
            if mask is None:
                last = logits[:, -1]
            else:
                idx = last_token_index(mask).to(logits.device)
                last = logits[torch.arange(logits.shape[0], device=logits.device), idx]
        return last.index_select(-1, ids).float()

    def config(self):
        return {"type": "answer_token", "token_ids": self.token_ids, "answers": self.answers}


class TokenLogits:
    """The LM logits at every position ``[B, T, V]`` (float32) for a token-level likelihood (free-text targets).

    The likelihood (:class:`~bayeslora.likelihoods.TokenCategorical`) pairs position t's logits with the token at
    t + 1 and scores only the target tokens (labels other than ``ignore_index``). Position ids are computed from the
    attention mask, so left and right padding give the same logits. ``num_classes`` is the vocabulary size V.

    Args:
        vocab_size: V, the size of the LM head's output.
        ignore_index: the label of unscored positions (prompt tokens, padding).
    """

    def __init__(self, vocab_size: int, ignore_index: int = -100):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"vocab_size: expected an integer >= 2 (the LM head's outputs), got {vocab_size!r}.")
        self.num_classes = int(vocab_size)
        self.likelihood: Likelihood = TokenCategorical(ignore_index)

    @classmethod
    def for_model(cls, model, ignore_index: int = -100) -> TokenLogits:
        """The readout of a causal LM (V from its output embeddings)."""
        return cls(int(model.get_output_embeddings().weight.shape[0]), ignore_index=ignore_index)

    def model_inputs(self, batch):
        inputs = _base_inputs(batch)
        mask = batch.get("attention_mask")
        if mask is not None:
            inputs["position_ids"] = causal_position_ids(mask)
        return inputs

    def __call__(self, output, batch):
        logits = output.logits
        if logits.ndim != 3 or logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"model output: expected causal-LM logits [B, T, {self.num_classes}], got shape {tuple(logits.shape)}; "
                "pass a causal LM and vocab_size = its LM head's outputs (TokenLogits.for_model)."
            )
        return logits.float()

    def config(self):
        return {"type": "token", "vocab_size": self.num_classes, "ignore_index": self.likelihood.ignore_index}


def readout_from_config(config: Mapping[str, Any]) -> Readout:
    """Rebuild a readout from :meth:`Readout.config`."""
    kind = config.get("type")
    if kind == "seq_cls":
        return SequenceClassificationLogits(config["num_classes"])
    if kind == "answer_token":
        return AnswerTokenLogits(config["token_ids"], answers=config.get("answers"))
    if kind == "seq_reg":
        return SequenceRegression(config.get("noise_std", 1.0), noise=config.get("noise", "fixed"))
    if kind == "token":
        return TokenLogits(config["vocab_size"], ignore_index=config.get("ignore_index", -100))
    raise ValueError(
        f"readout config: unknown type {kind!r}; expected 'seq_cls', 'seq_reg', 'answer_token' or 'token'."
    )
