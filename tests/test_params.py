import pytest
import torch
from helpers import tiny_fn
from peft import LoraConfig

from bayeslora.models import load_model
from bayeslora.params import AdapterParams


def test_selects_lora_tensors_and_trainable_head_copy():
    fn, _ = tiny_fn("bert")
    p = fn.params
    names = set(p.names)
    all_names = dict(fn.model.named_parameters())
    assert names <= set(all_names)
    lora = {n for n in all_names if ".lora_A.default." in n or ".lora_B.default." in n}
    head = {n for n in all_names if "modules_to_save.default" in n}
    assert lora and head and names == lora | head
    assert not any("original_module" in n for n in names)
    # The head's weight and bias form one group; LoRA A/B one group each.
    kinds = [g.kind for g in p.groups]
    assert kinds.count("head") == 1 and kinds.count("lora_A") == kinds.count("lora_B") == 4
    head_group = next(g for g in p.groups if g.kind == "head")
    assert head_group.bias is not None and isinstance(head_group.module, torch.nn.Linear)
    assert p.numel == sum(all_names[n].numel() for n in names)


def test_include_head_false_and_patterns():
    fn, _ = tiny_fn("bert", include_head=False)
    assert all(g.kind != "head" for g in fn.params.groups)
    only_l0 = AdapterParams(fn.model, include=[r"layer\.0\."], include_head=False)
    assert only_l0.names and all(".layer.0." in n for n in only_l0.names)
    no_value = AdapterParams(fn.model, exclude=["value"], include_head=False)
    assert no_value.names and not any(".value." in n for n in no_value.names)
    with pytest.raises(ValueError, match="include/exclude"):
        AdapterParams(fn.model, include=["does-not-exist"])


def test_not_fooled_by_set_adapter():
    fn, _ = tiny_fn("bert")
    model = fn.model
    model.add_adapter("other", LoraConfig(r=3, target_modules=["query", "value"], task_type="SEQ_CLS"))
    model.set_adapter("other")  # flips requires_grad: "default" tensors are now frozen
    frozen_default = [n for n, t in model.named_parameters() if ".lora_A.default." in n]
    assert frozen_default and not any(dict(model.named_parameters())[n].requires_grad for n in frozen_default)
    by_name = AdapterParams(model, adapter_name="default")
    assert set(by_name.names) == set(fn.params.names)
    active = AdapterParams(model)
    assert active.adapter_name == "other"
    assert all(".other." in n for n in active.names)
    assert all(s[0] == 3 or s[-1] == 3 for n, s in active.shapes.items() if "lora_" in n)
    with pytest.raises(ValueError, match="no LoRA adapter named 'nope'"):
        AdapterParams(model, adapter_name="nope")


def test_model_without_lora_is_rejected():
    model, _ = load_model("tiny-bert", device="cpu")
    with pytest.raises(ValueError, match="no peft LoRA layers.*get_peft_model"):
        AdapterParams(model)
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        AdapterParams("not a model")


def test_flatten_unflatten_check_load():
    fn, _ = tiny_fn("bert")
    p = fn.params
    v = p.values()
    vec = p.flatten(v)
    assert vec.shape == (p.numel,)
    back = p.unflatten(vec)
    assert all(torch.equal(back[n], v[n]) for n in v)
    batched = p.unflatten(torch.stack([vec, 2 * vec]))
    assert all(torch.equal(batched[n][1], 2 * v[n]) for n in v)
    with pytest.raises(ValueError, match="missing"):
        p.check({k: t for k, t in list(v.items())[1:]})
    bad = dict(v)
    first = next(iter(bad))
    bad[first] = torch.zeros(3)
    with pytest.raises(ValueError, match="expected shape"):
        p.check(bad)
    p.load({k: torch.zeros_like(t) for k, t in v.items()})
    assert all(float(t.detach().abs().sum()) == 0 for t in p.tensors().values())
    p.load(v)
    assert all(torch.equal(p.tensors()[k], v[k]) for k in v)


def test_lora_tensors_selects_one_side():
    fn, _ = tiny_fn("bert")
    only_b = AdapterParams(fn.model, lora_tensors=["B"])
    assert {g.kind for g in only_b.groups} == {"lora_B", "head"}
    only_a = AdapterParams(fn.model, lora_tensors=("A",), include_head=False)
    assert {g.kind for g in only_a.groups} == {"lora_A"}
    both = AdapterParams(fn.model)
    assert set(both.names) == set(only_a.names) | set(only_b.names)
    for bad in ("B", [], ["C"]):
        with pytest.raises(ValueError, match="lora_tensors"):
            AdapterParams(fn.model, lora_tensors=bad)
