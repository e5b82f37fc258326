"""Answer-level uncertainty (bayeslora.answers) on a tiny causal LM: the candidate scores equal a naive
teacher-forced loop, identical draws give no uncertainty, and the metrics equal naive computations."""

import pytest
import torch
from lm_helpers import collate, copy_rows, randomize_lora_b, tiny_lm

from bayeslora.answers import (
    AnswerRecord,
    answer_metrics,
    answer_samples,
    normalize_answer,
    selective_aurc,
    sequence_logprobs,
)
from bayeslora.posteriors import make_posterior

EOS = 2


def decode(ids):
    return " ".join(f"t{i}" for i in ids if i != EOS)


def _prompts(n=4, seed=5):
    batch = collate([(p, []) for p, _ in copy_rows(n, seed=seed)], side="left")
    return batch["input_ids"], batch["attention_mask"]


def _members(fn, seeds):
    out = []
    for s in seeds:
        randomize_lora_b(fn, scale=0.8, seed=s)
        out.append(fn.params.values())
    return out


def test_normalize_answer():
    assert normalize_answer("  The Sun, (mostly)!  ") == "sun mostly"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("Photosynthesis.") == normalize_answer("photosynthesis")


def test_sequence_logprobs_equal_a_naive_teacher_forced_loop():
    fn = tiny_lm(seed=1)
    randomize_lora_b(fn, scale=0.5, seed=3)
    prompts, answers = [[5, 6, 7], [9, 4], [3, 3, 8, 11]], [[4, 2], [12, 13, 2], [7]]
    got = sequence_logprobs(fn, None, prompts, answers, chunk=2)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        ids = torch.tensor([p + a])
        with torch.no_grad():
            logits = fn.model(input_ids=ids).logits[0].double()
        naive = sum(torch.log_softmax(logits[len(p) - 1 + j], -1)[tok] for j, tok in enumerate(a))
        assert float(got[i]) == pytest.approx(float(naive), abs=1e-6)


def test_identical_draws_have_no_uncertainty_and_answer_as_the_map():
    fn = tiny_lm(seed=2)
    randomize_lora_b(fn, scale=0.8, seed=7)
    ens = make_posterior("ensemble", k=3)
    ens.load_state_dict({"members": [fn.params.values()] * 3})
    ids, mask = _prompts()
    records = answer_samples(ens, fn, ids, mask, decode, n_samples=3, max_new_tokens=4, eos_token_id=EOS)
    assert len(records) == ids.shape[0]
    for r in records:
        assert r.candidates == [r.map_answer] and r.votes.tolist() == [3]
        assert torch.allclose(r.probs, torch.ones(3, 1, dtype=torch.float64))
        assert r.vote_entropy == r.total_entropy == r.mutual_information == 0.0
        assert r.confidence == 1.0 and r.map_tokens >= 1 and r.map_logprob < 0


def test_draws_that_disagree_match_a_naive_per_member_computation():
    fn = tiny_lm(seed=3)
    members = _members(fn, [11, 12, 13, 14])
    randomize_lora_b(fn, scale=0.8, seed=10)  # the "MAP" the model holds
    map_values = fn.params.values()
    ens = make_posterior("ensemble", k=4)
    ens.load_state_dict({"members": members})
    ids, mask = _prompts(n=6)
    records = answer_samples(ens, fn, ids, mask, decode, n_samples=4, max_new_tokens=3, eos_token_id=EOS)

    def greedy(values, prompt):  # HF greedy decoding of one unpadded prompt under adapter values
        fn.params.load(values)
        with torch.no_grad():
            out = fn.model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=3, do_sample=False,
                                    eos_token_id=EOS, pad_token_id=0)[0, len(prompt):].tolist()  # fmt: skip
        return out[: out.index(EOS) + 1] if EOS in out else out

    assert any(len(r.candidates) > 1 for r in records)  # the members disagree somewhere
    for b, r in enumerate(records):
        prompt = ids[b][mask[b].bool()].tolist()
        answers = [greedy(v, prompt) for v in members]
        texts = [decode(a) for a in answers]
        assert sorted(set(texts)) == sorted(r.candidates)
        assert r.votes.tolist() == [texts.count(c) for c in r.candidates]
        cand = [answers[texts.index(c)] for c in r.candidates]
        for s, v in enumerate(members):
            fn.params.load(v)
            naive = sequence_logprobs(fn, None, [prompt] * len(cand), cand)
            assert torch.allclose(r.probs[s], torch.softmax(naive, -1), atol=1e-6)
        assert r.map_answer == decode(greedy(map_values, prompt))
        p = r.probs.mean(0)
        h = -(p * p.log()).sum()
        assert r.total_entropy == pytest.approx(float(h), abs=1e-9)
        assert r.mutual_information == pytest.approx(float(h + (r.probs * r.probs.log()).sum(-1).mean()), abs=1e-9)
    fn.params.load(map_values)


