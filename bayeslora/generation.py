"""Generation under the posterior: Hugging Face ``generate`` with adapter values drawn from a posterior.

One draw per sequence batch: draw i of ``n_samples`` is loaded into the model and ``generate`` runs once for the
whole batch with it, so every row and every decoding step of output i sees the same adapter values. The draws are
the posterior's ``sample_values`` (Laplace: weight samples of the sampling predictive; VI: guide draws; ensembles and
checkpoint ensembles: member i; MAP: the MAP each time; IVON, SWAG, MultiSWAG, TFB: draws of their Gaussians). MC
dropout has no weight samples: output i runs ``generate``
inside its ``sampling_mode`` (LoRA dropout on), so the dropout masks are redrawn at every forward pass (every
decoding step). Randomness comes only from ``generator``: one seed per draw seeds a forked RNG region (the HF
sampler's ``do_sample`` draws and the dropout masks), so a seed reproduces the outputs and the caller's RNG is
untouched. The model's adapter values and train/eval modes are restored afterwards, even on error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .formats import GENERATION_PADDING_SIDE
from .function import AdapterFn, model_mode
from .posteriors import has_weight_samples
from .rng import forked, seed_from
from .validate import positive_int


@contextlib.contextmanager
def loaded_values(model: torch.nn.Module, values: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Copy ``values`` (parameter name -> tensor) into the model for the block; the previous values come back."""
    named = dict(model.named_parameters())
    unknown = [k for k in values if k not in named]
    if unknown:
        raise ValueError(
            f"values: {unknown[:3]} are not parameters of the model; draw them from this model's posterior."
        )
    saved = {k: named[k].detach().clone() for k in values}
    try:
        with torch.no_grad():
            for k, v in values.items():
                named[k].copy_(v.to(device=named[k].device, dtype=named[k].dtype))
        yield
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                named[k].copy_(v)


def _check_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if not torch.is_tensor(input_ids) or input_ids.ndim != 2:
        shape = tuple(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__
        raise ValueError(f"input_ids: expected prompt token ids [B, L], got {shape}.")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask: expected the shape of input_ids {tuple(input_ids.shape)}, got "
            f"{tuple(attention_mask.shape)}."
        )
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError(
            f"attention_mask: some prompts end in padding; generation needs prompts padded on the "
            f"{GENERATION_PADDING_SIDE} (tokenizer.padding_side = {GENERATION_PADDING_SIDE!r}, or "
            f"make_loader(..., padding_side={GENERATION_PADDING_SIDE!r}))."
        )
    return attention_mask


def _pad_stack(outputs: list[torch.Tensor], pad_id: int) -> torch.Tensor:
    length = max(o.shape[1] for o in outputs)
    out = torch.full((len(outputs), outputs[0].shape[0], length), pad_id, dtype=outputs[0].dtype)
    for i, o in enumerate(outputs):
        out[i, :, : o.shape[1]] = o.cpu()
    return out


def generate(
    posterior: Any,
    fn: AdapterFn,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    n_samples: int = 1,
    generator: torch.Generator | None = None,
    **generate_kwargs: Any,
) -> torch.Tensor:
    """``n_samples`` generations of the batch, one posterior draw each (module docstring).

    Returns:
        token ids ``[n_samples, B, L]`` (prompt and continuation, as HF ``generate`` returns them; draws that stop
        early are padded with the model's pad id).
    """
    positive_int("n_samples", n_samples)
    mask = _check_prompts(input_ids, attention_mask)
    device = fn.device
    batch = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "labels": input_ids.to(device)}
    if has_weight_samples(posterior):
        draws = [loaded_values(fn.model, v) for v in posterior.sample_values(fn, batch, n_samples, generator)]
        modes = [model_mode(fn.model, False) for _ in draws]
    elif callable(getattr(posterior, "sampling_mode", None)):
        draws = [contextlib.nullcontext() for _ in range(n_samples)]
        modes = [posterior.sampling_mode(fn, generator) for _ in range(n_samples)]
    else:
        raise ValueError(
            f"method: {getattr(posterior, 'name', type(posterior).__name__)!r} draws no adapter values "
            "(sample_values) and has no sampling mode; generate with the MAP, a Laplace method, VI, an ensemble or "
            "MC dropout."
        )
    seeds = [seed_from(generator) for _ in range(n_samples)]
    config = getattr(fn.model, "generation_config", None)
    pad_id = getattr(config, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(fn.model.config, "pad_token_id", None) or 0
    outputs = []
    for draw, mode, seed in zip(draws, modes, seeds):
        with draw, mode, forked(device, seed), torch.no_grad(), fn._autocast():
            outputs.append(
                fn.model.generate(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pad_token_id=pad_id,
                    **generate_kwargs,
                )
            )  # fmt: skip
    return _pad_stack(outputs, int(pad_id))
