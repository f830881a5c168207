"""The offline wing: what trains and converts the parts the runtime serves.

- :mod:`training.align`: NExT-GPT's three alignment stages (encode, decode, instruct), in one process or on Ray
  Train (``polymodal train``).
- :mod:`training.convert`: released checkpoints (NExT-GPT's 7b_tiva_v0 delta) -> export folders
  (``polymodal convert``).
- :mod:`training.toyworld`: the toy world: procedural data, toy decoders and encoder trained from scratch,
  checkers, the MosIT recipe, the whole build (``polymodal toyworld``); the runtime reads its result through
  :mod:`polymodal.presets.toy`.

Layer: above the runtime and :mod:`mosit` (it imports both); imported only by the composition root
(:mod:`polymodal.cli`, inside the sub-commands) and ``bench/``. The contracts in pyproject's
``[tool.importlinter]`` hold this (tests/test_architecture.py).
"""
