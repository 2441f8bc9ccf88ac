"""A fix to megatron-core 0.16.1's DistributedOptimizer for torch's Adam (no apex, no TE).

The instance-level repairs that the same optimizer needs for bf16 checkpoints live with the code
that builds it (training/optimizer_state.py); this one replaces a method of the class.
"""

from __future__ import annotations

from megatron_blackmamba.patches.registry import Patch, Target


def _without_apex_or_te() -> bool:
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

    return not HAVE_APEX_OR_TE


def _install_load_saved_states_only() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_saved_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        destinations = {"param": main_param, **self.optimizer.state[main_param]}
        for key, value in tensors.items():
            destinations[key].copy_(value)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_saved_states


PATCHES = [
    Patch(
        name="DistributedOptimizer loads saved states only",
        kind="correctness",
        targets=(
            Target(
                "megatron.core.optimizer.distrib_optimizer",
                "DistributedOptimizer._set_main_param_and_optimizer_states",
                own=True,
            ),
        ),
        when=(
            "neither apex nor Transformer Engine is installed (megatron falls back to torch's Adam)"
        ),
        why=(
            "megatron's loaders leave torch Adam's 'step' out of the saved tensors (it comes back "
            "from the param groups), but the setter copies every key of the optimizer's state, so "
            "every load failed with KeyError 'step'; copy the saved tensors instead (the "
            "precision-aware path, which keeps no torch state, is unchanged)"
        ),
        applies=_without_apex_or_te,
        install=_install_load_saved_states_only,
        test=(
            "tests/training/test_optimizer_state_pairing.py::"
            "test_save_then_load_restores_every_parameter_and_its_state"
        ),
    ),
]
