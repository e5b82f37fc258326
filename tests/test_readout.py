import pytest
import torch
from helpers import TokenDataset, randomize_lora_b, tiny_fn

from bayeslora.readout import (
    AnswerTokenLogits,
    SequenceClassificationLogits,
    causal_position_ids,
    last_token_index,
    readout_from_config,
)


def test_last_token_index_left_and_right():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 3, 0]
    assert last_token_index(left).tolist() == [3, 3, 3]
    assert causal_position_ids(left)[0].tolist() == [0, 0, 1, 2]


def _batches(pad_id):
    ds_right = TokenDataset(6, length=10, pad_id=pad_id, seed=3)
    ds_left = TokenDataset(6, length=10, pad_id=pad_id, seed=3, left_pad=True)
    return ds_right.collate(ds_right.items), ds_left.collate(ds_left.items), ds_right.items


def test_left_and_right_padding_give_identical_answer_logits():
    fn, tok = tiny_fn("llama", num_classes=4)
    randomize_lora_b(fn)
    right, left, items = _batches(tok.pad_token_id)
    assert not bool(right["attention_mask"][:, -1].all()) and bool(left["attention_mask"][:, -1].all())
    with torch.no_grad():
        a, b = fn(None, right), fn(None, left)
        # reference: each sequence alone, unpadded, full logits at its last position
        ids = torch.tensor(fn.readout.token_ids)
        ref = torch.stack([fn.model(input_ids=x[None]).logits[0, -1, ids] for x, _ in items])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, ref, atol=1e-5, rtol=1e-5)
    assert a.shape == (6, 4) and a.dtype == torch.float32


def test_answer_tokens_must_be_single_tokens(minilm_tokenizer):
    r = AnswerTokenLogits.from_tokenizer(minilm_tokenizer, ["A", "B", "C"])
    assert r.num_classes == 3 and len(set(r.token_ids)) == 3
    with pytest.raises(ValueError, match=r"answers: ' photosynthesis' is \d+ tokens.*exactly one"):
        AnswerTokenLogits.from_tokenizer(minilm_tokenizer, ["A", "photosynthesis"])
    with pytest.raises(ValueError, match="repeated token ids"):
        AnswerTokenLogits.from_tokenizer(minilm_tokenizer, ["A", "a"])  # uncased tokenizer


def test_sequence_classification_readout_checks_shape():
    fn, _ = tiny_fn("bert", num_classes=3)
    batch = TokenDataset(4).collate(TokenDataset(4).items)
    assert fn(None, batch).shape == (4, 3)
    wrong = SequenceClassificationLogits(5)
    out = fn.model(**wrong.model_inputs(batch))
    with pytest.raises(ValueError, match="num_labels=5"):
        wrong(out, batch)
    with pytest.raises(ValueError, match="'input_ids'"):
        wrong.model_inputs({"labels": torch.zeros(2)})


def test_readout_config_round_trip():
    for r in (SequenceClassificationLogits(4), AnswerTokenLogits([5, 7, 9], answers=["A", "B", "C"])):
        back = readout_from_config(r.config())
        assert type(back) is type(r) and back.config() == r.config()
    with pytest.raises(ValueError, match="unknown type"):
        readout_from_config({"type": "x"})
