"""``detect``: OpenCV's Haar cascades (Viola-Jones) -> boxes in pixels of the sent image.

The cascades ship inside opencv-python-headless 4.x (``cv2.data.haarcascades``; 5.x ships none, hence the pin
``<5``). Frontal faces work on ordinary photos (scikit-image's ``astronaut()``: one box on the face); the cat-face
cascades were trained on small frontal cat faces and miss a close-up (``chelsea()``: nothing at the defaults; at
``scale_factor=1.05, min_neighbors=3`` one 64 px box on the nose and mouth, not the face that fills the frame).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from polymodal.grounding.boxes import GroundedPhrase
from polymodal.types import MediaPart
from skills.base import Skill, SkillError, SkillParams, SkillResult, input_image

# target -> cascade file in cv2.data.haarcascades (every cascade opencv-python-headless 4.x ships)
CASCADES: dict[str, str] = {
    "face": "haarcascade_frontalface_default.xml",
    "face_alt": "haarcascade_frontalface_alt.xml",
    "face_alt2": "haarcascade_frontalface_alt2.xml",
    "face_alt_tree": "haarcascade_frontalface_alt_tree.xml",
    "profile_face": "haarcascade_profileface.xml",
    "eye": "haarcascade_eye.xml",
    "eye_with_glasses": "haarcascade_eye_tree_eyeglasses.xml",
    "left_eye": "haarcascade_lefteye_2splits.xml",
    "right_eye": "haarcascade_righteye_2splits.xml",
    "smile": "haarcascade_smile.xml",
    "cat_face": "haarcascade_frontalcatface.xml",
    "cat_face_extended": "haarcascade_frontalcatface_extended.xml",
    "full_body": "haarcascade_fullbody.xml",
    "upper_body": "haarcascade_upperbody.xml",
    "lower_body": "haarcascade_lowerbody.xml",
    "license_plate": "haarcascade_russian_plate_number.xml",
    "license_plate_16_stages": "haarcascade_license_plate_rus_16stages.xml",
}

# the choices of ``target`` (the JSON schema lists them; anything else is a validation error naming them)
DetectTarget = Literal[tuple(CASCADES)]  # type: ignore[valid-type]


class DetectParams(SkillParams):
    """Arguments of ``detect``."""

    target: DetectTarget = Field("face", description="what to find: which of OpenCV's Haar cascades runs")
    image_index: int = Field(0, ge=0, description="which input image (0-based among the request's images)")
    scale_factor: float = Field(1.1, ge=1.01, le=2.0,
                                description="image pyramid step; smaller finds more sizes, slower")
    min_neighbors: int = Field(5, ge=0, le=50,
                               description="overlapping raw detections a box needs; higher: fewer, surer boxes")
    min_size_px: int = Field(24, ge=8, le=4096, description="smallest box side to look for, in pixels")
    max_size_px: int | None = Field(None, ge=8, le=8192, description="largest box side (none: the whole image)")
    max_detections: int = Field(20, ge=1, le=200, description="keep at most this many boxes (most neighbours first)")
    equalize_histogram: bool = Field(True, description="equalise the grey image first (as OpenCV's samples do)")


_CASCADE_LOCK = threading.Lock()
_CASCADES: dict[str, tuple[object, threading.Lock]] = {}


def cascade_dir() -> Path:
    """The folder of OpenCV's shipped cascades."""
    import cv2

    return Path(cv2.data.haarcascades)


def _cascade(target: str):
    """The loaded classifier of ``target`` and its lock (loaded once per process; a ``CascadeClassifier`` keeps
    scratch buffers, so one call at a time per classifier)."""
    with _CASCADE_LOCK:
        if target not in _CASCADES:
            import cv2

            path = cascade_dir() / CASCADES[target]
            clf = cv2.CascadeClassifier(str(path))
            if clf.empty():
                raise SkillError(f"the {target!r} cascade {path} is missing or unreadable: reinstall "
                                 "opencv-python-headless<5 (5.x ships no cascades)")
            _CASCADES[target] = (clf, threading.Lock())
        return _CASCADES[target]


class DetectSkill(Skill):
    """Haar-cascade detector: faces, eyes, smiles, cat faces, bodies, licence plates."""

    name = "detect"
    description = ("Find objects of one kind in an image with OpenCV's Haar cascades (faces, profile faces, eyes, "
                   "smiles, cat faces, full / upper / lower bodies, licence plates); returns boxes in pixels.")
    Params = DetectParams
    accepts = ("image",)
    returns = ("text", "boxes", "data")
    weight = "light"

    def _run(self, params: DetectParams, media: tuple[MediaPart, ...]) -> SkillResult:
        import cv2

        image = input_image(media, params.image_index)
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        if params.equalize_histogram:
            grey = cv2.equalizeHist(grey)
        clf, lock = _cascade(params.target)
        max_size = (params.max_size_px, params.max_size_px) if params.max_size_px else (0, 0)  # (0, 0): no limit
        with lock:
            rects, neighbours = clf.detectMultiScale2(
                grey, scaleFactor=params.scale_factor, minNeighbors=params.min_neighbors,
                minSize=(params.min_size_px, params.min_size_px), maxSize=max_size)
        rects = np.asarray(rects, dtype=np.int64).reshape(-1, 4)
        neighbours = np.asarray(neighbours, dtype=np.int64).reshape(-1)
        order = sorted(range(len(rects)), key=lambda i: (-int(neighbours[i]), -int(rects[i, 2] * rects[i, 3])))
        order = order[:params.max_detections]
        label = params.target.replace("_", " ")
        boxes, found = [], []
        for i in order:
            x, y, w, h = (int(v) for v in rects[i])
            box = (float(x), float(y), float(x + w), float(y + h))
            boxes.append(GroundedPhrase(label, box, params.image_index))
            found.append({"label": label, "box_px": list(box), "neighbours": int(neighbours[i])})
        h_px, w_px = image.shape[:2]
        if boxes:
            shown = "; ".join(f"[{int(b.box_px[0])}, {int(b.box_px[1])}, {int(b.box_px[2])}, {int(b.box_px[3])}]"
                              for b in boxes[:5])
            more = f" (+{len(boxes) - 5} more)" if len(boxes) > 5 else ""
            text = f"found {len(boxes)} {label}(s) in image {params.image_index} ({w_px}x{h_px} px): {shown}{more}"
        else:
            text = f"found no {label} in image {params.image_index} ({w_px}x{h_px} px)"
        return SkillResult(self.name, text, boxes=tuple(boxes),
                           data={"detections": found, "target": params.target, "image_size_px": [w_px, h_px]})
