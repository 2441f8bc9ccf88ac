"""megatron_blackmamba: pretrain BlackMamba (Mamba-1 + top-1 MoE) on megatron-core."""

__version__ = "0.1.0"
