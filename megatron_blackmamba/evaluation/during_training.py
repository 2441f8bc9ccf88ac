"""Downstream lm-eval tasks scored on the model being trained (``training.eval_tasks``).

Off by default and never on the step's hot path: it runs only at ``eval_tasks_interval`` steps,
on the in-memory model (tp=pp=ep=1, checked at config load), each data-parallel rank scoring a
slice of the requests; the scores go to tensorboard / W&B as ``downstream/<task>/<metric>``.
"""

from __future__ import annotations

from megatron_blackmamba.config import JobConfig


def downstream_scores(job: JobConfig, model, tokenizer: str) -> dict[str, float]:
    """{"<task>/<metric>": value} for every numeric metric lm-eval reports on
    ``job.training.eval_tasks``."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from megatron_blackmamba.evaluation.cli import TASK_DIR
    from megatron_blackmamba.evaluation.lm_eval_adapter import BlackMambaLM

    t = job.training
    folders = [str(TASK_DIR)] + ([t.eval_tasks_include] if t.eval_tasks_include else [])
    was_training = model.training
    model.eval()
    try:
        lm = BlackMambaLM.from_model(
            model, tokenizer, t.seq_length, batch_size=max(t.micro_batch_size, 1)
        )
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(t.eval_tasks),
            limit=t.eval_tasks_limit or None,
            task_manager=TaskManager(include_path=folders),
            log_samples=False,
            verbosity="WARNING",
        )
    finally:
        model.train(was_training)
    scores = {}
    for task, metrics in results["results"].items():
        for name, value in metrics.items():
            if (
                isinstance(value, (int, float)) and "," in name and "_stderr," not in name
            ):  # "acc,none"
                scores[f"{task}/{name.replace(',none', '')}"] = float(value)
    return scores
