"""TP / PP / EP (and all three at once) reproduce the single-process loss and gradients.

Each layout runs as real gloo processes through the training code path (megatron DDP, pipeline
schedules, MoE dispatch). Weights come from a checkpoint saved by the single-process reference;
gradients are compared after being saved through the checkpoint layout and loaded back into one
single-process model (see workers.py).

Tolerances (fp32 on CPU): the loss to 1e-6 relative; every gradient tensor to
||g_par - g_ref|| <= 1e-4 * ||g_ref|| + 1e-10. Only summation order differs between layouts
(observed worst case ~1e-6 relative), so these bounds catch any missing or doubled reduction,
which shows up as O(1) relative error.
"""

from __future__ import annotations

import json

import pytest

from tests.multiproc import run_ranks
from tests.parallel import workers

LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "ep2": (2, ["parallel.ep=2"]),
    "tp2_pp2_ep2": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.ep=2", "parallel.etp=1"]),
    # A capacity of every token per expert: nothing is dropped, so dropless results exactly.
    "ep2_capacity_no_drop": (2, ["parallel.ep=2", "parallel.moe_capacity_factor=4.0"]),
}
# Capacity half the balanced share: tokens are dropped; EP=2 must drop exactly the tokens one
# process drops at the same factor.
DROPPING = ["parallel.moe_capacity_factor=0.5"]


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    work = tmp_path_factory.mktemp("parallel")
    run_ranks(1, workers.run_layout, str(work), [], "ref", True)
    return work


def _loss(workdir, tag: str) -> float:
    return json.loads((workdir / f"loss_{tag}.json").read_text())["loss"]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(reference_dir, name):
    world, layout = LAYOUTS[name]
    run_ranks(world, workers.run_layout, str(reference_dir), layout, name, False)
    _assert_same_run(reference_dir, "ref", name)


def test_capacity_drops_the_same_tokens_at_ep2(reference_dir):
    run_ranks(1, workers.run_layout, str(reference_dir), DROPPING, "ref_dropping", False)
    run_ranks(
        2,
        workers.run_layout,
        str(reference_dir),
        ["parallel.ep=2", *DROPPING],
        "ep2_dropping",
        False,
    )
    assert _loss(reference_dir, "ref_dropping") != pytest.approx(
        _loss(reference_dir, "ref"), rel=1e-4
    )
    _assert_same_run(reference_dir, "ref_dropping", "ep2_dropping")


def _assert_same_run(
    reference_dir, ref: str, name: str, rel_tolerance: dict[str, float] | None = None
) -> None:
    """Same loss and gradients; ``rel_tolerance``: a looser relative bound for named tensors."""
    run_ranks(1, workers.compare_grads, str(reference_dir), ref, name)
    assert _loss(reference_dir, name) == pytest.approx(_loss(reference_dir, ref), rel=1e-6)

    errors = json.loads((reference_dir / f"compare_{ref}_{name}.json").read_text())
    assert len(errors) > 20, "expected every parameter of the tiny model to be compared"
    rel_tolerance = rel_tolerance or {}
    bad = {
        k: v for k, v in errors.items() if v["abs"] > rel_tolerance.get(k, 1e-4) * v["ref"] + 1e-10
    }
    assert not bad, f"gradients differ from the single-process run: {bad}"


def test_fp32_residual_stream_crosses_pipeline_stages(tmp_path):
    """model.residual_in_fp32 in a bf16 model: stages hand on the fp32 stream (pipeline_dtype),
    so PP=2 reproduces one process's bf16 run."""
    fp32_stream = ["training.precision=bf16", "model.residual_in_fp32=true"]
    run_ranks(1, workers.run_layout, str(tmp_path), fp32_stream, "ref_bf16", True)
    run_ranks(2, workers.run_layout, str(tmp_path), ["parallel.pp=2", *fp32_stream], "pp2", False)
    # The tied embedding's two gradients (input and output layer) are summed in a different
    # order across stages, then rounded to bf16: one rounding step apart (2^-8), also without
    # the flag. Every other tensor and the loss are held to the fp32 bounds.
    _assert_same_run(tmp_path, "ref_bf16", "pp2", {"embedding.word_embeddings.weight": 2.0**-8})
