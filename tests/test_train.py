import contextlib
from pathlib import Path

import pytest
import torch
from helpers import TokenDataset, linear_toy_fn, tiny_fn, token_batch
from torch.utils.data import DataLoader

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


def test_schedules_constant_and_cyclic():
    from bayeslora.train import TrainCallback

    class Lrs(TrainCallback):
        def __init__(self):
            self.lrs = []

        def on_step(self, state):
            self.lrs.append(state.lr)

    fn, _ = tiny_fn("bert")
    ds = TokenDataset(16, seed=1)
    for schedule, extra, want in (
        ("constant", {}, [1e-2] * 6),
        ("cyclic", {"cycle_steps": 3}, [1e-2, 1e-2 * 2 / 3, 1e-2 / 3] * 2),
    ):
        rec = Lrs()
        config = TrainConfig(lr=1e-2, max_steps=6, warmup_ratio=0.0, schedule=schedule, progress=False, **extra)
        train_map(fn, ds.loader(8), config, callbacks=[rec])
        assert rec.lrs == pytest.approx(want)
    with pytest.raises(ValueError, match="schedule: expected one of"):
        TrainConfig(schedule="cosine")
    with pytest.raises(ValueError, match="cycle_steps: required with schedule='cyclic'"):
        TrainConfig(schedule="cyclic")


def test_an_optimizer_factory_replaces_adamw():
    """SGD through the seam: one step moves the adapter by exactly -lr * grad (clip off, constant lr)."""
    from bayeslora.adapter_state import trainable_parameters

    fn = linear_toy_fn()  # no dropout: the gradient of train mode is the gradient here
    batch = token_batch(8)
    params = trainable_parameters(fn)
    loss = fn.likelihood.nll(fn(None, batch), fn.labels(batch))
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    before = {n: p.detach().clone() for n, p in params.items()}
    config = TrainConfig(lr=0.1, max_steps=1, warmup_ratio=0.0, clip=None, schedule="constant", progress=False)
    train_map(fn, DataLoader([batch], batch_size=None), config, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), before[n] - 0.1 * grads[n], rtol=1e-5, atol=1e-7)
    with pytest.raises(TypeError, match="optimizer: the factory returned"):
        train_map(fn, DataLoader([batch], batch_size=None), config, optimizer=lambda ps: ps)


class ShiftedSGD(torch.optim.SGD):
    """SGD whose gradients are taken at the weights + ``shift`` (a variational optimizer's ``sampled_params`` API)."""

    def __init__(self, params, lr, shift):
        super().__init__(params, lr=lr)
        self.shift, self.entered, self.read = shift, 0, []

    @contextlib.contextmanager
    def sampled_params(self, train=False):
        ps = [p for g in self.param_groups for p in g["params"]]
        self.entered += 1
        with torch.no_grad():
            for p in ps:
                p.add_(self.shift)
        yield
        with torch.no_grad():
            for p in ps:
                p.sub_(self.shift)
        self.read.append([p.grad.clone() for p in ps])


def test_a_sampling_optimizer_gets_gradients_at_its_sample_once_per_step():
    from bayeslora.adapter_state import trainable_parameters

    fn = linear_toy_fn()
    batches = [token_batch(4, seed=1), token_batch(4, seed=2)]
    params = trainable_parameters(fn)
    before = {n: p.detach().clone() for n, p in params.items()}
    shifted = {n: (v + 0.05).requires_grad_(True) for n, v in before.items()}
    total = sum(fn.likelihood.nll(fn(shifted, b), fn.labels(b)) for b in batches) / 2  # grad_accum=2: one step
    grads = dict(zip(params, torch.autograd.grad(total, list(shifted.values()))))
    made = []

    def factory(ps):
        made.append(ShiftedSGD(ps, lr=0.1, shift=0.05))
        return made[0]

    config = TrainConfig(lr=0.1, max_steps=1, grad_accum=2, warmup_ratio=0.0, clip=None, schedule="constant",
                         progress=False)  # fmt: skip
    train_map(fn, DataLoader(batches, batch_size=None), config, optimizer=factory)
    assert made[0].entered == 1 and len(made[0].read) == 1  # one sample for the step's two micro-batches
    for n, p in params.items():  # the mean moved by the gradient taken at the sample
        torch.testing.assert_close(p.detach(), before[n] - 0.1 * grads[n], rtol=1e-4, atol=1e-6)
