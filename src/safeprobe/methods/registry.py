"""The method registry: one name, one module, one typed config.

A method module declares its hyperparameters as a dataclass deriving from `MethodConfig`
(they live under `method.*` in the Hydra config) and registers its LightningModule:

    @dataclass
    class LisaConfig(MethodConfig):
        rho: float = 1.0

    @register("lisa", LisaConfig)
    class LisaModule(FineTuneModule): ...

`safeprobe.methods` imports every module of its package, so a new method is one module
(here) and one YAML file (conf/method/<name>.yaml); nothing else lists the methods.
"""

from __future__ import annotations

from dataclasses import dataclass

from safeprobe.config import ConfigError


@dataclass
class MethodConfig:
    """Keys every method has. A method's own config subclasses it."""

    name: str = "sft"


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config: type  # a MethodConfig subclass: the method.* keys
    module: type  # a FineTuneModule subclass

    @property
    def stage(self) -> str:
        """"fine-tuning" (method=..., or align.method=...) or "alignment" (align.method=... only)."""
        return getattr(self.module, "stage", "fine-tuning")


METHODS: dict[str, MethodSpec] = {}


def register(name: str, config: type = MethodConfig):
    """Class decorator: make `name` (method=<name>) build this module with `config`."""

    def add(cls):
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice ({METHODS[name].module.__name__}, {cls.__name__})")
        METHODS[name] = MethodSpec(name, config, cls)
        return cls

    return add


def method_spec(name: str, path: str = "method") -> MethodSpec:
    """The registered method `name`; `path` "method" (the fine-tuning method) admits only
    fine-tuning methods, "align.method" (the alignment stage) every method."""
    allowed = sorted(m for m, spec in METHODS.items() if path != "method" or spec.stage == "fine-tuning")
    if name not in allowed:
        hint = f" ({name} is an alignment-stage defense: align={name})" if name in METHODS else ""
        raise ConfigError(f"{path}.name={name!r} is invalid{hint}; allowed: {', '.join(allowed)}")
    return METHODS[name]


def fine_tuning_methods() -> list[str]:
    return sorted(m for m, spec in METHODS.items() if spec.stage == "fine-tuning")
