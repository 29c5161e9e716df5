"""Plain supervised fine-tuning: the baseline every defense is compared with."""

from safeprobe.methods.base import FineTuneModule
from safeprobe.methods.registry import register


@register("sft")
class SFTModule(FineTuneModule):
    """Minimizes the task loss on response tokens; nothing else (see FineTuneModule)."""
