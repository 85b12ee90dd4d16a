"""The Makefile's recipes, as make would run them (`make -n`), are valid shell (`bash -n`):
a syntax error otherwise shows only when its target runs, as `make bench` once had one
(variables set before a subshell) that no other target runs into."""

from __future__ import annotations

import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TARGETS = re.findall(r"^([a-z][a-z0-9-]*):", (ROOT / "Makefile").read_text(), flags=re.MULTILINE)


def test_the_makefile_has_the_targets_readme_and_ci_use() -> None:
    assert {"test", "lint", "unit", "e2e", "e2e-podman-dev", "e2e-swarm", "bench", "mutate"} <= set(TARGETS)


@pytest.mark.parametrize("target", TARGETS)
def test_every_recipe_is_valid_shell(target: str) -> None:
    made = subprocess.run(
        ["make", "-n", "--no-print-directory", target], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert made.returncode == 0, made.stderr
    checked = subprocess.run(["bash", "-n"], input=made.stdout, capture_output=True, text=True, check=False)
    assert checked.returncode == 0, f"make {target}: {checked.stderr}\n{made.stdout}"
