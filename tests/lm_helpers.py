"""A tiny causal LM (vocabulary of a few dozen tokens) with LoRA, and instruction-style token data: a prompt of
random tokens and a target that is a function of it, with labels masked on the prompt and the padding."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from bayeslora.function import AdapterFn
from bayeslora.models import LoraSpec, add_lora
from bayeslora.params import AdapterParams
from bayeslora.readout import TokenLogits

VOCAB = 24
PAD = 0
IGNORE = -100


def tiny_lm(vocab: int = VOCAB, seed: int = 0, dropout: float = 0.0, target_modules=None, include_head=False):
    """A 2-block LlamaForCausalLM with ``vocab`` tokens and LoRA (q/v, or ``target_modules``), as an AdapterFn."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).eval()
    spec = LoraSpec(r=2, alpha=4, dropout=dropout, target_modules=target_modules, seed=seed)
    peft_model = add_lora(model, spec, format="generative")
    return AdapterFn(peft_model, AdapterParams(peft_model, include_head=include_head), TokenLogits(vocab))


def randomize_lora_b(fn: AdapterFn, scale: float = 0.3, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in fn.params.tensors().items():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def copy_rows(n: int, seed: int = 0, vocab: int = VOCAB) -> list[tuple[list[int], list[int]]]:
    """(prompt, target) token lists: a prompt of 3-6 tokens in [3, vocab) and the target = its first 2-3 tokens."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(3, 7, (1,), generator=g))
        prompt = torch.randint(3, vocab, (length,), generator=g).tolist()
        rows.append((prompt, prompt[: int(torch.randint(2, 4, (1,), generator=g))]))
    return rows


def collate(rows, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad prompt + target; labels are the ids on target tokens and IGNORE on the prompt and padding."""
    length = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for i, (p, t) in enumerate(rows):
        n = len(p) + len(t)
        sl = slice(length - n, length) if side == "left" else slice(0, n)
        ids[i, sl] = torch.tensor(p + t)
        mask[i, sl] = 1
        labels[i, sl] = torch.tensor([IGNORE] * len(p) + t)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loader(n: int = 12, batch_size: int = 4, seed: int = 0, side: str = "right") -> DataLoader:
    return DataLoader(copy_rows(n, seed), batch_size=batch_size, collate_fn=lambda r: collate(r, side))
