"""Interop with the Hugging Face ``Trainer``: fit a posterior at the end of training, evaluate it on the eval set.

Recipe::

    from bayeslora.hf_trainer import BayesianLoRACallback

    callback = BayesianLoRACallback(readout=SequenceClassificationLogits(2), method="kfac_laplace")
    trainer = Trainer(model=peft_model, args=args, train_dataset=train, eval_dataset=val, callbacks=[callback])
    trainer.train()
    callback.bl.predict(batch)        # the fitted BayesianLoRA; callback.metrics: its metrics on the eval set

or, after any ``trainer.train()``: ``bl = BayesianLoRA.from_trainer(trainer, readout, "kfac_laplace")``.
The trainer's own dataloaders (its collator, batch size and device placement) feed the posterior fit.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from .readout import Readout


class BayesianLoRACallback(TrainerCallback):
    """At ``on_train_end``: fit ``method`` around the trained adapter on the trainer's training loader, and, when the
    trainer evaluated during training (``eval_strategy``), evaluate it on the eval loader (``self.metrics``; else
    None). The fitted :class:`~bayeslora.wrapper.BayesianLoRA` is ``self.bl``."""

    def __init__(self, readout: Readout, method: str = "kfac_laplace", **options: Any):
        self.readout, self.method, self.options = readout, method, options
        self.bl = None
        self.metrics: dict[str, float] | None = None

    def on_train_end(self, args, state, control, model=None, train_dataloader=None, eval_dataloader=None, **kw):
        from .wrapper import BayesianLoRA

        if model is None or train_dataloader is None:
            raise ValueError("model / train_dataloader: the Trainer passed none to on_train_end; use from_trainer.")
        self.bl = BayesianLoRA(model, self.readout, self.method, **self.options)
        val = eval_dataloader if self.bl.posterior.needs.validation else None
        self.bl.fit(train_dataloader, val_loader=val)
        if eval_dataloader is not None:
            self.metrics = self.bl.evaluate(eval_dataloader)
        return control
