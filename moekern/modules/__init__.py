"""nn.Modules that stand in for Hugging Face MoE blocks and carry moekern's compression state."""

from moekern.modules.experts import experts_forward
from moekern.modules.moe import MoEBlock, RemovedMoE

__all__ = ["MoEBlock", "RemovedMoE", "experts_forward"]
