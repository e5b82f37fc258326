from pathlib import Path

import pytest
import torch
from helpers import TokenDataset, tiny_fn

from bayeslora.adapter_state import list_checkpoints, load_checkpoint
from bayeslora.function import model_mode
from bayeslora.metrics import accuracy
from bayeslora.train import TrainConfig, train_map


def _acc(fn, loader):
    with torch.no_grad(), model_mode(fn.model, False):
        logits = torch.cat([fn(None, b) for b in loader])
    labels = torch.cat([b["labels"] for b in loader])
    return accuracy(torch.log_softmax(logits.double(), -1), labels)


def test_train_map_learns_a_synthetic_task():
    fn, _ = tiny_fn("bert", r=4)
    ds = TokenDataset(256, length=10, num_classes=2, vocab=20, seed=1)
    before = _acc(fn, ds.loader(64))
    res = train_map(fn, ds.loader(16, shuffle=True), TrainConfig(lr=2e-2, epochs=25, progress=False))
    after = _acc(fn, ds.loader(64))
    assert res.steps == 25 * 16 and len(res.losses) == res.steps
    assert sum(res.losses[-16:]) / 16 < 0.8 * sum(res.losses[:16]) / 16
    assert after > max(before, 0.75)


def test_train_map_is_seeded_and_leaves_global_rng_alone():
    ds = TokenDataset(64, seed=2)
    outs = []
    for seed in (0, 0, 1):
        fn, _ = tiny_fn("bert", dropout=0.2)
        state = torch.get_rng_state()
        train_map(fn, ds.loader(8, shuffle=True), TrainConfig(lr=1e-2, max_steps=6, seed=seed, progress=False))
        assert torch.equal(state, torch.get_rng_state())
        outs.append(fn.params.flatten(fn.params.values()))
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])


def test_grad_accumulation_matches_a_larger_batch():
    ds = TokenDataset(32, seed=3)
    results = []
    for bs, accum in ((8, 1), (4, 2)):
        fn, _ = tiny_fn("bert", dropout=0.0)
        train_map(fn, ds.loader(bs), TrainConfig(lr=1e-2, max_steps=4, grad_accum=accum, progress=False))
        results.append(fn.params.flatten(fn.params.values()))
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-4)


def test_prior_precision_shrinks_the_adapter():
    ds = TokenDataset(32, seed=4)
    norms = []
    for lam in (0.0, 1e4):
        fn, _ = tiny_fn("bert")
        train_map(fn, ds.loader(8), TrainConfig(lr=1e-2, max_steps=20, prior_precision=lam, progress=False))
        norms.append(fn.params.flatten(fn.params.values()).norm().item())
    assert norms[1] < 0.7 * norms[0]


def test_checkpoints_are_written_and_loadable(tmp_path):
    fn, _ = tiny_fn("bert")
    ds = TokenDataset(32, seed=5)
    res = train_map(
        fn,
        ds.loader(8),
        TrainConfig(lr=1e-2, max_steps=6, checkpoint_every=2, checkpoint_dir=str(tmp_path), progress=False),
    )
    files = list_checkpoints(tmp_path)
    assert [f.name for f in files] == ["step_0000002.pt", "step_0000004.pt", "step_0000006.pt"]
    assert res.checkpoints == [str(f) for f in files]
    last = load_checkpoint(files[-1])
    assert all(torch.equal(last[k], v) for k, v in fn.params.values().items())
    assert not list(tmp_path.glob("*.tmp"))


def test_nan_loss_names_the_step():
    fn, _ = tiny_fn("bert")
    with torch.no_grad():
        next(iter(fn.params.tensors().values())).fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite training loss .* at optimizer step 0"):
        train_map(fn, TokenDataset(16).loader(8), TrainConfig(max_steps=2, progress=False))


def test_bad_config_and_empty_data():
    with pytest.raises(ValueError, match="lr: expected a positive number"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="checkpoint_dir: required"):
        TrainConfig(checkpoint_every=5)
    with pytest.raises(ValueError, match="warmup_ratio"):
        TrainConfig(warmup_ratio=1.5)
    fn, _ = tiny_fn("bert")
    with pytest.raises(ValueError, match="training dataset is empty"):
        train_map(fn, TokenDataset(0).loader(4), TrainConfig(max_steps=1, progress=False))


def test_callbacks_see_every_step_and_epoch(tmp_path):
    from bayeslora.train import TrainCallback

    class Recorder(TrainCallback):
        def __init__(self):
            self.steps, self.epochs, self.lrs, self.snap = [], [], [], []

        def on_step(self, state):
            self.steps.append((state.step, state.epoch, state.loss))
            self.lrs.append(state.lr)
            self.snap.append({k: v.clone() for k, v in state.fn.params.values().items()})

        def on_epoch_end(self, state):
            self.epochs.append((state.step, state.epoch))

    fn, _ = tiny_fn("bert")
    ds = TokenDataset(24, seed=1)
    rec = Recorder()
    config = TrainConfig(lr=1e-2, epochs=2, warmup_ratio=0.0, progress=False, checkpoint_every=2,
                         checkpoint_dir=str(tmp_path))  # fmt: skip
    result = train_map(fn, ds.loader(8), config, callbacks=[rec])
    assert [s for s, _, _ in rec.steps] == list(range(1, 7)) and [e for _, e, _ in rec.steps] == [0, 0, 0, 1, 1, 1]
    assert [loss for _, _, loss in rec.steps] == result.losses
    assert rec.epochs == [(3, 1), (6, 2)]
    assert rec.lrs[0] == pytest.approx(1e-2) and rec.lrs[-1] < rec.lrs[0]  # linear decay
    final = fn.params.values()
    assert all(torch.equal(rec.snap[-1][k], final[k]) for k in final)  # the values after the step
    assert [Path(p).name for p in result.checkpoints] == ["step_0000002.pt", "step_0000004.pt", "step_0000006.pt"]
    for path, snap in zip(result.checkpoints, rec.snap[1::2]):  # the checkpointer is a callback like any other
        saved = torch.load(path, weights_only=True)["values"]
        assert all(torch.equal(saved[k], snap[k].cpu()) for k in saved)
