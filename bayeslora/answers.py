"""Answer-level uncertainty for free-form QA: S posterior draws each answer greedily; how sure is the model?

For a batch of prompts and a posterior with weight samples (Laplace, VI, ensembles, SWAG, IVON, TFB, the MAP), each of
S draws θ_s decodes one answer greedily (so the answers differ only through the posterior). Answers are grouped by
their normalised text (:func:`normalize_answer`): the distinct groups of an example are its candidates ``a_1..a_K``
(each represented by the tokens of its first occurrence). Every draw then scores every candidate by teacher forcing,
``log p_s(a_k) = log p(a_k | prompt, θ_s)`` (the sum over its tokens, EOS included when it was generated), and
``p_s(k) = softmax_k log p_s(a_k)`` is draw s's distribution over the candidates. From these:

* ``vote_entropy``: the entropy of the empirical distribution of the S answers over the groups (how often each
  group was decoded);
* ``total_entropy`` H[p̄] with p̄ = mean_s p_s, ``aleatoric`` mean_s H[p_s] and ``mutual_information``
  H[p̄] − mean_s H[p_s] (the epistemic part: disagreement between draws);
* the answer: argmax_k p̄(k), and its ``confidence`` p̄(answer);
* the MAP's own greedy answer (the adapter the model holds) and its ``map_logprob`` (summed over its tokens) and
  ``map_tokens``; ``exp(map_logprob / map_tokens)`` is the MAP's length-normalised confidence.

The candidate set is the set the draws decoded, so p̄ is a distribution over plausible answers, not over all strings;
with one candidate every entropy is 0. Correctness (:func:`answer_metrics`) is normalised exact match with the gold
answer text; uncertainty scores are ranked against errors (AUROC: 1 when every wrong answer is more uncertain than
every right one), AURC is the area under the selective risk–coverage curve, ECE the binary calibration error of the
confidence (15 equal-width bins).
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchmetrics.functional.classification import binary_auroc, binary_calibration_error

from .data.collate import IGNORE_INDEX, PadCollator
from .function import AdapterFn, model_mode
from .generation import loaded_values
from .metrics import ECE_BINS, selective_risk
from .posteriors import has_weight_samples
from .rng import forked, seed_from
from .validate import positive_int

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and the articles a / an / the removed, whitespace collapsed (the SQuAD normalisation)."""
    text = _ARTICLES.sub(" ", str(text).lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)


