"""bayeslora: posteriors over LoRA adapters and calibrated predictive distributions.

Public API::

    from bayeslora import BayesianLoRA, AnswerTokenLogits, SequenceClassificationLogits
"""

from .function import AdapterFn
from .metrics import Predictions, accuracy, aurc, brier, classification_metrics, ece, evaluate, nll, ood_auroc
from .models import LoraSpec, add_lora, load_model
from .params import AdapterParams
from .posteriors import METHODS, Posterior, make_posterior
from .predictive import Predictive
from .readout import AnswerTokenLogits, Readout, SequenceClassificationLogits
from .train import TrainConfig, TrainResult, train_map
from .wrapper import BayesianLoRA

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
    "SequenceClassificationLogits",
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
    "train_map",
]
