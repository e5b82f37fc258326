"""Data parallelism: two gloo processes (torch.multiprocessing.spawn; joined through the torchrun
environment variables on 127.0.0.1) must reproduce a single-process run — MAP training with the 2× batch,
sums over the data, gathered predictions and the K-FAC Laplace fit."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import TokenDataset, tiny_fn

from bayeslora import distributed
from bayeslora.metrics import predict_loader
from bayeslora.posteriors import make_posterior
from bayeslora.posteriors.lowrank import FrequentDirections
from bayeslora.train import TrainConfig, train_map

WORLD = 2
N_TRAIN, N_EVAL = 36, 13  # 36 = 4 full global batches of 8 + one of 4 (split 2/2); 13 is uneven over 2 ranks
TRAIN = dict(lr=1e-2, epochs=2, prior_precision=1.0, seed=3, progress=False)


class _Side:
    def __init__(self, dim: int, sketch_size: int):
        self.sketch = FrequentDirections(dim, sketch_size)


class _Acc:
    """A stand-in accumulator: a dense sum, a sketched side, and a non-float tensor that is not a sum."""

    def __init__(self, dim: int):
        self.total = torch.zeros(dim, dim, dtype=torch.float64)
        self.side = _Side(dim, sketch_size=8)
        self.steps = torch.zeros((), dtype=torch.long)

    def add(self, rows: torch.Tensor) -> None:
        self.total += rows.T @ rows
        self.side.sketch.add(rows.T)
        self.steps += 1


def _rows(n: int = 21, dim: int = 12, span: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn(n, span, generator=g, dtype=torch.float64) @ torch.randn(span, dim, generator=g).double()


def _stat(loader) -> torch.Tensor:
    """A per-example statistic summed over the data ``[1]`` (float64)."""
    total = torch.zeros(1, dtype=torch.float64)
    for b in loader:
        total += b["input_ids"].double().sum(1) @ b["labels"].double()
    return total


def _laplace():
    return make_posterior("kfac_laplace", prior_fit="marglik", rank=None)


def _kron_state(posterior) -> list[torch.Tensor]:
    """Reconstructed Kronecker factors G and A of every layer (basis-independent)."""
    out = []
    for f in posterior.engine.factors:
        for vals, vecs in ((f.g_vals, f.g_vecs), (f.a_vals, f.a_vecs)):
            out.append((vecs.double() * vals) @ vecs.double().T)
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": WORLD, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    os.environ.update({k: str(v) for k, v in env.items()})  # what torchrun / accelerate launch set
    current = distributed.init_from_env(backend="gloo")
    try:
        out = {"world": (current.rank, current.size, dist.get_backend())}
        # MAP training: per-rank batch 4 on 2 ranks == one process with batch 8.
        fn, _ = tiny_fn("bert", dropout=0.0)
        train = TokenDataset(N_TRAIN, seed=11)
        res = train_map(fn, distributed.shard(train.loader(4, shuffle=True)), TrainConfig(**TRAIN))
        out["adapter"] = fn.params.flatten(fn.params.values())
        out["losses"] = torch.tensor(res.losses)
        # A sum over the data (every example once, uneven shards).
        ev = TokenDataset(N_EVAL, seed=12)
        out["stat"] = distributed.all_reduce_sum_([_stat(distributed.shard(ev.loader(3), even=False))])[0]
        out["scalars"] = torch.tensor(distributed.all_reduce_scalars(float(rank + 1), 2.0), dtype=torch.float64)
        # Predictions gathered in dataset order.
        preds = predict_loader(make_posterior("map").fit(fn), fn, distributed.shard(ev.loader(3), even=False))
        out["log_probs"] = distributed.gather_predictions(preds).log_probs
        # Accumulators of sums: dense tensor and a Frequent-Directions sketch (exact: rows span 5 < 8 dims).
        rows, acc = _rows(), _Acc(12)
        acc.add(rows[rank::WORLD])
        out["acc_n"] = distributed.reduce_sums_([acc], rank + 1.0, rank + 1)  # a summed loss and a count
        vals, vecs, err = acc.side.sketch.eig(5)
        out["acc_total"], out["acc_sketch"], out["acc_err"] = acc.total, (vecs * vals) @ vecs.T, torch.tensor(err)
        out["acc_steps"] = acc.steps
        post = _laplace().fit(fn, distributed.shard(train.loader(5), even=False))
        out["kfac"] = _kron_state(post)
        out["kfac_loss"], out["kfac_prior"] = torch.tensor(post.engine.loss), post.prior
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (also: a small shared CPU's thread pool mostly spins)
    try:
        return _single()
    finally:
        torch.set_num_threads(threads)


def _single() -> dict:
    fn, _ = tiny_fn("bert", dropout=0.0)
    train = TokenDataset(N_TRAIN, seed=11)
    res = train_map(fn, train.loader(8, shuffle=True), TrainConfig(**TRAIN))
    ev = TokenDataset(N_EVAL, seed=12)
    out = {
        "adapter": fn.params.flatten(fn.params.values()),
        "losses": torch.tensor(res.losses),
        "stat": _stat(ev.loader(3)),
        "log_probs": predict_loader(make_posterior("map").fit(fn), fn, ev.loader(3)).log_probs,
    }
    post = _laplace().fit(fn, train.loader(5))
    out["kfac"], out["kfac_loss"], out["kfac_prior"] = _kron_state(post), torch.tensor(post.engine.loss), post.prior
    return out


def test_two_process_training_equals_one_process_with_the_double_batch(two_ranks, single):
    assert [r["world"] for r in two_ranks] == [(0, 2, "gloo"), (1, 2, "gloo")]
    torch.testing.assert_close(two_ranks[0]["adapter"], two_ranks[1]["adapter"], rtol=0, atol=0)  # identical ranks
    torch.testing.assert_close(two_ranks[0]["adapter"], single["adapter"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(two_ranks[0]["losses"], single["losses"], rtol=1e-4, atol=1e-6)
    assert len(single["losses"]) == 10  # 2 epochs × 5 steps, the same number on every rank


def test_sums_and_gathered_predictions_equal_the_single_process_ones(two_ranks, single):
    for r in two_ranks:
        torch.testing.assert_close(r["stat"], single["stat"])
        torch.testing.assert_close(r["scalars"], torch.tensor([3.0, 4.0], dtype=torch.float64))
        assert r["log_probs"].shape == (N_EVAL, 2)
        torch.testing.assert_close(r["log_probs"], single["log_probs"])


def test_reduce_sums_adds_tensors_and_merges_sketches(two_ranks):
    rows = _rows()
    full = FrequentDirections(12, 8)
    full.add(rows.T)
    vals, vecs, _ = full.eig(5)
    for r in two_ranks:
        assert r["acc_n"] == (3.0, 3) and isinstance(r["acc_n"][1], int)
        torch.testing.assert_close(r["acc_total"], rows.T @ rows)
        torch.testing.assert_close(r["acc_sketch"], (vecs * vals) @ vecs.T, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(r["acc_sketch"], rows.T @ rows, rtol=1e-8, atol=1e-8)
        assert float(r["acc_err"]) < 1e-8
        assert int(r["acc_steps"]) == 1  # integer tensors are not sums: left alone


def test_two_process_kfac_fit_equals_one_process(two_ranks, single):
    for r in two_ranks:
        torch.testing.assert_close(r["kfac_loss"], single["kfac_loss"], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(r["kfac_prior"], single["kfac_prior"], rtol=1e-5, atol=0)
        for a, b in zip(r["kfac"], single["kfac"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_single_process_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    loader = TokenDataset(10).loader(4)
    assert distributed.world() == distributed.World(0, 1, 0) and distributed.world().main
    assert distributed.shard(loader) is loader
    t = torch.arange(3.0)
    distributed.all_reduce_sum_([t])
    assert t.tolist() == [0.0, 1.0, 2.0]
    assert distributed.sync_step_([], 1.5) == 1.5
    assert distributed.reduce_sums_([object()], 2.0, 3.0) == (2.0, 3.0)
    assert distributed.init_from_env() == distributed.World()  # WORLD_SIZE unset: nothing to join


def test_shard_sampler_partitions_the_stream_in_order():
    base = list(range(11))
    uneven = [list(distributed.ShardSampler(base, r, 3, even=False)) for r in range(3)]
    assert sorted(sum(uneven, [])) == base
    assert [len(distributed.ShardSampler(base, r, 3, even=False)) for r in range(3)] == [4, 4, 3]
    even = [list(distributed.ShardSampler(base, r, 3)) for r in range(3)]
    assert even == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]  # the last 11 % 3 positions are left out
    parts = [torch.tensor(p) for p in uneven]
    assert distributed.interleave(parts).tolist() == base


def test_shard_rejects_an_unseeded_shuffling_loader():
    ds = TokenDataset(8)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, collate_fn=ds.collate)
    with pytest.raises(ValueError, match="seeded generator"):
        distributed.shard(loader, current=distributed.World(0, 2))
    sharded = distributed.shard(ds.loader(4, shuffle=True), current=distributed.World(1, 2))
    assert isinstance(sharded.sampler, distributed.ShardSampler) and len(sharded) == 1


def test_shard_rejects_a_batch_sampler_loader():
    ds = TokenDataset(8)
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=torch.utils.data.BatchSampler(range(8), 4, False), collate_fn=ds.collate
    )
    with pytest.raises(TypeError, match="batch_size"):
        distributed.shard(loader, current=distributed.World(0, 2))
