"""Shared test settings.

One torch thread per test process: the tiny models gain nothing from more, and on a 2-core machine
shared with Ray workers, oversubscribed threads made tiny generations 10-30x slower.
"""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)
