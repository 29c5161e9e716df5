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


METHODS: dict[str, MethodSpec] = {}


def register(name: str, config: type = MethodConfig):
    """Class decorator: make `name` (method=<name>) build this module with `config`."""

    def add(cls):
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice ({METHODS[name].module.__name__}, {cls.__name__})")
        METHODS[name] = MethodSpec(name, config, cls)
        return cls

    return add


def method_spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ConfigError(f"method.name={name!r} is invalid; allowed: {', '.join(sorted(METHODS))}")
    return METHODS[name]
