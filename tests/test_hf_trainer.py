"""The Hugging Face Trainer: an adapter trained by it gets a posterior, by callback or by from_trainer."""

import torch
from helpers import TokenDataset, tiny_fn

from bayeslora import BayesianLoRA, SequenceClassificationLogits
from bayeslora.hf_trainer import BayesianLoRACallback


def _trainer(tmp_path, fn, ds, callbacks=()):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=8, per_device_eval_batch_size=8,
        learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
        remove_unused_columns=False, disable_tqdm=True, eval_strategy="steps", eval_steps=3,
    )  # fmt: skip
    return Trainer(model=fn.model, args=args, train_dataset=ds, eval_dataset=ds, data_collator=ds.collate,
                   callbacks=list(callbacks))  # fmt: skip


def test_a_trainer_callback_fits_the_posterior_and_from_trainer_agrees(tmp_path):
    fn, _ = tiny_fn("bert", r=2)
    ds = TokenDataset(24, seed=11)
    before = {k: v.clone() for k, v in fn.params.values().items()}
    callback = BayesianLoRACallback(SequenceClassificationLogits(2), "kfac_laplace", prior_fit="none")
    trainer = _trainer(tmp_path, fn, ds, [callback])
    trainer.train()
    after = fn.params.values()
    assert any(not torch.equal(before[k], after[k]) for k in after)  # the Trainer trained the adapter
    assert callback.bl is not None and set(callback.metrics) == {"acc", "ece", "nll", "brier", "aurc"}
    again = BayesianLoRA.from_trainer(trainer, SequenceClassificationLogits(2), "kfac_laplace", prior_fit="none")
    batch = next(iter(ds.loader(8)))
    torch.testing.assert_close(again.predict(batch).logits, callback.bl.predict(batch).logits)
