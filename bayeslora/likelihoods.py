"""The likelihood seam: how the outputs ``f [B, O]`` of a readout explain the labels.

Every part that needs the likelihood takes it from the readout (``readout.likelihood``, through
``AdapterFn.likelihood``) instead of hard-coding the cross-entropy: the MAP training loss
(:func:`~bayeslora.train.train_map`), the data term of the Laplace evidence and the K-FAC loss square root /
Fisher sampling (:func:`~bayeslora.posteriors.kfac.fit_curvature`), and the Pyro observation of the VI model
(:class:`~bayeslora.posteriors.vi_guides.AdapterModel`). A likelihood provides

* ``nll(f, y, reduction)``: the negative log-likelihood (mean or sum over examples);
* ``loss_sqrt(f, y, fisher, mc_samples, generator)``: vectors ``S [B, O, K]`` whose outer products give the
  Hessian of the NLL in ``f`` (``fisher="ggn"``, exact), its sampled-label Fisher (``"mc"``) or the empirical
  Fisher (``"empirical"``); K-FAC and the diagonal GGN are ``Σ_k (Jᵀ s_k)(Jᵀ s_k)ᵀ``;
* ``observation(f)``: the Pyro distribution of ``y`` given ``f`` (one event per example);
* ``config()``: JSON-able constructor arguments (:func:`likelihood_from_config` rebuilds it).

:class:`Categorical` is the classification case (labels ``[B]`` in ``[0, C)``); :class:`Gaussian` is regression
on targets ``[B, O]`` with a fixed observation std (then the GGN is ``JᵀJ / σ²``). :class:`TokenCategorical` is
the free-text case: next-token logits ``[B, T, V]`` over the whole vocabulary and labels ``[B, T]`` with an ignore
index on every position that is not a target token (prompt, padding). Its square-root vectors come one output-shaped
column at a time (:meth:`TokenCategorical.loss_sqrt_columns`, read through :func:`sqrt_columns`), so no
``[B, T, V, K]`` tensor is built.

**The predictive distribution** of a :class:`~bayeslora.predictive.Predictive` comes from its likelihood too: the
model average of the observation over the output samples ``f_s``. For the categorical likelihood that is the BMA
of the softmax (in :class:`~bayeslora.predictive.Predictive`); for the Gaussian it is the mixture

    p(y | x) = (1/S) Σ_s N(y; f_s, σ² + v),

where ``v [B, O]`` is an optional closed-form function-space variance shared by the components (the GLM Laplace
predictive is one component, ``f_MAP`` with ``v = diag(J Σ Jᵀ)``: the exact ``N(f_MAP, J Σ Jᵀ + σ²)``). Its mean,
variance, log-density, CDF and quantiles are :meth:`Gaussian.predictive_mean` … :meth:`Gaussian.predictive_quantile`
(the one place these Gaussian formulas live). For the token-level likelihood the BMA is streamed per target token
(:class:`~bayeslora.predictive.TokenPredictive`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import torch

# "mc_sequence": the MC Fisher of an example's whole likelihood at once. For one output per example it is "mc"; for
# a token sequence it samples every target token, takes one backward pass of the sampled sequence's gradient per
# sample (the T per-token columns of "mc" summed), unbiased for the same per-token Fisher sum (the cross terms have
# mean zero), T times cheaper and noisier (TokenCategorical.loss_sqrt_columns).
FISHERS = ("ggn", "mc", "empirical", "mc_sequence")


def _check_fisher(fisher: str) -> None:
    if fisher not in FISHERS:
        raise ValueError(f"fisher: expected one of {list(FISHERS)}, got {fisher!r}.")


def _per_example_fisher(fisher: str) -> str:
    """The Fisher type, checked, for a likelihood with one output per example: ``"mc_sequence"`` is ``"mc"``."""
    _check_fisher(fisher)
    return "mc" if fisher == "mc_sequence" else fisher


@runtime_checkable
class Likelihood(Protocol):
    name: str

    def nll(self, outputs: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor: ...

    def loss_sqrt(
        self, outputs: torch.Tensor, labels: torch.Tensor, fisher: str, mc_samples: int = 1, generator=None
    ) -> torch.Tensor: ...

    def observation(self, outputs: torch.Tensor): ...

    def config(self) -> dict[str, Any]: ...


class Categorical:
    """Softmax over C class logits, labels ``[B]`` in ``[0, C)`` (the classification case)."""

    name = "categorical"

    def nll(self, outputs: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return torch.nn.functional.cross_entropy(outputs, labels.long(), reduction=reduction)

    def loss_sqrt(
        self, outputs: torch.Tensor, labels: torch.Tensor, fisher: str, mc_samples: int = 1, generator=None
    ) -> torch.Tensor:
        """``"ggn"``: the exact square root of ``diag(p) − p pᵀ`` with ``K = C − 1`` (the Hessian annihilates
        the all-ones direction); ``"mc"``: ``K = mc_samples`` sampled-label gradients ``(p − e_ŷ)/√K``;
        ``"empirical"``: the true-label gradient ``p − e_y``; ``"mc_sequence"`` is ``"mc"`` (one output per example)."""
        fisher = _per_example_fisher(fisher)
        p = torch.softmax(outputs.detach().double(), dim=-1)
        b, c = p.shape
        if fisher == "ggn":
            basis = torch.linalg.qr(torch.eye(c, dtype=p.dtype, device=p.device) - 1.0 / c)[0][:, : c - 1]
            hess = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
            vals, vecs = torch.linalg.eigh(basis.T @ hess @ basis)
            out = basis @ (vecs * vals.clamp_min(0.0).sqrt()[:, None, :])
        elif fisher == "mc":
            draws = torch.multinomial(p.float(), mc_samples, replacement=True, generator=generator)  # [B, K]
            onehot = torch.nn.functional.one_hot(draws, c).to(p.dtype).transpose(1, 2)  # [B, C, K]
            out = (p[:, :, None] - onehot) / mc_samples**0.5
        else:
            out = (p - torch.nn.functional.one_hot(labels.long(), c).to(p.dtype))[:, :, None]
        return out.to(outputs.dtype)

    def observation(self, outputs: torch.Tensor):
        import pyro.distributions as dist

        return dist.Categorical(logits=outputs)

    def config(self) -> dict[str, Any]:
        return {"name": self.name}


class Gaussian:
    """``y ~ N(f, σ² I)`` on targets ``[B, O]`` with a fixed observation std ``noise_std`` (regression)."""

    name = "gaussian"

    def __init__(self, noise_std: float = 1.0):
        if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)) or not noise_std > 0:
            raise ValueError(f"noise_std: expected a positive observation std, got {noise_std!r}.")
        self.noise_std = float(noise_std)

    def _targets(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        y = labels.to(outputs.dtype)
        if y.ndim == 1 and outputs.ndim == 2 and outputs.shape == (y.shape[0], 1):
            y = y[:, None]  # one output: targets [B] read as [B, 1]
        if y.shape != outputs.shape:
            raise ValueError(
                f"labels: a Gaussian likelihood needs targets shaped like the outputs {tuple(outputs.shape)}, got "
                f"{tuple(y.shape)}."
            )
        return y

    def nll(self, outputs: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        y = self._targets(outputs, labels)
        per = 0.5 * ((outputs - y) / self.noise_std).square().sum(-1) + outputs.shape[-1] * (
            torch.log(torch.tensor(self.noise_std, dtype=outputs.dtype, device=outputs.device))
            + 0.5 * torch.log(torch.tensor(2 * torch.pi, dtype=outputs.dtype, device=outputs.device))
        )
        return per.mean() if reduction == "mean" else per.sum()

    def loss_sqrt(
        self, outputs: torch.Tensor, labels: torch.Tensor, fisher: str, mc_samples: int = 1, generator=None
    ) -> torch.Tensor:
        """``"ggn"``: ``I / σ`` (``K = O``: the Hessian ``I / σ²`` is constant); ``"mc"``: ``ε / σ`` with
        ``ε ~ N(0, I)`` (``E[ε εᵀ] = I``), ``K = mc_samples`` scaled by ``1/√K``; ``"empirical"``: ``(f − y) / σ²``;
        ``"mc_sequence"`` is ``"mc"``."""
        fisher = _per_example_fisher(fisher)
        b, o = outputs.shape
        if fisher == "ggn":
            eye = torch.eye(o, dtype=outputs.dtype, device=outputs.device) / self.noise_std
            return eye.expand(b, o, o).clone()
        if fisher == "mc":
            eps = torch.randn(b, o, mc_samples, generator=generator, device=outputs.device, dtype=torch.float64)
            return (eps / (self.noise_std * mc_samples**0.5)).to(outputs.dtype)
        y = self._targets(outputs, labels)
        return ((outputs.detach() - y) / self.noise_std**2)[:, :, None]

    def observation(self, outputs: torch.Tensor):
        import pyro.distributions as dist

        return dist.Normal(outputs, self.noise_std).to_event(1)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "noise_std": self.noise_std}

    # ---------------------------------------------------------------- the predictive mixture (module docstring)
    def _component_std(self, samples: torch.Tensor, variance: torch.Tensor | None) -> torch.Tensor:
        """The std of every mixture component ``[B, O]`` (float64): ``√(σ² + v)``."""
        v = torch.zeros(samples.shape[1:], dtype=torch.float64, device=samples.device)
        if variance is not None:
            v = v + variance.double().clamp_min(0.0)
        return (v + self.noise_std**2).sqrt()

    def predictive_mean(self, samples: torch.Tensor, variance: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of the mixture ``[B, O]``: ``(1/S) Σ_s f_s`` (float64)."""
        return samples.double().mean(0)

    def epistemic_variance(self, samples: torch.Tensor, variance: torch.Tensor | None = None) -> torch.Tensor:
        """The function-space part of the variance ``[B, O]``: ``v + (1/S) Σ_s (f_s − f̄)²`` (float64)."""
        spread = samples.double().var(0, correction=0)
        return spread if variance is None else spread + variance.double().clamp_min(0.0)

    def predictive_variance(self, samples: torch.Tensor, variance: torch.Tensor | None = None) -> torch.Tensor:
        """Variance of the mixture ``[B, O]``: ``σ² + v + (1/S) Σ_s (f_s − f̄)²`` (float64)."""
        return self.noise_std**2 + self.epistemic_variance(samples, variance)

    def predictive_log_density(
        self, samples: torch.Tensor, variance: torch.Tensor | None, labels: torch.Tensor
    ) -> torch.Tensor:
        """``log p(y | x)`` per example ``[B]`` (float64; the O outputs are independent given ``f_s``)."""
        f = samples.double()
        y = self._targets(f[0], labels.to(f.device)).double()
        normal = torch.distributions.Normal(f, self._component_std(samples, variance))
        per_sample = normal.log_prob(y[None]).sum(-1)  # [S, B]
        return torch.logsumexp(per_sample, 0) - math.log(f.shape[0])

    def predictive_cdf(
        self, samples: torch.Tensor, variance: torch.Tensor | None, values: torch.Tensor
    ) -> torch.Tensor:
        """The marginal CDF ``P(y_o ≤ value_o | x)`` ``[B, O]`` at ``values [B, O]`` (the PIT at the labels)."""
        f = samples.double()
        y = self._targets(f[0], values.to(f.device)).double()
        return torch.distributions.Normal(f, self._component_std(samples, variance)).cdf(y[None]).mean(0)

    def predictive_quantile(
        self, samples: torch.Tensor, variance: torch.Tensor | None, q: float, iterations: int = 100
    ) -> torch.Tensor:
        """The ``q``-quantile of every marginal ``[B, O]``: closed form for one component, else bisection on
        :meth:`predictive_cdf` (monotone) between the components' 1e-12 tails."""
        if not 0.0 < float(q) < 1.0:
            raise ValueError(f"q: expected a probability in (0, 1), got {q!r}.")
        f, sd = samples.double(), self._component_std(samples, variance)
        z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(float(q), dtype=torch.float64)))
        if f.shape[0] == 1:
            return f[0] + z * sd
        tail = 7.5 * sd  # Φ(−7.5) ≈ 3e-14
        lo, hi = f.min(0).values - tail, f.max(0).values + tail
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            below = self.predictive_cdf(samples, variance, mid) < q
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return 0.5 * (lo + hi)


