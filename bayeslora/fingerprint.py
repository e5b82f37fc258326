"""A fingerprint of a model's frozen base weights, so a saved posterior is never loaded onto other weights.

A posterior is a distribution over adapter values *for one base model*: loaded onto a base of the same
architecture but other weights (another checkpoint, another quantisation, a re-initialised head) it would
predict silently wrong. :func:`base_fingerprint` hashes the model config and a strided sample of a few
base tensors spread over the network (first, middle and last layers), skipping everything an adapter
replaces (LoRA tensors, the copies peft trains with ``modules_to_save`` and the originals they wrap: the
saved adapter restores those). It works on a plain ``transformers`` model and on the same model wrapped by
peft (peft's ``base_layer`` / ``original_module`` names are mapped back to the plain ones).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

SAMPLED_TENSORS = 4  # base tensors hashed (spread over the network)
SAMPLE_VALUES = 65536  # values hashed per tensor (a strided sample)
_SKIP = ("lora_", "modules_to_save")


def _base_model(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _plain_name(name: str) -> str | None:
    """The parameter's name in the plain base model, or None for what an adapter replaces."""
    if any(part in name for part in _SKIP) or ".original_module." in f".{name}.":
        return None
    return name.replace(".base_layer.", ".")


def base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base tensors by their plain names (adapter and ``modules_to_save`` tensors left out)."""
    out = {}
    for name, tensor in _base_model(model).state_dict(keep_vars=False).items():
        plain = _plain_name(name)
        if plain is not None and torch.is_tensor(tensor) and tensor.is_floating_point() and tensor.numel():
            out[plain] = tensor
    return out


def _config_text(model: nn.Module) -> str:
    config = getattr(_base_model(model), "config", None)
    if config is None:
        return type(_base_model(model)).__name__
    d = config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation"):
        d.pop(volatile, None)
    return json.dumps(d, sort_keys=True, default=str)


def _tensor_digest(tensor: torch.Tensor) -> str:
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // SAMPLE_VALUES)
    sample = flat[::step][:SAMPLE_VALUES].to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(str(tuple(tensor.shape)).encode())
    h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def base_fingerprint(model: nn.Module, names: list[str] | None = None) -> dict[str, Any]:
    """``{"config": hash, "tensors": {name: hash}}`` of the base model (``names``: hash exactly these tensors).

    Raises:
        ValueError: ``names`` asks for a tensor the model does not have.
    """
    tensors = base_tensors(model)
    if names is None:
        keys = list(tensors)
        k = min(SAMPLED_TENSORS, len(keys))
        names = [keys[round(i * (len(keys) - 1) / max(k - 1, 1))] for i in range(k)] if k else []
        names = list(dict.fromkeys(names))
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(
            f"base model: has no tensors {missing[:3]}; it is not the architecture the posterior was fit on"
        )
    return {
        "config": hashlib.sha256(_config_text(model).encode()).hexdigest()[:16],
        "tensors": {n: _tensor_digest(tensors[n]) for n in names},
    }
