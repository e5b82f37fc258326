"""AdapterParams: the named LoRA tensors of a peft model that a posterior treats as random.

Selection is by *module type and adapter name*, not by ``requires_grad``: ``set_adapter`` and
peft's SEQ_CLS handling both toggle ``requires_grad`` and would otherwise fool us. The selected
tensors are

* ``lora_A[adapter].weight`` / ``lora_B[adapter].weight`` of every peft ``LoraLayer``
  (``lora_embedding_A/B`` for LoRA'd embeddings), optionally filtered by module-name patterns and
  by side (``lora_tensors=("B",)`` puts the posterior on the B matrices only, the A matrices stay
  fixed at their current values);
* optionally the trainable copy of each ``modules_to_save`` module (e.g. a classification head),
  i.e. ``<name>.modules_to_save[adapter].*`` — never ``original_module``.

Values are plain ``dict[str, Tensor]`` keyed by the full ``model.named_parameters()`` names so
they can be passed straight to :func:`torch.func.functional_call`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ParamGroup:
    """One selected layer: its parameters and, where it is linear, the module that uses them.

    Attributes:
        module_name: full module name in the model.
        module: the ``nn.Linear`` (or embedding) module whose forward uses the tensors.
        weight: full parameter name of the weight.
        bias: full parameter name of the bias, if any.
        kind: ``"lora_A"``, ``"lora_B"``, ``"lora_embedding_A"``, ``"lora_embedding_B"`` or ``"head"``.
    """

    module_name: str
    module: nn.Module
    weight: str
    bias: str | None
    kind: str

    @property
    def names(self) -> tuple[str, ...]:
        return (self.weight,) if self.bias is None else (self.weight, self.bias)


def _lora_layer_types() -> tuple[type, ...]:
    from peft.tuners.lora import LoraLayer

    return (LoraLayer,)


def _modules_to_save_type() -> type | None:
    try:
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:  # pragma: no cover - very old peft
        return None
    return ModulesToSaveWrapper


class AdapterParams:
    """The selected adapter tensors of a peft model (the random variables of every posterior).

    Args:
        model: a peft model (``PeftModel``) or any module containing peft LoRA layers.
        adapter_name: which adapter slot to select (default: the model's active adapter, else ``"default"``).
        include: optional regex patterns; a LoRA layer is kept if its module name matches any.
        exclude: optional regex patterns; a LoRA layer is dropped if its module name matches any.
        include_head: also select the trainable ``modules_to_save`` copies (e.g. a SEQ_CLS head).
        lora_tensors: which LoRA sides are random: ``("A", "B")`` (default), ``("A",)`` or ``("B",)``
            (``"A"`` also selects ``lora_embedding_A``, ``"B"`` ``lora_embedding_B``). Unselected tensors
            keep their current values in every forward.

    Raises:
        ValueError: if the model has no LoRA layers for ``adapter_name`` or the filters leave none.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter_name: str | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        include_head: bool = True,
        lora_tensors: Sequence[str] = ("A", "B"),
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module (a peft model), got {type(model).__name__}.")
        self.model = model
        self.adapter_name = adapter_name or _active_adapter(model)
        self.include = list(include or [])
        self.exclude = list(exclude or [])
        self.include_head = bool(include_head)
        if isinstance(lora_tensors, str) or not set(lora_tensors) or not set(lora_tensors) <= {"A", "B"}:
            raise ValueError(
                "lora_tensors: expected a non-empty subset of ['A', 'B'] (e.g. ['A', 'B'] or ['B']), "
                f"got {lora_tensors!r}."
            )
        self.lora_tensors = sorted(set(lora_tensors))
        self.groups: list[ParamGroup] = self._select()
        named = dict(model.named_parameters())
        self._live = {n: named[n] for g in self.groups for n in g.names}

    # ------------------------------------------------------------------ selection
    def _select(self) -> list[ParamGroup]:
        lora_types = _lora_layer_types()
        mts_type = _modules_to_save_type()
        groups: list[ParamGroup] = []
        seen_adapters: set[str] = set()
        n_lora = 0
        for mod_name, module in self.model.named_modules():
            if isinstance(module, lora_types):
                n_lora += 1
                for attr in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
                    if attr[-1] not in self.lora_tensors:
                        continue
                    container = getattr(module, attr, None)
                    if container is None:
                        continue
                    seen_adapters.update(container.keys())
                    if self.adapter_name not in container or not self._keep(mod_name):
                        continue
                    groups.extend(self._groups_of(container, attr, mod_name))
            elif self.include_head and mts_type is not None and isinstance(module, mts_type):
                copies = getattr(module, "modules_to_save", {})
                if self.adapter_name in copies:
                    sub = copies[self.adapter_name]
                    prefix = f"{mod_name}.modules_to_save.{self.adapter_name}"
                    for p_name, _ in sub.named_parameters():
                        if p_name.endswith("bias"):
                            continue
                        base = p_name.rsplit(".", 1)[0] if "." in p_name else ""
                        owner = sub.get_submodule(base) if base else sub
                        bias = f"{prefix}.{base}.bias" if base else f"{prefix}.bias"
                        has_bias = getattr(owner, "bias", None) is not None
                        groups.append(
                            ParamGroup(
                                module_name=f"{prefix}.{base}".rstrip("."),
                                module=owner,
                                weight=f"{prefix}.{p_name}",
                                bias=bias if has_bias else None,
                                kind="head",
                            )
                        )
        if n_lora == 0:
            raise ValueError(
                f"model: found no peft LoRA layers in {type(self.model).__name__}; wrap the model with "
                "peft.get_peft_model(model, LoraConfig(...)) (or bayeslora.models.add_lora) with target_modules "
                "that exist in the model."
            )
        if not any(g.kind != "head" for g in groups):
            if self.adapter_name not in seen_adapters:
                raise ValueError(
                    f"adapter_name: no LoRA adapter named {self.adapter_name!r}; the model has {sorted(seen_adapters)}."
                )
            raise ValueError(
                f"include/exclude: the patterns include={self.include} exclude={self.exclude} (lora_tensors="
                f"{self.lora_tensors}) leave no LoRA tensor selected; loosen them."
            )
        return groups

    def _groups_of(self, container, attr: str, mod_name: str) -> Iterable[ParamGroup]:
        sub = container[self.adapter_name]
        prefix = f"{mod_name}.{attr}.{self.adapter_name}"
        if isinstance(sub, nn.Parameter):  # lora_embedding_A/B are ParameterDicts
            yield ParamGroup(module_name=mod_name, module=container, weight=prefix, bias=None, kind=attr)
            return
        has_bias = getattr(sub, "bias", None) is not None
        yield ParamGroup(
            module_name=prefix,
            module=sub,
            weight=f"{prefix}.weight",
            bias=f"{prefix}.bias" if has_bias else None,
            kind=attr,
        )

    def _keep(self, mod_name: str) -> bool:
        if self.include and not any(re.search(p, mod_name) for p in self.include):
            return False
        return not any(re.search(p, mod_name) for p in self.exclude)

    # ------------------------------------------------------------------ views
    @property
    def names(self) -> list[str]:
        """Full parameter names of the selected tensors, in a fixed order."""
        return list(self._live)

    def tensors(self) -> dict[str, nn.Parameter]:
        """The live parameters (the model's own storage), e.g. for an optimizer."""
        return dict(self._live)

    def values(self) -> dict[str, torch.Tensor]:
        """A detached copy of the current values."""
        return {n: p.detach().clone() for n, p in self._live.items()}

    @property
    def shapes(self) -> dict[str, torch.Size]:
        return {n: p.shape for n, p in self._live.items()}

    @property
    def numel(self) -> int:
        """D, the number of random parameters."""
        return sum(p.numel() for p in self._live.values())

    def check(self, values: Mapping[str, torch.Tensor], argument: str = "values") -> None:
        """Raise a clear error if ``values`` does not hold exactly the selected names and shapes."""
        missing = [n for n in self._live if n not in values]
        extra = [n for n in values if n not in self._live]
        if missing or extra:
            raise ValueError(
                f"{argument}: adapter names do not match the selected AdapterParams; missing {missing[:3]}"
                f"{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}. "
                "Fit and predict with the same model, adapter_name and include/exclude patterns."
            )
        for n, p in self._live.items():
            if tuple(values[n].shape) != tuple(p.shape):
                raise ValueError(f"{argument}[{n!r}]: expected shape {tuple(p.shape)}, got {tuple(values[n].shape)}.")

    @torch.no_grad()
    def load(self, values: Mapping[str, torch.Tensor]) -> None:
        """Copy ``values`` into the live parameters (in place)."""
        self.check(values)
        for n, p in self._live.items():
            p.copy_(values[n].to(device=p.device, dtype=p.dtype))

    def flatten(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate values into one vector ``[D]`` in :attr:`names` order."""
        return torch.cat([values[n].reshape(-1) for n in self._live])

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`flatten` (views into ``vector``)."""
        if vector.shape[-1] != self.numel:
            raise ValueError(f"vector: expected last dimension D={self.numel}, got {tuple(vector.shape)}.")
        out, i = {}, 0
        for n, p in self._live.items():
            out[n] = vector[..., i : i + p.numel()].reshape(*vector.shape[:-1], *p.shape)
            i += p.numel()
        return out

    def __repr__(self) -> str:
        kinds: dict[str, int] = {}
        for g in self.groups:
            kinds[g.kind] = kinds.get(g.kind, 0) + 1
        return (
            f"AdapterParams(adapter={self.adapter_name!r}, tensors={len(self._live)}, D={self.numel}, groups={kinds})"
        )


def _active_adapter(model: nn.Module) -> str:
    active = getattr(model, "active_adapter", None)
    if isinstance(active, str):
        return active
    if isinstance(active, (list, tuple)) and active:
        return active[0]
    return "default"
