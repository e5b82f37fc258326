"""Smoke tests of ``python -m bayeslora.bench`` at tiny size on CPU: JSON schema, positive finite numbers.
No timing assertions (speed targets are benchmark output, not tests)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bayeslora.bench import SCHEMA, main, parser
from bayeslora.benchmarks.common import measure, tensor_bytes

# One thread: on a small shared CPU, torch's intra-op thread pool mostly spins.
FAST = ["--size", "tiny", "--seq-len", "16", "--repeats", "1", "--warmup", "0", "--steps", "2", "--fit-batches", "1",
        "--threads", "1", "--quiet"]  # fmt: skip
TIMING_KEYS = {"median_s", "min_s", "times_s", "repeats", "warmup", "per", "peak_bytes", "peak_extra_bytes"}


def _timings(obj, path=""):
    """Every timing entry (a dict with ``median_s``) in a report, with its path."""
    if isinstance(obj, dict):
        if "median_s" in obj:
            yield path, obj
        for k, v in obj.items():
            yield from _timings(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _timings(v, f"{path}[{i}]")


def _check_timing(path: str, t: dict) -> None:
    assert set(t) >= TIMING_KEYS, path
    assert math.isfinite(t["median_s"]) and t["median_s"] > 0, path
    assert len(t["times_s"]) == t["repeats"] and all(x > 0 for x in t["times_s"]), path
    assert t["peak_bytes"] is None and t["peak_extra_bytes"] is None, path  # CPU: no GPU memory statistic


# Warnings raised inside the peers (laplace-torch / curvlinops / bayesian-lora) under this torch version.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented:UserWarning")
@pytest.mark.filterwarnings("ignore:Full backward hook is firing when gradients are computed:UserWarning")
def test_bench_all_with_peers_writes_a_complete_report(tmp_path):
    out = tmp_path / "bench.json"
    report = main(["all", "--compare", *FAST, "--samples", "2", "--glm-samples", "8", "--members", "2",
                   "--out", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["schema"] == SCHEMA and report["command"] == "all"
    assert {"env", "config", "model", "results", "ratios", "targets"} <= set(report)
    assert report["env"]["device"] == "cpu" and "memory_note" in report["env"] and report["env"]["cpu_threads"] == 1
    assert report["model"]["adapter_parameters"] > 0 and report["model"]["adapted_layers"] == 4
    res = report["results"]
    assert {"baseline", "train", "laplace", "vi", "ensemble", "peers"} <= set(res)
    assert {"forward", "forward_functional", "train_map_step"} <= set(res["baseline"])
    assert set(res["laplace"]) == {"kfac_ggn", "kfac_mc", "diag"}
    ggn = res["laplace"]["kfac_ggn"]
    assert {"fit", "glm_probit", "glm_mc", "sampling"} <= set(ggn) and ggn["persistent_bytes"] > 0
    for name in ("vi", "ensemble"):  # either measured or reported as not available
        assert res[name].get("available", True) or res[name]["reason"]
    assert "fit" in res["peers"]["laplace-torch"] and "glm_probit" in res["peers"]["laplace-torch"]
    assert "fit" in res["peers"]["bayesian-lora"] or res["peers"]["bayesian-lora"]["available"] is False
    timings = list(_timings(res))
    assert len(timings) >= 12
    for path, t in timings:
        _check_timing(path, t)
    assert {"train_map_throughput_vs_plain", "kfac_fit_mc_vs_train_step", "glm_probit_vs_forward"} <= set(
        report["ratios"]
    )
    assert all(math.isfinite(v) and v > 0 for v in report["ratios"].values())
    for t in report["targets"]:
        assert set(t) == {"name", "value", "target", "met"} and isinstance(t["met"], bool)


def test_bench_scaling_writes_curves_and_a_plot(tmp_path):
    png = tmp_path / "scaling.png"
    report = main(["scaling", *FAST, "--seq-lens", "8,16", "--ranks", "2,4", "--module-sets", "q_proj;q_proj,v_proj",
                   "--out", str(tmp_path / "s.json"), "--plot", str(png)])  # fmt: skip
    curves = report["results"]["scaling"]
    assert [p["x"] for p in curves["seq_len"]] == [8, 16]
    assert [p["x"] for p in curves["lora_r"]] == [2, 4] and [p["x"] for p in curves["modules"]] == [1, 2]
    for path, t in _timings(curves):
        _check_timing(path, t)
    assert all({"forward", "train_map_step", "kfac_fit", "glm_probit"} <= set(p) for ps in curves.values() for p in ps)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and report["plot"] == str(png)


def test_measure_and_tensor_bytes():
    calls = []
    t = measure(lambda: calls.append(1), torch.device("cpu"), warmup=2, repeats=3, per=2, profile=3)
    assert len(calls) == 6 and t["per"] == 2 and len(t["times_s"]) == 3 and t["peak_bytes"] is None
    assert len(t["profile"]) <= 3
    state = {"a": torch.zeros(3, dtype=torch.float64), "b": [torch.zeros(2, 2), {"c": torch.ones(5, dtype=torch.int8)}]}
    assert tensor_bytes(state) == 3 * 8 + 4 * 4 + 5


def test_bench_rejects_bad_arguments():
    with pytest.raises(ValueError, match="--plot"):
        main(["train", *FAST, "--plot", "x.png"])
    with pytest.raises(ValueError, match="--warmup"):
        main(["train", *FAST, "--warmup", "-1"])
    p = parser()
    for bad in (["nope"], ["train", "--repeats", "0"], ["train", "--size", "13b"], ["scaling", "--ranks", "a,b"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)


def test_bench_prefix_times_full_and_cached_and_checks_exactness(tmp_path):
    out = tmp_path / "prefix.json"
    report = main(["prefix", "--model", "tiny-llama", "--top-layers", "1", "--batch-size", "4", "--seq-len", "16",
                   "--steps", "2", "--repeats", "1", "--warmup", "0", "--num-classes", "4", "--quiet",
                   "--out", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    entry = report["results"]["prefix"]["top_1"]
    for op in ("forward", "train_step", "kfac_fit", "glm"):
        for path in ("full", "cached"):
            assert entry[f"{op}_{path}"]["median_s"] > 0
        assert entry["speedup"][op] > 0
    assert entry["max_abs_logit_diff"]["float32"] <= 1e-5 < entry["max_abs_logit"]
    assert entry["max_abs_logit_diff"]["float16"] <= 1e-2
    assert entry["expected_speedup"]["forward"] == 2.0


def test_bench_generative_times_the_token_level_path_and_its_memory(tmp_path):
    out = tmp_path / "generative.json"
    report = main(["generative", "--model", "tiny-llama", "--top-layers", "0", "--batch-size", "2", "--seq-len", "12",
                   "--steps", "2", "--repeats", "1", "--warmup", "0", "--samples", "3", "--quiet",
                   "--out", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    entry = report["results"]["generative"]
    assert entry["target_tokens_per_batch"] == 2 * 6  # the second half of each row
    for op in ("forward", "train_step", "kfac_fit_mc", "sampling"):
        assert entry["timings"][op]["median_s"] > 0
    assert {t["name"] for t in report["targets"]} >= {"kfac_fit_mc_vs_train_step", "sampling_vs_forward"}
    peaks = entry["peak_extra_bytes"]
    if peaks["train_step"] is not None:  # Linux: the forked probe; a train step holds activations and gradients
        assert peaks["train_step"] > 0 and peaks["sampling"] >= 0


def test_the_cpu_memory_probe_sees_an_allocation():
    from bayeslora.benchmarks.generative import cpu_peak_extra_bytes

    big = cpu_peak_extra_bytes(lambda: torch.ones(64 * 2**20 // 4).sum())  # 64 MiB
    small = cpu_peak_extra_bytes(lambda: torch.ones(16).sum())
    if big is None:
        pytest.skip("no /proc/self/clear_refs here")
    assert big >= 60 * 2**20 > small
