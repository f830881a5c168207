"""``python -m training.align --stage decode --data builtin --out runs/decode`` (as ``polymodal train ...``)."""

from training.align.cli import main

main()
