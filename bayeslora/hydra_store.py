"""The method defaults as Hydra config nodes: ``configs/method/<name>.yaml`` take their options from Python.

:func:`register` stores, for every registered method, a node ``method_defaults/<name>`` built from
:func:`bayeslora.posteriors.method_defaults` (the constructor's keyword defaults). Each
``configs/method/<name>.yaml`` starts from that node (``defaults: [/method_defaults/<name>@_here_, _self_]``) and
only wires options to the run's top-level settings (``seed: ${seed}``, ``progress: ${train.progress}``, ...), so
``BayesianLoRA(method=name)`` and ``bayeslora-run method=name`` are the same method, every option can be
overridden on the command line (``method.prior_fit=val_nll``), and a study changes what it studies in its
experiment config. ``tests/test_configs.py`` checks every method config against the Python defaults.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

GROUP = "method_defaults"
TARGET = "bayeslora.posteriors.build"  # instantiate(cfg.method) builds the posterior


def register() -> None:
    """Store ``method_defaults/<name>`` for every method of :data:`bayeslora.posteriors.METHODS` (idempotent)."""
    from .posteriors import METHODS, method_defaults

    store = ConfigStore.instance()
    for name in METHODS:
        node = {"_target_": TARGET, "name": name, **method_defaults(name)}
        store.store(group=GROUP, name=name, node=node, provider="bayeslora")