@dataclass
class AnswerRecord:
    """One example's answers under S draws (module docstring).

    Attributes:
        candidates: the distinct answers (the first decoded text of each normalised group), in order of appearance.
        votes: how many of the S draws decoded each candidate ``[K]``.
        probs: ``p_s(k)`` per draw ``[S, K]`` (float64).
        map_answer: the MAP's greedy answer; map_logprob / map_tokens: its summed log-probability and token count.
    """

    candidates: list[str]
    votes: torch.Tensor
    probs: torch.Tensor
    map_answer: str
    map_logprob: float
    map_tokens: int

    @property
    def predictive(self) -> torch.Tensor:
        return self.probs.mean(0)

    @property
    def answer(self) -> str:
        return self.candidates[int(torch.argmax(self.predictive))]

    @property
    def confidence(self) -> float:
        return float(self.predictive.max())

    @property
    def vote_entropy(self) -> float:
        return float(_entropy(self.votes.double() / self.votes.sum()))

    @property
    def total_entropy(self) -> float:
        return float(_entropy(self.predictive))

    @property
    def aleatoric(self) -> float:
        return float(_entropy(self.probs).mean())

    @property
    def mutual_information(self) -> float:
        return max(self.total_entropy - self.aleatoric, 0.0)

    @property
    def map_confidence(self) -> float:
        """The MAP's length-normalised sequence probability ``exp(map_logprob / map_tokens)``."""
        return float(torch.tensor(self.map_logprob / max(self.map_tokens, 1)).exp())

    def state_dict(self) -> dict[str, Any]:
        return {
            "candidates": list(self.candidates),
            "votes": self.votes.tolist(),
            "probs": self.probs.tolist(),
            "map_answer": self.map_answer,
            "map_logprob": self.map_logprob,
            "map_tokens": self.map_tokens,
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> AnswerRecord:
        return cls(list(state["candidates"]), torch.tensor(state["votes"]),
                   torch.tensor(state["probs"], dtype=torch.float64), str(state["map_answer"]),
                   float(state["map_logprob"]), int(state["map_tokens"]))  # fmt: skip


def _continuations(out: torch.Tensor, prompt_len: int, eos: int | None, pad: int) -> list[list[int]]:
    """The generated tokens of each row, cut after the first EOS (kept) and without padding."""
    rows = []
    for row in out[:, prompt_len:].tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        while row and row[-1] == pad and row[-1] != eos:
            row.pop()
        rows.append(row)
    return rows


def sequence_logprobs(fn: AdapterFn, values, prompts: Sequence[list[int]], answers: Sequence[list[int]], *,
                      chunk: int = 8) -> torch.Tensor:  # fmt: skip
    """``log p(answer_i | prompt_i)`` under adapter ``values`` (None: the model's own), summed over the answer's
    tokens, by teacher forcing in right-padded chunks of ``chunk`` rows (float64 ``[N]``)."""
    out = torch.zeros(len(prompts), dtype=torch.float64)
    collate = PadCollator(0, "right")  # labels are padded with the ignore index: padding is not scored
    for start in range(0, len(prompts), chunk):
        pairs = zip(prompts[start : start + chunk], answers[start : start + chunk])
        rows = [{"input_ids": [*p, *a], "attention_mask": [1] * (len(p) + len(a)),
                 "labels": [IGNORE_INDEX] * len(p) + list(a)} for p, a in pairs]  # fmt: skip
        batch = fn.to_device(collate(rows))
        with torch.no_grad(), model_mode(fn.model, False):
            logits = fn(values, batch).double()  # [n, T, V]: position t predicts token t + 1
        out[start : start + len(rows)] = fn.likelihood.token_log_probs(logits, batch["labels"]).sum(-1).cpu()
    return out


def answer_samples(
    posterior: Any,
    fn: AdapterFn,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    decode: Callable[[list[int]], str],
    *,
    n_samples: int = 8,
    max_new_tokens: int = 16,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    generator: torch.Generator | None = None,
) -> list[AnswerRecord]:
    """One :class:`AnswerRecord` per prompt of the left-padded batch (module docstring).

    Args:
        posterior: a fitted posterior with ``sample_values`` (Laplace, VI, ensembles, SWAG, IVON, TFB, MAP).
        fn: its AdapterFn (a causal LM with the token-level readout); the model holds the MAP adapter.
        input_ids, attention_mask: prompts ``[B, L]``, padded on the left.
        decode: token ids -> text (e.g. ``lambda ids: tokenizer.decode(ids, skip_special_tokens=True)``).
        n_samples: S posterior draws.
        max_new_tokens: the longest answer; eos_token_id ends one early.
        generator: draws the adapter values (a seed reproduces the records).
    """
    positive_int("n_samples", n_samples)
    if not has_weight_samples(posterior):
        raise ValueError(
            f"method: {getattr(posterior, 'name', type(posterior).__name__)!r} draws no adapter values, so its draws "
            "cannot score the candidate answers; use the MAP, a Laplace method, VI, an ensemble, SWAG, IVON or TFB."
        )
    if attention_mask.shape != input_ids.shape or bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("attention_mask: expected prompts [B, L] padded on the left (every row ends in a token).")
    device = fn.device
    batch = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    prompts = [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask)]
    options = dict(max_new_tokens=int(max_new_tokens), do_sample=False, pad_token_id=int(pad_token_id),
                   eos_token_id=eos_token_id)  # fmt: skip

    def greedy(values) -> list[list[int]]:
        context = loaded_values(fn.model, values) if values is not None else torch.no_grad()
        with context, model_mode(fn.model, False), torch.no_grad(), fn._autocast():
            out = fn.model.generate(**batch, **options)
        return _continuations(out.cpu(), input_ids.shape[1], eos_token_id, int(pad_token_id))

    draws = posterior.sample_values(fn, {**batch, "labels": batch["input_ids"]}, n_samples, generator)
    seeds = [seed_from(generator) for _ in draws]
    decoded = []
    for values, seed in zip(draws, seeds):
        with forked(device, seed):
            decoded.append(greedy(values))  # [S][B] token lists
    map_answers = greedy(None)
    map_lp = sequence_logprobs(fn, None, prompts, map_answers)

    groups: list[dict[str, int]] = [{} for _ in prompts]
    cand_tokens: list[list[list[int]]] = [[] for _ in prompts]
    cand_text: list[list[str]] = [[] for _ in prompts]
    votes: list[list[int]] = [[] for _ in prompts]
    for per_draw in decoded:
        for b, tokens in enumerate(per_draw):
            text = decode(tokens)
            key = normalize_answer(text)
            if key not in groups[b]:
                groups[b][key] = len(cand_text[b])
                cand_tokens[b].append(tokens)
                cand_text[b].append(text)
                votes[b].append(0)
            votes[b][groups[b][key]] += 1
    pairs = [(b, k) for b in range(len(prompts)) for k in range(len(cand_tokens[b]))]
    scores = torch.stack(
        [
            sequence_logprobs(fn, values, [prompts[b] for b, _ in pairs], [cand_tokens[b][k] for b, k in pairs])
            for values in draws
        ]
    )  # [S, pairs] fmt: skip
    records, at = [], 0
    for b in range(len(prompts)):
        k = len(cand_tokens[b])
        probs = torch.softmax(scores[:, at : at + k], -1)
        at += k
        records.append(AnswerRecord(cand_text[b], torch.tensor(votes[b]), probs, decode(map_answers[b]),
                                    float(map_lp[b]), len(map_answers[b])))  # fmt: skip
    return records


