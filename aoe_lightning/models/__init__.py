"""Pure-PyTorch models: dense, router-MoE and Autonomy-of-Experts transformer LMs."""

from aoe_lightning.models.attention import KVCache
from aoe_lightning.models.config import FFNConfig, ModelConfig, aoe_d_wide
from aoe_lightning.models.moe import AutonomyOfExperts, RouterMoE, RoutingStats
from aoe_lightning.models.transformer import ModelOutput, Transformer

__all__ = [
    "AutonomyOfExperts",
    "FFNConfig",
    "KVCache",
    "ModelConfig",
    "ModelOutput",
    "RouterMoE",
    "RoutingStats",
    "Transformer",
    "aoe_d_wide",
]
