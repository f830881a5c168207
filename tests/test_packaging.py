"""The wheel holds what an installed polymodal needs: every top-level package (a package missing from pyproject's
discovery would be absent from the wheel and the Docker image while the editable ``make test`` passes), every
module of each, and the shipped toy build (package data) file for file."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("polymodal", "projectors", "decoders", "services", "skills", "mosit", "training")
ASSETS = ROOT / "polymodal" / "assets"


def _source_files(pkg: str) -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / pkg).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def test_wheel_holds_every_package_and_the_toy_assets(tmp_path):
    # build from a copy: setuptools writes build/ and *.egg-info next to the sources
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                        "--no-index", "-q", "-w", str(tmp_path / "dist")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    build_s = time.perf_counter() - t0
    (wheel,) = (tmp_path / "dist").glob("polymodal-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == set(PACKAGES)
    for pkg in PACKAGES:
        modules = {f for f in _source_files(pkg) if f.endswith(".py")}
        assert modules, pkg
        missing = sorted(modules - names)
        assert not missing, f"{pkg}: modules missing from the wheel: {missing[:10]}"
    shipped = {p.relative_to(ROOT).as_posix() for p in ASSETS.rglob("*") if p.is_file()}
    assert len(shipped) > 40 and any(s.endswith(".safetensors") for s in shipped)
    missing = sorted(shipped - names)
    assert not missing, f"shipped toy assets missing from the wheel: {missing[:10]}"
    assert "training/toyworld/mosit.yaml" in names  # the toy MosIT config `polymodal toyworld build` reads
    page = {p.relative_to(ROOT).as_posix() for p in (ROOT / "services" / "web").iterdir() if p.is_file()}
    assert {"services/web/index.html", "services/web/page.js", "services/web/view.js"} <= page
    assert page <= names, f"the chat page's files missing from the wheel: {sorted(page - names)}"
    assert build_s < 120, f"wheel build took {build_s:.1f} s"
