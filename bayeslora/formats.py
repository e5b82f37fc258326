"""The two task formats, defined once.

* ``seq_cls``: an encoder (or any model) with a sequence-classification head; batches pad on the right.
* ``mc``: a causal LM scored on the next token after the prompt (the answer letters); batches pad on the left,
  so the answer position is the last column.
* ``generative``: a causal LM scored on free-text target tokens (prompt + target, labels ``[B, T]`` masked on the
  prompt and padding); training and scoring batches pad on the right (the targets end each row), generation pads
  the prompts on the left (:data:`GENERATION_PADDING_SIDE`: every row's next token is the last column).
"""

FORMATS = ("seq_cls", "mc", "generative")
PADDING_SIDE = {"seq_cls": "right", "mc": "left", "generative": "right"}
GENERATION_PADDING_SIDE = "left"
