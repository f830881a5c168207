"""``detect_objects``: an open-vocabulary object detector over transformers (OWL-ViT), by hub id or local folder.

Minderer et al., 2022 ("Simple Open-Vocabulary Object Detection with Vision Transformers"): a CLIP whose image
patches each predict a box, scored against the embeddings of text queries ("a photo of a cat"). The real
checkpoints (``google/owlvit-base-patch32``: 153 M parameters) want a GPU for interactive use; they cannot be
downloaded here, so the tests load a tiny random folder written by :func:`save_tiny_owlvit` in the real on-disk
layout (``config.json``, ``model.safetensors``, tokenizer and processor files).

Loading is strict, like the decoders and encoders: a folder with missing, unexpected or mismatched weights is an
error (:class:`skills.base.SkillLoadError`), never a half-random model. Architectures are a registry keyed by the
folder's ``config.json`` ``model_type`` (:data:`OBJECT_DETECTORS`).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from pydantic import Field, field_validator

from polymodal.grounding.boxes import GroundedPhrase
from polymodal.types import MediaPart
from skills.base import Skill, SkillLoadError, SkillParams, SkillResult, input_image

# config.json model_type -> (transformers model class, processor class)
OBJECT_DETECTORS: dict[str, tuple[str, str]] = {
    "owlvit": ("OwlViTForObjectDetection", "OwlViTProcessor"),
}


class DetectObjectsParams(SkillParams):
    """Arguments of ``detect_objects``."""

    queries: list[str] = Field(min_length=1, max_length=16,
                               description="what to look for, one short phrase each (e.g. 'a photo of a cat')")
    image_index: int = Field(0, ge=0, description="which input image (0-based among the request's images)")
    threshold: float = Field(0.1, ge=0.0, le=1.0, description="keep boxes scoring above this (sigmoid score)")
    nms_iou: float = Field(0.3, ge=0.0, le=1.0,
                           description="drop a box overlapping a better one of the same query by more than this IoU")
    max_detections: int = Field(20, ge=1, le=100, description="keep at most this many boxes (best first)")

    @field_validator("queries")
    @classmethod
    def _phrases(cls, v: list[str]) -> list[str]:
        out = [q.strip() for q in v]
        if any(not q or len(q) > 200 for q in out):
            raise ValueError("each query must be 1..200 characters of text")
        return out


def _nms(boxes: np.ndarray, scores: np.ndarray, iou_max: float) -> list[int]:
    """Greedy non-maximum suppression; boxes (K, 4) x1, y1, x2, y2. Returns kept indices, best first."""
    order = list(np.argsort(-scores, kind="stable"))
    keep: list[int] = []
    area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    while order:
        i = order.pop(0)
        keep.append(int(i))
        if not order:
            break
        rest = np.asarray(order)
        ix1 = np.maximum(boxes[i, 0], boxes[rest, 0])
        iy1 = np.maximum(boxes[i, 1], boxes[rest, 1])
        ix2 = np.minimum(boxes[i, 2], boxes[rest, 2])
        iy2 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
        union = area[i] + area[rest] - inter
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
        order = [int(j) for j, o in zip(rest, iou) if o <= iou_max]
    return keep


def load_object_detector(path: str, *, device: str = "cpu", dtype: str = "auto"):
    """``(model, processor, model_type)`` from a local folder or hub id, loaded strictly.

    Raises:
        SkillLoadError: no such folder (and the hub unreachable), a ``model_type`` outside
            :data:`OBJECT_DETECTORS` (lists the choices), missing / unexpected / mismatched weights, or a
            processor that cannot be built.
    """
    import transformers

    from skills.hf_loading import load_strict, read_model_type

    model_type = read_model_type(path, "detect_objects", example="google/owlvit-base-patch32")
    if model_type not in OBJECT_DETECTORS:
        raise SkillLoadError(f"detect_objects: {path!r} holds a {model_type!r} model; choose a folder of: "
                             f"{', '.join(OBJECT_DETECTORS)}")
    model_name, processor_name = OBJECT_DETECTORS[model_type]
    processor_cls = getattr(transformers, processor_name)
    model = load_strict(model_name, path, device=device, dtype=dtype, what="detect_objects")
    try:
        processor = processor_cls.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SkillLoadError(f"detect_objects: cannot load {processor_name} from {path!r}: {e}") from e
    return model, processor, model_type


class DetectObjectsSkill(Skill):
    """Open-vocabulary detection (OWL-ViT): text queries -> boxes with scores."""

    name = "detect_objects"
    description = ("Find objects described in words (open vocabulary, OWL-ViT) in an image; returns boxes in pixels "
                   "with the query each matched and a score.")
    Params = DetectObjectsParams
    accepts = ("image", "text")
    returns = ("text", "boxes", "data")
    weight = "gpu"

    def __init__(self, path: str, *, device: str = "cpu", dtype: str = "auto"):
        """Load the detector at ``path`` (a hub id or a folder) onto ``device``: fp32 on CPU, ``dtype``
        (``auto`` = float16) elsewhere.

        Raises:
            SkillLoadError: see :func:`load_object_detector`.
        """
        self.path = path
        self.device = device
        self.model, self.processor, self.model_type = load_object_detector(path, device=device, dtype=dtype)
        text_cfg = getattr(self.model.config, "text_config", None)
        self.max_text_tokens = int(getattr(text_cfg, "max_position_embeddings", 16))
        self._lock = threading.Lock()

    def _run(self, params: DetectObjectsParams, media: tuple[MediaPart, ...]) -> SkillResult:
        import torch
        from PIL import Image

        image = input_image(media, params.image_index, min_side_px=2)
        h, w = image.shape[:2]
        queries = list(params.queries)
        inputs = self.processor(text=[queries], images=Image.fromarray(image), return_tensors="pt",
                                padding="max_length", truncation=True, max_length=self.max_text_tokens)
        inputs = {k: (v.to(self.device, self.model.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items()}
        with self._lock, torch.inference_mode():
            outputs = self.model(**inputs)
            (res,) = self.processor.post_process_grounded_object_detection(
                outputs, threshold=params.threshold, target_sizes=[(h, w)], text_labels=[queries])
        boxes = res["boxes"].float().cpu().numpy().reshape(-1, 4)
        scores = res["scores"].float().cpu().numpy().reshape(-1)
        labels = res["labels"].cpu().numpy().reshape(-1)
        boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, w)
        boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, h)
        keep: list[int] = []
        for q in range(len(queries)):
            idx = np.flatnonzero(labels == q)
            keep += [int(idx[k]) for k in _nms(boxes[idx], scores[idx], params.nms_iou)]
        keep = sorted(keep, key=lambda i: -float(scores[i]))[:params.max_detections]
        out_boxes, found = [], []
        for i in keep:
            box = tuple(float(v) for v in boxes[i])
            out_boxes.append(GroundedPhrase(queries[int(labels[i])], box, params.image_index))
            found.append({"label": queries[int(labels[i])], "box_px": list(box), "score": round(float(scores[i]), 4)})
        if found:
            shown = "; ".join(f"{f['label']!r} {[int(v) for v in f['box_px']]} ({f['score']:.2f})" for f in found[:5])
            more = f" (+{len(found) - 5} more)" if len(found) > 5 else ""
            text = f"found {len(found)} object(s) in image {params.image_index}: {shown}{more}"
        else:
            text = f"found nothing matching {queries} in image {params.image_index} above score {params.threshold}"
        return SkillResult(self.name, text, boxes=tuple(out_boxes),
                           data={"detections": found, "queries": queries, "image_size_px": [w, h]})


def save_tiny_owlvit(path: str | Path, *, seed: int = 0, image_size_px: int = 64) -> Path:
    """Write a tiny random OWL-ViT (hidden 32, one layer per tower, 16 px patches) with its processor and an
    offline CLIP tokenizer (byte-level characters, no merges) in the real on-disk layout. Returns ``path``.

    The box head's last layer is zero, so every predicted box is OWL-ViT's prior for its patch (a box of one
    patch's size, 1/(image_size_px / 16) of the image a side, on the patch grid) and boxes are well-formed; the
    class scores are random."""
    import torch
    from tokenizers import pre_tokenizers
    from transformers import (CLIPTokenizer, OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor,
                              OwlViTProcessor)

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    # special tokens last: OWL-ViT masks out a query whose first id is 0
    for t in [*alphabet, *(a + "</w>" for a in alphabet), "<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(t, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    config = OwlViTConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size_px, patch_size=16),
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = OwlViTForObjectDetection(config).eval()
        torch.nn.init.zeros_(model.box_head.dense2.weight)
        torch.nn.init.zeros_(model.box_head.dense2.bias)
    size = {"height": image_size_px, "width": image_size_px}
    processor = OwlViTProcessor(image_processor=OwlViTImageProcessor(size=size, crop_size=size), tokenizer=tokenizer)
    path = Path(path)
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path
