"""``python -m megatron_blackmamba.patches``: the patch table, and which patches apply here."""

from __future__ import annotations

from megatron_blackmamba.patches import PATCHES, WRITTEN_FOR
from megatron_blackmamba.patches.registry import megatron_version


def main() -> None:
    print(f"megatron-core {megatron_version()} (patches written for {WRITTEN_FOR})")
    for patch in PATCHES:
        here = "applies" if patch.applies() else "not needed"
        print(f"- {patch.name} [{patch.kind}, {here}]: when {patch.when}; test {patch.test}")
        problems = patch.problems()
        for problem in problems:
            print(f"    TARGET MOVED: {problem}")


if __name__ == "__main__":
    main()
