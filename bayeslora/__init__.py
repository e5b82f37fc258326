"""bayeslora: posteriors over LoRA adapters and calibrated predictive distributions.

Public API::

    from bayeslora import BayesianLoRA, AnswerTokenLogits, SequenceClassificationLogits, SequenceRegression
"""

import warnings

from .lazy import exports

# peft calls a transformers API deprecated in v5 (nothing a user can act on): silenced for every use of bayeslora
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

# Names load on first use (PEP 562), so the command-line help and light imports do not pay for torch.
_WHERE = {
    "AdapterFn": "function",
    "Predictions": "metrics",
    "RegressionPredictions": "metrics",
    "regression_metrics": "metrics",
    "accuracy": "metrics",
    "aurc": "metrics",
    "brier": "metrics",
    "classification_metrics": "metrics",
    "ece": "metrics",
    "evaluate": "metrics",
    "nll": "metrics",
    "ood_auroc": "metrics",
    "LoraSpec": "models",
    "add_lora": "models",
    "load_model": "models",
    "AdapterParams": "params",
    "METHODS": "posteriors",
    "Posterior": "posteriors",
    "make_posterior": "posteriors",
    "Predictive": "predictive",
    "AnswerTokenLogits": "readout",
    "Readout": "readout",
    "SequenceClassificationLogits": "readout",
    "SequenceRegression": "readout",
    "TrainConfig": "train",
    "TrainResult": "train",
    "train_map": "train",
    "BayesianLoRA": "wrapper",
}


__getattr__ = exports(__name__, _WHERE)


__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "AdapterFn",
    "AdapterParams",
    "AnswerTokenLogits",
    "BayesianLoRA",
    "LoraSpec",
    "Posterior",
    "Predictions",
    "Predictive",
    "Readout",
    "RegressionPredictions",
    "SequenceClassificationLogits",
    "SequenceRegression",
    "TrainConfig",
    "TrainResult",
    "__version__",
    "accuracy",
    "add_lora",
    "aurc",
    "brier",
    "classification_metrics",
    "ece",
    "evaluate",
    "load_model",
    "make_posterior",
    "nll",
    "ood_auroc",
    "regression_metrics",
    "train_map",
]
