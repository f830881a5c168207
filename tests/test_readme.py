"""The README's Python blocks run as written against ``make serve`` (the ``toy`` preset on port 8000): each block is
run on its own (a fresh namespace, in a temporary folder; in this process, so the clients are imported once) against
a ``--no-ray`` host of that preset (tests/local_server.py), the only change being the port of
``http://127.0.0.1:8000``. A block whose first line is ``# with: polymodal serve --preset NAME ...``
runs against that preset instead. What a block prints is checked where the README says what it prints."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
WITH = re.compile(r"^# with: polymodal serve --preset (?P<preset>[\w-]+)")
IN_PROCESS = "# in process"  # a block that uses a library in process: run as written, no server
SERVED = {"toy": "toy_server", "toy-grounding": "toy_grounding_server"}
# what the README says a block prints: (a phrase of the block, text its output must contain)
PRINTS = [
    ("Describe it and make a matching sound.", "a red circle."),  # names what the photo shows
    ("What colour is it?", "red"),
    ("Where is the blue square?", "blue square"),
]


def python_blocks() -> list[tuple[int, str]]:
    """(line number, dedented code) of every fenced Python block of the README."""
    text = README.read_text()
    return [(text[:m.start()].count("\n") + 1, textwrap.dedent(m.group("body"))) for m in FENCE.finditer(text)]


BLOCKS = python_blocks()


def test_the_readme_has_its_python_blocks():
    assert len(BLOCKS) >= 6, [line for line, _ in BLOCKS]
    assert sum("```python" in line for line in README.read_text().splitlines()) == len(BLOCKS)  # none missed
    for _, code in BLOCKS:
        if code.startswith(IN_PROCESS):
            assert "http://127.0.0.1:8000" not in code
            continue
        m = WITH.match(code)
        assert (m.group("preset") if m else "toy") in SERVED and "http://127.0.0.1:8000" in code


@pytest.mark.timeout(600)
@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"line{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs(line, code, request, tmp_path, monkeypatch, capsys):
    m = WITH.match(code)
    base = None if code.startswith(IN_PROCESS) else request.getfixturevalue(SERVED[m.group("preset") if m else "toy"])
    monkeypatch.chdir(tmp_path)  # the blocks write their files where they run
    code = code if base is None else code.replace("http://127.0.0.1:8000", base)
    exec(compile(code, f"README.md:{line}", "exec", dont_inherit=True), {"__name__": "__main__"})  # not this file's __future__ flags
    printed = capsys.readouterr().out
    for phrase, expected in PRINTS:
        if phrase in code:
            assert expected in printed, f"README line {line} printed:\n{printed}"
