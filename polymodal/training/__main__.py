"""``python -m polymodal.training --stage decode --data builtin --out runs/decode``."""

from polymodal.training.cli import main

main()
