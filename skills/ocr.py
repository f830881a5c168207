"""``ocr``: PP-OCR (text detection + recognition ONNX models inside the rapidocr-onnxruntime 1.4.4 wheel).

rapidocr-onnxruntime is installed ``--no-deps`` (its metadata wants ``opencv-python``, a second ``cv2/`` that
would replace the headless 4.x and its Haar cascades); its runtime imports (onnxruntime, pyclipper, shapely,
PyYAML, Pillow, numpy, cv2) are polymodal dependencies. Version 2+ downloads its models at run time: not here.

The recogniser is PP-OCRv4's Chinese + English model: it reads Latin letters and digits well but drops the spaces
between words ("OPEN THE POD BAY DOORS" -> "OPENTHEPODBAYDOORS"). Quadrilaterals become axis-aligned boxes.
One engine per process (:func:`ocr_engine`), built on first use; rapidocr's ``__call__`` writes its thresholds
onto the engine, so calls run one at a time under a lock (ONNX Runtime spreads one call over its threads).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
from pydantic import Field

from polymodal.grounding.boxes import GroundedPhrase
from polymodal.types import MediaPart
from skills.base import Skill, SkillError, SkillParams, SkillResult, input_image


class OcrParams(SkillParams):
    """Arguments of ``ocr``."""

    image_index: int = Field(0, ge=0, description="which input image (0-based among the request's images)")
    min_score: float = Field(0.5, ge=0.0, le=1.0, description="drop lines recognised with a lower confidence")
    box_threshold: float = Field(0.5, ge=0.0, le=1.0, description="text-detector score a region needs")
    unclip_ratio: float = Field(1.6, ge=1.0, le=3.0, description="how far detected text regions are grown")
    use_angle_classifier: bool = Field(True, description="turn upside-down lines before reading them")
    max_lines: int = Field(100, ge=1, le=1000, description="keep at most this many lines (reading order)")


_ENGINE = None
_ENGINE_BUILD_LOCK = threading.Lock()
_ENGINE_CALL_LOCK = threading.Lock()


def default_threads() -> int:
    """ONNX Runtime intra-op threads of the engine: ``POLYMODAL_OCR_THREADS``, else min(2, CPUs)."""
    env = os.environ.get("POLYMODAL_OCR_THREADS", "").strip()
    if env:
        return max(1, int(env))
    return max(1, min(2, os.cpu_count() or 1))


def ocr_engine(threads: int | None = None):
    """The process's ``RapidOCR`` engine, built on the first call (thread-safe; ``threads`` only matters then).

    Raises:
        SkillError: rapidocr-onnxruntime is not installed (says how to install it).
    """
    global _ENGINE
    if _ENGINE is None:
        with _ENGINE_BUILD_LOCK:
            if _ENGINE is None:
                try:
                    from rapidocr_onnxruntime import RapidOCR
                except ImportError as e:
                    raise SkillError(f"OCR is unavailable: {e}. Install it with "
                                     "`pip install --no-deps rapidocr-onnxruntime==1.4.4`") from e
                n = threads or default_threads()
                _ENGINE = RapidOCR(intra_op_num_threads=n, inter_op_num_threads=1, print_verbose=False)
    return _ENGINE


def ocr_model_files() -> list[Path]:
    """The ONNX files rapidocr-onnxruntime ships (detection, angle classification, recognition), located
    without building an engine. Raises ``ImportError`` when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("rapidocr_onnxruntime is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    return sorted((root / "models").glob("*.onnx"))


def _reading_order(lines: list[tuple[np.ndarray, str, float]]) -> list[tuple[np.ndarray, str, float]]:
    """Top to bottom; lines whose vertical centres are within half a line height read left to right."""
    if not lines:
        return lines
    heights = [float(q[:, 1].max() - q[:, 1].min()) for q, _, _ in lines]
    band = max(1.0, 0.5 * float(np.median(heights)))
    return sorted(lines, key=lambda t: (round(float(t[0][:, 1].mean()) / band), float(t[0][:, 0].min())))


class OcrSkill(Skill):
    """PP-OCR text reading: lines with their boxes and confidences."""

    name = "ocr"
    description = ("Read the text in an image (PP-OCR: text detection + recognition); returns each line with its "
                   "box in pixels and a confidence. Spaces between words are often dropped.")
    Params = OcrParams
    accepts = ("image",)
    returns = ("text", "boxes", "data")
    weight = "heavy"

    def __init__(self, threads: int | None = None):
        """``threads``: ONNX Runtime threads if this builds the process's engine (see :func:`ocr_engine`)."""
        self.threads = threads

    def _run(self, params: OcrParams, media: tuple[MediaPart, ...]) -> SkillResult:
        image = input_image(media, params.image_index, min_side_px=8)
        engine = ocr_engine(self.threads)
        bgr = np.ascontiguousarray(image[:, :, ::-1])  # rapidocr takes arrays as OpenCV's BGR
        with _ENGINE_CALL_LOCK:
            raw, _ = engine(bgr, use_cls=params.use_angle_classifier, box_thresh=params.box_threshold,
                            unclip_ratio=params.unclip_ratio, text_score=params.min_score)
        h_px, w_px = image.shape[:2]
        lines = [(np.asarray(quad, dtype=np.float64).reshape(4, 2), str(text), float(score))
                 for quad, text, score in (raw or []) if str(text).strip()]
        lines = _reading_order(lines)[:params.max_lines]
        boxes, found = [], []
        for quad, text, score in lines:
            box = (float(np.clip(quad[:, 0].min(), 0, w_px)), float(np.clip(quad[:, 1].min(), 0, h_px)),
                   float(np.clip(quad[:, 0].max(), 0, w_px)), float(np.clip(quad[:, 1].max(), 0, h_px)))
            boxes.append(GroundedPhrase(text, box, params.image_index))
            found.append({"text": text, "score": round(score, 4), "box_px": list(box),
                          "quad_px": [[float(x), float(y)] for x, y in quad]})
        if found:
            shown = "; ".join(f"{f['text']!r} ({f['score']:.2f})" for f in found[:10])
            more = f" (+{len(found) - 10} more)" if len(found) > 10 else ""
            summary = f"read {len(found)} line(s) in image {params.image_index}: {shown}{more}"
        else:
            summary = f"read no text in image {params.image_index} ({w_px}x{h_px} px)"
        return SkillResult(self.name, summary, boxes=tuple(boxes),
                           data={"lines": found, "text": "\n".join(f["text"] for f in found),
                                 "image_size_px": [w_px, h_px]})
