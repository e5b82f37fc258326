import torch
from helpers import TokenDataset, randomize_lora_b, tiny_fn

from bayeslora.function import lora_dropout_only, model_mode


def test_functional_values_match_live_and_leave_model_untouched():
    fn, _ = tiny_fn("llama", num_classes=3)
    randomize_lora_b(fn)
    batch = TokenDataset(4, left_pad=True).collate(TokenDataset(4, left_pad=True).items)
    with torch.no_grad():
        live = fn(None, batch)
        same = fn(fn.params.values(), batch)
        before = fn.params.values()
        other = {k: v * 3 for k, v in before.items()}
        changed = fn(other, batch)
    torch.testing.assert_close(live, same)
    assert not torch.allclose(live, changed)
    assert all(torch.equal(before[k], v) for k, v in fn.params.values().items())


def test_gradients_flow_through_values():
    fn, _ = tiny_fn("bert")
    randomize_lora_b(fn)
    batch = TokenDataset(4).collate(TokenDataset(4).items)
    values = {k: v.requires_grad_(True) for k, v in fn.params.values().items()}
    fn(values, batch).sum().backward()
    assert all(v.grad is not None for v in values.values())
    assert all(p.grad is None for p in fn.params.tensors().values())


def test_mode_context_managers_restore():
    fn, _ = tiny_fn("bert", dropout=0.5)
    fn.model.eval()
    with model_mode(fn.model, True):
        assert fn.model.training
    assert not any(m.training for m in fn.model.modules())
    with lora_dropout_only(fn.model):
        on = [n for n, m in fn.model.named_modules() if m.training]
        assert on and all("lora_dropout" in n for n in on)
    assert not any(m.training for m in fn.model.modules())
