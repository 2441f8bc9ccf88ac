"""lm-eval's own command line with the ``blackmamba`` model registered:

    python -m megatron_blackmamba.evaluation.lm_eval_main --model blackmamba \
        --model_args ckpt=DIR,batch_size=16 --tasks hellaswag --include_path TASKS

lm-eval 0.4 discovers no model plugins, so its ``lm_eval`` command cannot see this project's model;
this entry point imports the adapter first and then hands every argument to lm-eval unchanged.
"""

import sys

import megatron_blackmamba.evaluation.lm_eval_adapter  # noqa: F401  (registers the model)

if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    sys.exit(cli_evaluate())
