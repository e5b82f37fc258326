"""Turn normalised records into model inputs for the two formats.

* ``seq_cls`` (encoder + classification head): ``(text, text_pair)``. A multiple-choice item becomes
  ``(question, "A. opt1 B. opt2 ...")`` and its C classes are the option positions.
* ``mc`` (causal LM, next token; the Laplace-LoRA protocol, Yang et al. 2024): a prompt listing lettered options
  and ending in ``"Answer:"``; the class logits are those of the answer letters (``" A"``, ``" B"``, ...) at the
  last position. Classification tasks list their option words (e.g. ``A. negative`` / ``B. positive``)::

      Question: Which factor will most likely cause a person to develop a fever?
      A. a leg muscle relaxing after exercise
      B. a bacterial population in the bloodstream
      ...
      Answer:
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import MappingProxyType

from .normalize import Record

LETTERS = tuple(chr(ord("A") + i) for i in range(26))
ANSWER_CUE = "Answer:"


def letters(num_classes: int) -> list[str]:
    """The first ``num_classes`` answer letters ``["A", "B", ...]``.

    Raises:
        ValueError: more classes than letters.
    """
    if not 2 <= num_classes <= len(LETTERS):
        raise ValueError(
            f"num_classes: the mc format letters its options A-Z, so it supports 2 to {len(LETTERS)} classes; got "
            f"{num_classes}. Use format='seq_cls' for more classes."
        )
    return list(LETTERS[:num_classes])


def seq_cls_texts(record: Record) -> tuple[str, str | None]:
    """``(text, text_pair)`` for a sequence-classification model.

    A multiple-choice record gives ``(question [+ " " + text_pair], "A. opt1 B. opt2 ...")``.
    """
    if record["choices"] is None:
        return record["text"], record["text_pair"]
    first = record["text"] if record["text_pair"] is None else f"{record['text']} {record['text_pair']}"
    return first, " ".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(record["choices"]))


def _capitalized_question(text: str) -> str:
    text = text[:1].upper() + text[1:]
    return text if text.endswith("?") else text + "?"


def _sentiment(r: Record) -> str:
    return f"Review: {r['text']}\nWhat is the sentiment of the review?"


def _entailment(r: Record) -> str:
    return f"Premise: {r['text']}\nHypothesis: {r['text_pair']}\nDoes the premise entail the hypothesis?"


def _boolq(r: Record) -> str:
    return f"Passage: {r['text_pair']}\nQuestion: {_capitalized_question(r['text'])}"


def _winogrande(r: Record) -> str:
    return f"Sentence: {r['text']}\nWhich option fills the blank (_)?"


def _question(r: Record) -> str:
    return f"Question: {r['text']}"


def _generic(r: Record) -> str:
    return r["text"] if r["text_pair"] is None else f"{r['text']}\n{r['text_pair']}"


TEMPLATES: MappingProxyType[str, Callable[[Record], str]] = MappingProxyType(
    {
        "sentiment": _sentiment,
        "entailment": _entailment,
        "boolq": _boolq,
        "winogrande": _winogrande,
        "question": _question,
        "generic": _generic,
    }
)


def mc_prompt(record: Record, template: str, option_words: Sequence[str] | None = None) -> str:
    """The next-token prompt of a record, ending in ``"Answer:"``.

    Args:
        record: a normalised record.
        template: a key of :data:`TEMPLATES`.
        option_words: the options of a classification task (one per class, in label order); ``None`` uses the
            record's ``choices``.

    Raises:
        ValueError: unknown template, or neither options nor choices.
    """
    if template not in TEMPLATES:
        raise ValueError(f"template: expected one of {sorted(TEMPLATES)}, got {template!r}.")
    options = record["choices"] if record["choices"] is not None else option_words
    if not options:
        raise ValueError("option_words: a record without choices needs the task's option words; got none.")
    block = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"{TEMPLATES[template](record)}\n{block}\n{ANSWER_CUE}"
