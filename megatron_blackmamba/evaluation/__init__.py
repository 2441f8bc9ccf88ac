"""Evaluation of BlackMamba checkpoints: lm-evaluation-harness tasks and held-out perplexity.

``blackmamba-eval`` (``cli``) runs lm-eval tasks, the paper's suite (``--tasks paper``) or
held-out loss on data_prep output. Importing ``lm_eval_adapter`` registers ``blackmamba`` as an
lm-eval model for the Python API; ``python -m megatron_blackmamba.evaluation.lm_eval_main`` is
lm-eval's own command line with it registered. ``scoring`` needs no lm-eval.
"""
