"""megatron_blackmamba: pretrain BlackMamba (Mamba-1 + top-1 MoE) on megatron-core."""

import warnings

__version__ = "0.1.0"

# megatron-core announces at import time that it runs without Transformer Engine or Apex. This
# project picks and logs its own kernels (megatron_blackmamba.kernels), so those notices are
# noise; they are filtered here, before any submodule imports megatron (``--help`` included).
EXPECTED_IMPORT_WARNINGS = (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
)
for _message in EXPECTED_IMPORT_WARNINGS:
    warnings.filterwarnings("ignore", message=_message)
