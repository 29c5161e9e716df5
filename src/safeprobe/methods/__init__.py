"""The `method` config group: one LightningModule per method, sharing FineTuneModule."""

from safeprobe.config import TrainConfig
from safeprobe.methods.base import FineTuneModule
from safeprobe.methods.sap import SAPModule
from safeprobe.methods.sft import SFTModule


def build_method(model, cfg: TrainConfig) -> FineTuneModule:
    if cfg.method.name == "sap":
        return SAPModule(model, cfg.optim, cfg.probe)
    return SFTModule(model, cfg.optim)
