"""A toy world whose media can be checked on CPU (issue 10).

- :mod:`polymodal.toyworld.data`: seeded procedural images (coloured shapes), tones, moving-shape videos
  with captions, written as files + ``catalog.jsonl``.
- :mod:`polymodal.toyworld.checkers`: read a medium back (colour and shape, pitch and timbre, direction).
- :mod:`polymodal.toyworld.train`: toy decoders trained from scratch, saved as stock diffusers pipelines
  that ``decoders.build_decoder`` loads (``decoder_config``).
- :mod:`polymodal.toyworld.cli`: ``polymodal toyworld data | train-decoders | check | score-decoder``.
"""
