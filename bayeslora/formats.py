"""The two task formats, defined once.

* ``seq_cls``: an encoder (or any model) with a sequence-classification head; batches pad on the right.
* ``mc``: a causal LM scored on the next token after the prompt (the answer letters); batches pad on the left,
  so the answer position is the last column.
"""

FORMATS = ("seq_cls", "mc")
PADDING_SIDE = {"seq_cls": "right", "mc": "left"}