def test_a_method_without_weight_samples_is_refused():
    fn = tiny_lm(seed=0, dropout=0.1)
    post = make_posterior("mc_dropout").fit(fn)
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="draws no adapter values"):
        answer_samples(post, fn, ids, mask, decode)


def _record(answer, conf, mi, map_answer, map_conf):
    probs = torch.tensor([[conf, 1 - conf], [conf, 1 - conf]], dtype=torch.float64)
    probs[0] += torch.tensor([mi, -mi])
    probs[1] -= torch.tensor([mi, -mi])
    return AnswerRecord(
        [answer, "other"], torch.tensor([1, 1]), probs, map_answer, float(torch.tensor(map_conf).log()), 1
    )


def test_answer_metrics_equal_naive_computations():
    recs = [_record("Paris", 0.9, 0.0, "paris", 0.8), _record("x", 0.6, 0.3, "y", 0.5),
            _record("the Moon", 0.7, 0.05, "moon", 0.9), _record("z", 0.55, 0.2, "moon", 0.4)]  # fmt: skip
    gold = ["paris", "rome", "Moon", "moon"]
    m = answer_metrics(recs, gold)
    correct = [True, False, True, False]
    assert m["acc"] == 0.5 and m["map_acc"] == 0.75
    mi = [r.mutual_information for r in recs]
    pairs = [(mi[i] > mi[j]) + 0.5 * (mi[i] == mi[j]) for i in range(4) for j in range(4)
             if not correct[i] and correct[j]]  # fmt: skip
    assert m["err_auroc_mi"] == pytest.approx(sum(pairs) / len(pairs))
    conf = torch.tensor([r.confidence for r in recs], dtype=torch.float64)
    order = torch.argsort(conf, descending=True)
    risks = [sum(not correct[i] for i in order[: k + 1].tolist()) / (k + 1) for k in range(4)]
    assert m["aurc"] == pytest.approx(sum(risks) / 4)
    assert selective_aurc(torch.tensor([0.1, 0.9]), torch.tensor([False, True])) == pytest.approx(0.25)
    bins = torch.clamp((conf * 15).long(), max=14)
    naive_ece = sum(abs(float(conf[bins == k].mean()) - sum(c for c, b in zip(correct, bins) if b == k) /
                        int((bins == k).sum())) * int((bins == k).sum()) / 4 for k in bins.unique())  # fmt: skip
    assert m["ece"] == pytest.approx(naive_ece, abs=1e-6)
    with pytest.raises(ValueError, match="gold: expected one gold answer per record"):
        answer_metrics(recs, gold[:2])


def test_the_facade_gives_the_same_records_under_a_seed():
    from bayeslora import BayesianLoRA

    fn = tiny_lm(seed=4)
    randomize_lora_b(fn, scale=0.8, seed=2)
    bl = BayesianLoRA(fn.model, fn.readout, "kfac_laplace", fisher="mc", predictive="sampling", prior_fit="none",
                      prior_precision=5.0)  # fmt: skip
    from lm_helpers import loader

    bl.fit(loader(8))
    ids, mask = _prompts()

    def run():
        return bl.answer_uncertainty(ids, mask, decode=decode, n_samples=3, max_new_tokens=3,
                                     generator=torch.Generator().manual_seed(0))  # fmt: skip

    a, b = run(), run()
    assert [r.state_dict() for r in a] == [r.state_dict() for r in b]
    assert AnswerRecord.from_state_dict(a[0].state_dict()).state_dict() == a[0].state_dict()
    with pytest.raises(ValueError, match="tokenizer: expected"):
        bl.answer_uncertainty(ids, mask)