def selective_aurc(confidence: torch.Tensor, correct: torch.Tensor) -> float:
    """Area under the risk–coverage curve keeping the most confident first (lower is better)."""
    return float(selective_risk(confidence, ~correct.bool())[1].mean())


def _auroc_of_errors(uncertainty: torch.Tensor, correct: torch.Tensor) -> float | None:
    wrong = (~correct.bool()).long()
    if wrong.min() == wrong.max():  # all right or all wrong: no ranking to score
        return None
    return float(binary_auroc(uncertainty.double(), wrong))


def answer_metrics(records: Sequence[AnswerRecord], gold: Sequence[str], n_bins: int = ECE_BINS) -> dict[str, Any]:
    """Accuracy (normalised exact match) of the posterior's answer and of the MAP's; how well each uncertainty
    predicts an error (``err_auroc_*``: vote entropy, predictive entropy, MI, and the MAP's length-normalised
    likelihood for the MAP's answer; None when every answer is right or every one wrong); AURC and ECE of the
    posterior's confidence p̄(answer) and of the MAP's (``map_*``); ``n`` the number of answers."""
    if len(records) != len(gold) or not records:
        raise ValueError(f"gold: expected one gold answer per record ({len(records)}), got {len(gold)}.")
    truth = [normalize_answer(g) for g in gold]
    correct = torch.tensor([normalize_answer(r.answer) == t for r, t in zip(records, truth)])
    map_correct = torch.tensor([normalize_answer(r.map_answer) == t for r, t in zip(records, truth)])
    conf = torch.tensor([r.confidence for r in records], dtype=torch.float64)
    map_conf = torch.tensor([r.map_confidence for r in records], dtype=torch.float64)

    def scores(attr: str) -> torch.Tensor:
        return torch.tensor([getattr(r, attr) for r in records], dtype=torch.float64)

    return {
        "acc": float(correct.double().mean()),
        "map_acc": float(map_correct.double().mean()),
        "err_auroc_votes": _auroc_of_errors(scores("vote_entropy"), correct),
        "err_auroc_entropy": _auroc_of_errors(scores("total_entropy"), correct),
        "err_auroc_mi": _auroc_of_errors(scores("mutual_information"), correct),
        "err_auroc_map": _auroc_of_errors(-map_conf, map_correct),
        "aurc": selective_aurc(conf, correct),
        "map_aurc": selective_aurc(map_conf, map_correct),
        "ece": float(binary_calibration_error(conf.float(), correct.long(), n_bins=n_bins, norm="l1")),
        "map_ece": float(binary_calibration_error(map_conf.float(), map_correct.long(), n_bins=n_bins, norm="l1")),
        "n": len(records),
    }
