"""The patch registry: every entry documented and tested, targets checked, other versions
flagged."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from megatron_blackmamba import patches
from megatron_blackmamba.patches import registry
from megatron_blackmamba.patches.registry import Patch, Target, install_patches

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("patch", patches.PATCHES, ids=lambda p: p.name)
def test_every_patch_names_its_reason_condition_and_an_existing_test(patch: Patch):
    assert patch.why and patch.when and patch.targets and patch.written_for == registry.WRITTEN_FOR
    path, _, test = patch.test.partition("::")
    assert (REPO / path).is_file(), patch.test
    assert f"def {test}(" in (REPO / path).read_text(), patch.test
    assert patch.problems() == []


def test_names_are_unique():
    assert len(patches.BY_NAME) == len(patches.PATCHES)


def test_apply_is_idempotent_and_logs_one_line(caplog):
    first = patches.apply()
    with caplog.at_level(logging.INFO, logger="megatron_blackmamba.patches"):
        assert patches.apply() is first
    assert not caplog.records
    assert set(first) <= set(patches.BY_NAME)


def _probe(installed: list[str], targets: tuple[Target, ...]) -> Patch:
    return Patch(
        name="probe",
        kind="correctness",
        targets=targets,
        when="always",
        why="test",
        applies=lambda: True,
        install=lambda: installed.append("probe"),
        test="tests/x.py::t",
    )


def test_a_target_that_became_a_reexport_is_refused():
    """megatron 0.16.1's mamba_block imports TENorm from the TE extension: patching the name there
    changes only that module's binding, which is what ``own=True`` guards against."""
    installed: list[str] = []
    moved = _probe(installed, (Target("megatron.core.ssm.mamba_block", "TENorm", own=True),))
    with pytest.raises(
        RuntimeError, match="probe.*TENorm is now defined in megatron.core.extensions"
    ):
        install_patches([moved])
    missing = _probe(installed, (Target("megatron.core.ssm.mamba_block", "NoSuchThing"),))
    with pytest.raises(RuntimeError, match="NoSuchThing does not exist"):
        install_patches([missing])
    assert installed == []  # refused before anything was installed


def test_another_megatron_version_warns_and_still_applies(monkeypatch, caplog):
    installed: list[str] = []
    monkeypatch.setattr(registry, "megatron_version", lambda: "0.99.0")
    with caplog.at_level(logging.WARNING, logger="megatron_blackmamba.patches"):
        names = install_patches(
            [_probe(installed, (Target("megatron.core.ssm.mamba_block", "MambaStack", own=True),))]
        )
    assert names == ["probe"] and installed == ["probe"]
    assert "megatron-core 0.99.0" in caplog.text and registry.WRITTEN_FOR in caplog.text
