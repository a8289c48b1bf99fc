"""Pre-train router-MoE, Autonomy-of-Experts and dense transformer LMs with PyTorch Lightning."""

__version__ = "0.1.0"
