"""What a patch of megatron-core (or of torch, as megatron sees it) is, and how the set is applied.

Every change this project makes to code it does not own is a :class:`Patch` in one registry
(``megatron_blackmamba.patches.PATCHES``): what it replaces, when it applies, why, the upstream
issue where there is one, the megatron-core version it was written against and the test that
covers it. ``apply()`` installs the ones this machine needs, once per process, and logs them in
one line. Before installing anything it checks that each target is still where the patch expects
it: a target that moved (renamed, or turned into a re-export of another module, where patching
the name would silently change nothing) is refused with the patch's name; on any other
megatron-core version the patches that still find their targets are applied with a warning.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

logger = logging.getLogger(__name__)

WRITTEN_FOR = "0.16.1"  # the megatron-core release every patch was written and tested against

PatchKind = Literal["cpu", "no-te", "performance", "correctness"]


@dataclass(frozen=True)
class Target:
    """``module.attribute`` that a patch replaces (``attribute`` may be ``Class.method``).

    ``own``: the attribute must be defined by ``module`` itself (a function's or class's
    ``__module__``), not imported into it; patching an imported name changes only that module's
    binding, which is a silent no-op once the real callers live elsewhere.
    """

    module: str
    attribute: str
    own: bool = False

    def problem(self) -> str | None:
        """Why this target is not where the patch expects it, or None."""
        try:
            obj = importlib.import_module(self.module)
        except ImportError as error:
            return f"{self.module} does not import ({error})"
        for part in self.attribute.split("."):
            if not hasattr(obj, part):
                return f"{self.module}.{self.attribute} does not exist"
            obj = getattr(obj, part)
        if self.own:
            owner = getattr(obj, "__module__", self.module) or self.module
            if owner != self.module and not owner.startswith(
                "megatron_blackmamba."
            ):  # ours: installed
                return f"{self.module}.{self.attribute} is now defined in {owner}"
        return None


@dataclass(frozen=True)
class Patch:
    """One replacement of code this project does not own.

    ``when`` says in words what ``applies()`` tests; ``install()`` makes the change (called at
    most once per process, only where ``applies()``); ``test`` is the pytest node that checks the
    patched behaviour.
    """

    name: str
    kind: PatchKind
    targets: tuple[Target, ...]
    when: str
    why: str
    applies: Callable[[], bool]
    install: Callable[[], None]
    test: str
    upstream: str | None = None
    written_for: str = WRITTEN_FOR

    def problems(self) -> list[str]:
        return [f"patch {self.name!r}: {p}" for p in (t.problem() for t in self.targets) if p]


def megatron_version() -> str:
    import megatron.core

    return getattr(megatron.core, "__version__", "unknown")


def install_patches(patches: Sequence[Patch]) -> list[str]:
    """Install every patch of ``patches`` that applies here; returns their names.

    Raises RuntimeError, before installing any, when a patch that applies finds a target moved.
    """
    version = megatron_version()
    wanted = [p for p in patches if p.applies()]
    moved = [problem for p in wanted for problem in p.problems()]
    if moved:
        raise RuntimeError(
            f"megatron-core {version}: the targets of these patches moved, so they would do nothing"
            f" (they were written for {WRITTEN_FOR}; install megatron-core=={WRITTEN_FOR} or update"
            " megatron_blackmamba/patches): " + "; ".join(moved)
        )
    stale = sorted({p.written_for for p in wanted} - {version})
    if stale:
        logger.warning(
            "megatron-core %s: the patches in megatron_blackmamba/patches were written for %s; "
            "their targets were found, but run the tests they name before training",
            version,
            ", ".join(stale),
        )
    for patch in wanted:
        patch.install()
    if wanted:
        logger.info("megatron-core %s patches: %s", version, ", ".join(p.name for p in wanted))
    return [p.name for p in wanted]
