"""Issue #29's architecture check: the product files the 3D modality touched are its spec and codec, its decoder kind,
its preset, its toy recipe and checker, and their registrations, nothing else.

Two views of "touched": (1) the product files that name the modality or its preset (``object3d``, ``toy-3d`` in any
case) are exactly the declared ones; (2) on the unmerged branch, the product files changed since the merge base
with ``main`` are among the declared ones (after the merge there is no branch to compare, nor on a later branch
whose base has the modality already; (1) keeps holding).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# everything that ships (docs, tests, examples and bench figures are not the product)
PRODUCT = ("polymodal", "decoders", "projectors", "services", "mosit", "training", "skills", "deploy", "docker",
           "pyproject.toml", "Dockerfile", "Makefile", ".ci")

DECLARED = {
    "polymodal/media/object3d.py": "the spec and the codec (PLY / GLB)",
    "polymodal/media/__init__.py": "the spec's registration (after video)",
    "pyproject.toml": "the codec's libraries (plyfile, trimesh)",
    "decoders/object3d.py": "the decoder kind (Shap-E, point sets)",
    "decoders/__init__.py": "the decoder kind's registration",
    "polymodal/presets/toy.py": "the toy-3d preset",
    "polymodal/presets/__init__.py": "the preset's registration",
    "training/toyworld/object3d.py": "the toy recipe (generator, decoder training) and its checker",
    "training/toyworld/checkers.py": "the checker's registration (CHECKERS, READERS)",
    "training/toyworld/cli.py": "the recipe's registration as a command (polymodal toyworld train-3d)",
}
DECLARED_FOLDERS = {
    "polymodal/assets/toy-3d/": "the toy-3d preset's trained build (package data: decoders/, export/, manifest)",
}


def _declared(path: str) -> bool:
    return path in DECLARED or any(path.startswith(f) for f in DECLARED_FOLDERS)


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


def _in_product(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in PRODUCT)


def test_the_product_files_that_name_the_modality_are_the_declared_ones():
    if _git("rev-parse", "--git-dir").returncode != 0:
        pytest.skip("not a git checkout")
    r = _git("grep", "--untracked", "-il", "-e", "object3d", "-e", "toy-3d", "-e", "toy_3d", "--", *PRODUCT)
    assert r.returncode in (0, 1), r.stderr
    naming = set(r.stdout.split())
    undeclared = {p for p in naming if not _declared(p)}
    assert undeclared == set(), f"undeclared product files name the modality: {undeclared}"
    assert set(DECLARED) - naming == set(), f"declared files that do not name it: {set(DECLARED) - naming}"


def test_the_branch_changed_no_other_product_file():
    if _git("rev-parse", "--verify", "-q", "main").returncode != 0:
        pytest.skip("no main branch to compare with")
    if _git("symbolic-ref", "--short", "-q", "HEAD").stdout.strip() in ("main", ""):
        pytest.skip("on main (merged) or detached: no branch to compare; the naming test keeps holding")
    base = _git("merge-base", "HEAD", "main").stdout.strip()
    if _git("cat-file", "-e", f"{base}:polymodal/media/object3d.py").returncode == 0:
        pytest.skip("main has the modality already: this branch is not the one that added it (a later branch may "
                    "change generic files, e.g. one reading the spec); the naming test keeps holding")
    changed = set(_git("diff", "--name-only", base, "--").stdout.split())
    changed |= set(_git("ls-files", "--others", "--exclude-standard").stdout.split())
    product = {p for p in changed if _in_product(p)}
    other = {p for p in product if not _declared(p)}
    assert other == set(), f"the branch changed other product files: {other}"
