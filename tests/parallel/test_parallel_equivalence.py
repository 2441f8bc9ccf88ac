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
}


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    work = tmp_path_factory.mktemp("parallel")
    run_ranks(1, workers.run_layout, str(work), [], "ref", True)
    return work


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(reference_dir, name):
    world, layout = LAYOUTS[name]
    run_ranks(world, workers.run_layout, str(reference_dir), layout, name, False)
    run_ranks(1, workers.compare_grads, str(reference_dir), "ref", name)

    ref_loss = json.loads((reference_dir / "loss_ref.json").read_text())["loss"]
    par_loss = json.loads((reference_dir / f"loss_{name}.json").read_text())["loss"]
    assert par_loss == pytest.approx(ref_loss, rel=1e-6)

    errors = json.loads((reference_dir / f"compare_ref_{name}.json").read_text())
    assert len(errors) > 20, "expected every parameter of the tiny model to be compared"
    bad = {k: v for k, v in errors.items() if v["abs"] > 1e-4 * v["ref"] + 1e-10}
    assert not bad, f"gradients differ from the single-process run: {bad}"
