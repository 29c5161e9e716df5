"""The `method` config group: every fine-tuning method (and the alignment-stage defenses that
conf/align selects), found by name in a registry.

Each module of this package registers itself (methods/registry.py); importing the package
imports them all, so adding a method is one module here and one YAML in conf/method/.
"""

import importlib
import pkgutil

from safeprobe.methods.registry import (
    METHODS,
    MethodConfig,
    MethodSpec,
    fine_tuning_methods,
    method_spec,
    register,
)

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")


def build_method(model, cfg):
    """The LightningModule of cfg.method (a validated TrainConfig) around `model`."""
    return method_spec(cfg.method.name, "align.method").module(model, cfg)  # validated: any registered method


__all__ = ["METHODS", "MethodConfig", "MethodSpec", "build_method", "fine_tuning_methods", "method_spec", "register"]
