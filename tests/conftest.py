"""Shared test settings.

One torch thread per test process: the tiny models gain nothing from more, and on a 2-core machine
shared with Ray workers, oversubscribed threads made tiny generations 10-30x slower.

Session fixtures ``tiny_server``, ``toy_server`` and ``toy_grounding_server``: one real ``--no-ray`` host per preset
(tests/local_server.py), shared by the tests that talk to it with real clients.
"""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_server():
    """A ``--no-ray`` host of the ``tiny`` preset (random weights: fast; for the answer's shape)."""
    from tests.local_server import serve

    yield from serve("tiny")


@pytest.fixture(scope="session")
def toy_server():
    """A ``--no-ray`` host of the ``toy`` preset (what ``make serve`` serves: media that mean something)."""
    from tests.local_server import serve

    yield from serve("toy")


@pytest.fixture(scope="session")
def toy_grounding_server():
    """A ``--no-ray`` host of ``toy-grounding`` (the README's grounding examples)."""
    from tests.local_server import serve

    yield from serve("toy-grounding")