class TokenCategorical:
    """Next-token softmax over the vocabulary: outputs ``f [B, T, V]`` (the LM logits at every position), labels
    ``[B, T]`` (the input ids on target tokens, ``ignore_index`` elsewhere).

    The shift lives here and nowhere else (:meth:`shift`): the logits at position ``t`` predict the token at
    ``t + 1``, so ``f[:, :-1]`` is paired with ``labels[:, 1:]``. An example's NLL is the sum over its target tokens
    (the log-likelihood of the target text given the prompt); ``nll(reduction="mean")`` is its mean over examples,
    ``"sum"`` the data log-likelihood that the Laplace evidence needs.

    Args:
        ignore_index: the label of positions that are not scored (prompt tokens, padding).
    """

    name = "token_categorical"
    token_level = True

    def __init__(self, ignore_index: int = -100):
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"ignore_index: expected an int label of unscored positions, got {ignore_index!r}.")
        self.ignore_index = int(ignore_index)

    def shift(self, outputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(f [B, T-1, V], y [B, T-1], mask [B, T-1])``: position t's logits, the token at t+1 (0 where ignored)
        and whether it is a target."""
        if outputs.ndim != 3 or labels.shape != outputs.shape[:2]:
            raise ValueError(
                f"labels: a token-level likelihood needs logits [B, T, V] and labels [B, T] of the same B, T; got "
                f"logits {tuple(outputs.shape)} and labels {tuple(labels.shape)}. Build batches with "
                "format='generative'."
            )
        y = labels[:, 1:].long().to(outputs.device)
        mask = y != self.ignore_index
        return outputs[:, :-1], torch.where(mask, y, torch.zeros_like(y)), mask

    def token_log_probs(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``log p(y_{t+1} | f_t)`` on target tokens, 0 elsewhere ``[B, T-1]``."""
        f, y, mask = self.shift(outputs, labels)
        lp = torch.log_softmax(f, dim=-1).gather(-1, y[..., None])[..., 0]
        return lp * mask

    def nll(self, outputs: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        per = -self.token_log_probs(outputs, labels).sum(-1)
        return per.mean() if reduction == "mean" else per.sum()

    def loss_sqrt_columns(
        self, outputs: torch.Tensor, labels: torch.Tensor, fisher: str, mc_samples: int = 1, generator=None
    ) -> Iterator[torch.Tensor]:
        """Output-shaped vectors ``s [B, T, V]``, one backward pass each: column ``(j, k)`` holds, in every row, the
        vector of the row's j-th target token (at the position whose logits predict it) and zeros elsewhere. Summed
        over the columns, ``(Jᵀ s)(Jᵀ s)ᵀ`` is the per-token Fisher summed over target tokens: ``"mc"`` draws
        ``mc_samples`` tokens per target position from the model, ``s = (p − e_ŷ)/√K``; ``"empirical"`` uses the
        target token, ``s = p − e_y``. The rows of a batch are independent, so one column serves all rows; the cost
        is (the most target tokens of a row) × K backward passes per batch. ``"mc_sequence"``: one column per sample
        holding every target token's sampled vector at once (the sum of the per-token columns), so K backward passes
        per batch; its outer products add cross terms between the tokens of a row whose expectation is zero (the
        sampled tokens are independent given the teacher-forced inputs, each vector has mean zero), so it estimates
        the same Fisher without bias, with more variance. ``"ggn"`` (the exact GGN: ``V − 1`` backward passes per
        target token) is refused."""
        _check_fisher(fisher)
        if fisher == "ggn":
            raise ValueError(
                "fisher: 'ggn' over a vocabulary needs a backward pass per vocabulary entry per target token; use "
                "fisher='mc' (sampled tokens, an unbiased estimate of the GGN) or fisher='empirical' (the target "
                "tokens) with a token-level likelihood."
            )
        f, y, mask = self.shift(outputs.detach(), labels)
        rows, cols = mask.nonzero(as_tuple=True)
        if rows.numel() == 0:
            return
        rank = (mask.long().cumsum(1) - 1)[rows, cols]
        p = torch.softmax(f[rows, cols].double(), dim=-1)  # [M, V]
        v = p.shape[-1]
        if fisher in ("mc", "mc_sequence"):
            draws = torch.multinomial(p.float(), mc_samples, replacement=True, generator=generator)  # [M, K]
            vectors = [(p - torch.nn.functional.one_hot(draws[:, k], v).to(p.dtype)) / mc_samples**0.5
                       for k in range(mc_samples)]  # fmt: skip
            if fisher == "mc_sequence":  # every target token at once: one backward pass per sample
                for vec in vectors:
                    column = torch.zeros_like(outputs)
                    column[rows, cols] = vec.to(outputs.dtype)
                    yield column
                return
        else:
            vectors = [p - torch.nn.functional.one_hot(y[rows, cols], v).to(p.dtype)]
        for j in range(int(rank.max()) + 1):
            sel = rank == j
            for vec in vectors:
                column = torch.zeros_like(outputs)
                column[rows[sel], cols[sel]] = vec[sel].to(outputs.dtype)
                yield column

    def loss_sqrt(
        self, outputs: torch.Tensor, labels: torch.Tensor, fisher: str, mc_samples: int = 1, generator=None
    ) -> torch.Tensor:
        """The columns of :meth:`loss_sqrt_columns` stacked ``[B, T, V, K]`` (small models only; K-FAC streams
        them)."""
        columns = list(self.loss_sqrt_columns(outputs, labels, fisher, mc_samples, generator))
        if not columns:
            return outputs.new_zeros((*outputs.shape, 0))
        return torch.stack(columns, dim=-1)

    def observation(self, outputs: torch.Tensor):
        return _token_sequence_class()(self, outputs)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "ignore_index": self.ignore_index}


@functools.cache
def _token_sequence_class():
    """The Pyro distribution of a batch of target sequences (defined on first use, so Pyro is imported lazily)."""
    import pyro.distributions as dist
    from torch.distributions import constraints

    class TokenSequence(dist.TorchDistribution):
        """One event per example: its labels ``[T]``; ``log_prob`` is the summed next-token log-probability of the
        target tokens (:meth:`TokenCategorical.token_log_probs`)."""

        arg_constraints: dict = {}
        support = constraints.dependent  # integer token ids and the ignore index; never validated

        def __init__(self, likelihood: TokenCategorical, logits: torch.Tensor):
            self.likelihood, self.logits = likelihood, logits
            super().__init__(batch_shape=logits.shape[:1], event_shape=logits.shape[1:2], validate_args=False)

        def log_prob(self, value: torch.Tensor) -> torch.Tensor:
            return self.likelihood.token_log_probs(self.logits, value).sum(-1)

    return TokenSequence


def sqrt_columns(
    likelihood: Likelihood, outputs: torch.Tensor, labels: torch.Tensor, fisher: str, mc_samples: int = 1,
    generator=None,
) -> Iterator[torch.Tensor]:  # fmt: skip
    """The loss square-root vectors one output-shaped column at a time (one backward pass each): the likelihood's
    own ``loss_sqrt_columns`` where it streams them, else the last axis of ``loss_sqrt``."""
    stream = getattr(likelihood, "loss_sqrt_columns", None)
    if stream is not None:
        yield from stream(outputs, labels, fisher, mc_samples, generator)
        return
    vectors = likelihood.loss_sqrt(outputs, labels, fisher, mc_samples, generator)
    for k in range(vectors.shape[-1]):
        yield vectors[..., k]


def is_token_level(likelihood: Any) -> bool:
    """Whether a likelihood scores token sequences (outputs ``[B, T, V]``) rather than one output per example."""
    return bool(getattr(likelihood, "token_level", False))


LIKELIHOODS = {"categorical": Categorical, "gaussian": Gaussian, "token_categorical": TokenCategorical}


def likelihood_from_config(config: Mapping[str, Any]) -> Likelihood:
    """Rebuild a likelihood from its :meth:`config`."""
    options = dict(config)
    name = options.pop("name", None)
    if name not in LIKELIHOODS:
        raise ValueError(f"likelihood: expected one of {sorted(LIKELIHOODS)}, got {name!r}.")
    return LIKELIHOODS[name](**options)
