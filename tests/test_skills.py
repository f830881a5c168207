"""Skills (skills/): the install, the registry and schemas, and each built-in on real photos (scikit-image) or toy
shapes: detect (Haar cascades), ocr (PP-OCR), segment (GrabCut), generate_* (tiny and toy decoders),
detect_objects (OWL-ViT from a tiny random folder). Failures come back as error results, never exceptions."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

import skills
from polymodal.grounding.boxes import box_iou
from polymodal.modality import Modality
from polymodal.types import MediaPart
from skills import SKILLS, SkillLoadError, SkillMask, build_skill, get_skill, images, mask_iou

skimage_data = pytest.importorskip("skimage.data")

ROOT = Path(__file__).resolve().parent.parent

# The astronaut's face in skimage.data.astronaut() (512 x 512), written by hand from the photo: hairline to chin,
# ear to ear (x1, y1, x2, y2).
ASTRONAUT_FACE_PX = (180.0, 75.0, 268.0, 165.0)
# The cat's face in skimage.data.chelsea() (451 x 300): it fills the frame (ears cut off at the top).
CHELSEA_FACE_PX = (40.0, 0.0, 400.0, 300.0)


def _toy():
    """The toy world's renderer and checkers (one import site: they move with the toy world)."""
    from training.toyworld import checkers, data

    return data, checkers


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage_data.astronaut()


@pytest.fixture(scope="module")
def chelsea() -> np.ndarray:
    return skimage_data.chelsea()


# ---- install ---------------------------------------------------------------------------------------------------
def test_opencv_is_headless_4x_with_its_haar_cascades():
    import cv2

    assert int(cv2.__version__.split(".")[0]) < 5, f"cv2 {cv2.__version__}: 5.x ships no Haar cascades"
    folder = Path(cv2.data.haarcascades)
    for name in ("haarcascade_frontalface_default.xml", "haarcascade_frontalcatface.xml", *skills.CASCADES.values()):
        assert (folder / name).is_file(), f"{name} missing from {folder}"
    with pytest.raises(metadata.PackageNotFoundError):  # a second cv2/ would shadow the headless one
        metadata.distribution("opencv-python")


def test_rapidocr_imports_and_ships_its_onnx_models():
    import rapidocr_onnxruntime  # noqa: F401

    from skills.ocr import ocr_model_files

    files = {p.name: p for p in ocr_model_files()}
    for kind in ("det", "rec", "cls"):
        hits = [p for n, p in files.items() if f"_{kind}_" in n]
        assert hits and hits[0].stat().st_size > 100_000, f"no {kind} model among {sorted(files)}"
    assert metadata.version("rapidocr-onnxruntime") == "1.4.4"


def test_importing_skills_loads_no_heavy_library():
    code = ("import sys, skills; print(sorted(m for m in ('torch', 'cv2', 'onnxruntime', 'transformers', "
            "'diffusers', 'rapidocr_onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_skills_is_in_package_discovery():
    import tomllib

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert "skills*" in find["include"]


# ---- registry and schemas ----------------------------------------------------------------------------------------
def test_registry_lists_the_builtins_and_refuses_unknown_names():
    assert set(SKILLS) == {"detect", "ocr", "segment", "generate_image", "generate_audio", "generate_video",
                           "detect_objects", "transcribe", "synthesize_speech"}
    assert get_skill("detect") is skills.DetectSkill
    with pytest.raises(ValueError, match="choose from: detect, ocr, segment"):
        get_skill("sam")
    with pytest.raises(ValueError, match="unknown skill"):
        build_skill("sam")
    with pytest.raises(ValueError, match="unknown skill"):
        skills.skill_specs(["detect", "sam"])


def test_schemas_are_valid_json_schema_and_agree_with_validation():
    from jsonschema import Draft202012Validator

    for spec in skills.skill_specs():
        Draft202012Validator.check_schema(spec.parameters)
        assert spec.parameters["type"] == "object" and spec.parameters.get("additionalProperties") is False
        tool = spec.as_openai_tool()
        assert tool["type"] == "function" and tool["function"]["name"] == spec.name
        assert json.loads(json.dumps(spec.to_dict()))["accepts"] == list(spec.accepts)
        assert spec.weight in ("light", "heavy", "gpu")
    detect = Draft202012Validator(get_skill("detect").spec().parameters)
    assert detect.is_valid({"target": "cat_face", "scale_factor": 1.2})
    assert not detect.is_valid({"target": "dog"}) and not detect.is_valid({"scale_factor": 1.0})
    assert set(detect.schema["properties"]["target"]["enum"]) == set(skills.CASCADES)
    segment = Draft202012Validator(get_skill("segment").spec().parameters)
    assert segment.is_valid({"box_px": [1, 2, 30, 40]}) and not segment.is_valid({})
    assert "caption" in get_skill("generate_image").spec().parameters["required"]


def test_invalid_arguments_are_error_results_listing_the_choices(astronaut):
    det = build_skill("detect")
    r = det.run({"target": "dog"}, images(astronaut))
    assert not r.ok and r.error_code == "invalid_arguments"
    assert "'cat_face'" in r.error and "'full_body'" in r.error and r.text.startswith("error:")
    for bad in ('{"target": ', "[1, 2]", {"min_neighbours": 3}, {"scale_factor": 5.0}):
        r = det.run(bad, images(astronaut))
        assert r.error_code == "invalid_arguments", (bad, r.error)
    r = build_skill("segment").run({"box_px": [50, 50, 10, 80]}, images(astronaut))
    assert r.error_code == "invalid_arguments" and "x2 > x1" in r.error
    with pytest.raises(ValueError, match="invalid arguments"):
        get_skill("detect").parse({"target": "dog"})
    assert get_skill("detect").parse('{"target": "eye"}').target == "eye"


BAD_IMAGES = {
    "zero-size": np.zeros((0, 0, 3), np.uint8),
    "float": np.zeros((40, 40, 3), np.float32),
    "grey 2-D": np.zeros((40, 40), np.uint8),
    "RGBA": np.zeros((40, 40, 4), np.uint8),
    "one row": np.zeros((1, 40, 3), np.uint8),
}


@pytest.mark.parametrize("name", ["detect", "ocr", "segment"])
def test_bad_images_give_error_results_not_exceptions(name):
    skill = build_skill(name)
    args = {"box_px": [1, 1, 20, 20]} if name == "segment" else {}
    for what, img in BAD_IMAGES.items():
        if what == "one row" and name == "detect":
            continue  # a 40x1 image is a valid (tiny) image for the detector: it finds nothing
        r = skill.run(args, images(img))
        assert not r.ok and r.error_code == "invalid_input", (what, r)
        assert r.boxes == () and r.masks == ()
    r = skill.run(args, ())
    assert r.error_code == "invalid_input" and "has none" in r.error
    r = skill.run({**args, "image_index": 1}, images(np.zeros((40, 40, 3), np.uint8)))
    assert r.error_code == "invalid_input" and "out of range" in r.error
    r = skill.run(args, (MediaPart(Modality.AUDIO, np.zeros(1600, np.float32), sample_rate_hz=16000),))
    assert r.error_code == "invalid_input"


def test_results_are_json_able(astronaut):
    small = np.ascontiguousarray(astronaut[::2, ::2])
    for name, args in (("detect", {}), ("segment", {"box_px": [v / 2 for v in ASTRONAUT_FACE_PX]}), ("ocr", {})):
        r = build_skill(name).run(args, images(small))
        d = json.loads(json.dumps(r.to_dict()))
        assert d["skill"] == name and d["error"] is None and d["elapsed_s"] > 0


# ---- detect -------------------------------------------------------------------------------------------------------
def test_detect_finds_the_astronauts_face(astronaut):
    r = build_skill("detect").run({"target": "face"}, images(astronaut))
    assert r.ok, r.error
    assert len(r.boxes) == 1, r.text
    (b,) = r.boxes
    assert b.phrase == "face" and b.image_index == 0
    assert box_iou(b.box_px, ASTRONAUT_FACE_PX) >= 0.5, (b.box_px, ASTRONAUT_FACE_PX)
    assert r.data["detections"][0]["neighbours"] >= 5
    # the eye cascade finds both eyes, inside the face box
    eyes = build_skill("detect").run({"target": "eye"}, images(astronaut))
    assert len(eyes.boxes) == 2
    for e in eyes.boxes:
        cx, cy = (e.box_px[0] + e.box_px[2]) / 2, (e.box_px[1] + e.box_px[3]) / 2
        assert ASTRONAUT_FACE_PX[0] <= cx <= ASTRONAUT_FACE_PX[2] and ASTRONAUT_FACE_PX[1] <= cy <= ASTRONAUT_FACE_PX[3]


def test_detect_on_chelsea_finds_no_cat_face_only_a_small_wrong_box(chelsea):
    """What OpenCV's cascades do on a close-up cat (recorded, not claimed as a success): at the defaults the
    cat-face cascades find nothing; looser settings give one ~65 px box on the nose and mouth, not the face."""
    det = build_skill("detect")
    for target in ("face", "cat_face", "cat_face_extended", "full_body", "upper_body", "eye"):
        r = det.run({"target": target}, images(chelsea))
        assert r.ok and r.boxes == (), (target, r.text)
    loose = det.run({"target": "cat_face", "scale_factor": 1.05, "min_neighbors": 3}, images(chelsea))
    assert len(loose.boxes) == 1, loose.text
    (b,) = loose.boxes
    assert b.box_px[2] - b.box_px[0] < 80 and box_iou(b.box_px, CHELSEA_FACE_PX) < 0.1, b.box_px


def test_detect_max_size_and_max_detections(astronaut):
    r = build_skill("detect").run({"target": "smile", "max_detections": 3}, images(astronaut))
    assert len(r.boxes) == 3
    r = build_skill("detect").run({"target": "face", "max_size_px": 60}, images(astronaut))
    assert r.ok and r.boxes == ()  # the face is ~93 px


# ---- ocr ----------------------------------------------------------------------------------------------------------
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: the bundled scalable font
    except TypeError:
        pass
    for p in ("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
              "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        if Path(p).is_file():
            return ImageFont.truetype(p, size)
    pytest.skip("no scalable font: Pillow < 10.1 and no DejaVu TTF on this machine")


def _with_line(photo: np.ndarray, text: str, xy=(30, 436), size: int = 28, band=True):
    from PIL import Image, ImageDraw

    im = Image.fromarray(photo)
    draw = ImageDraw.Draw(im)
    font = _font(size)
    box = draw.textbbox(xy, text, font=font)
    if band:
        draw.rectangle((box[0] - 8, box[1] - 8, box[2] + 8, box[3] + 8), fill=(255, 255, 255))
    draw.text(xy, text, font=font, fill=(0, 0, 0))
    return np.asarray(im), box


def _letters(s: str) -> str:
    return "".join(ch for ch in s.upper() if ch.isalnum())


def test_ocr_reads_a_line_drawn_on_a_photo(astronaut):
    words = "OPEN THE POD BAY DOORS"
    img, drawn = _with_line(astronaut, words)
    r = build_skill("ocr").run({}, images(img))
    assert r.ok, r.error
    assert any(_letters(b.phrase) == _letters(words) for b in r.boxes), r.text  # spacing aside
    (line,) = [b for b in r.boxes if _letters(b.phrase) == _letters(words)]
    assert box_iou(line.box_px, drawn) >= 0.5, (line.box_px, drawn)
    assert r.data["lines"][0]["score"] > 0.9


def test_ocr_reads_text_straight_on_a_photo_and_nothing_on_a_plain_one(chelsea):
    img, _ = _with_line(chelsea, "CHELSEA 2024", xy=(20, 12), size=32, band=False)  # on the cat's fur, no band
    r = build_skill("ocr").run({}, images(img))
    assert [_letters(b.phrase) for b in r.boxes] == ["CHELSEA2024"], r.text
    r = build_skill("ocr").run({}, images(np.full((64, 64, 3), 200, np.uint8)))
    assert r.ok and r.boxes == () and "no text" in r.text


def test_ocr_is_safe_from_several_threads(astronaut):
    """rapidocr writes its thresholds onto the shared engine: concurrent calls with different settings must
    give what each gives alone."""
    img, _ = _with_line(astronaut, "OPEN THE POD BAY DOORS")
    ocr = build_skill("ocr")
    settings = [{"min_score": 0.5}, {"min_score": 0.999}]
    alone = [ocr.run(s, images(img)).data["text"] for s in settings]
    got: dict[int, str] = {}

    def call(k: int) -> None:
        got[k] = ocr.run(settings[k % 2], images(img)).data["text"]

    threads = [threading.Thread(target=call, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[k] for k in range(2)] == alone
    assert alone[0] != alone[1]  # the settings differ in effect (0.999 drops the line)


# ---- segment ------------------------------------------------------------------------------------------------------
def _toy_shape(shape: str, seed: int, size_px: int = 64):
    """A toy-world image of ``shape``, its true mask and the mask's tight box."""
    data, _ = _toy()
    img, attrs = data.render_image(np.random.default_rng(seed), size_px=size_px, shape=shape)
    canvas = np.zeros((size_px, size_px, 3), np.uint8)
    truth = data.draw_shape(canvas, shape, (255, 255, 255), attrs["x_px"], attrs["y_px"], attrs["size_px"])[..., 0] > 0
    ys, xs = np.nonzero(truth)
    return img, truth, (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


@pytest.mark.parametrize("shape, box_fill_iou", [("circle", 0.79), ("triangle", 0.5)])
def test_segment_toy_shapes_beats_the_box(shape, box_fill_iou):
    seg = build_skill("segment")
    ious, baseline = [], []
    for seed in range(6):
        img, truth, box = _toy_shape(shape, seed, size_px=96)
        r = seg.run({"box_px": list(box), "label": shape}, images(img))
        assert r.ok, r.error
        (mk,) = r.masks
        assert mk.label == shape and mk.size_hw == truth.shape and mk.area_px == int(mk.to_array().sum())
        ious.append(mask_iou(mk.to_array(), truth))
        filled = np.zeros_like(truth)
        x1, y1, x2, y2 = (int(v) for v in box)
        filled[y1:y2, x1:x2] = True
        baseline.append(mask_iou(filled, truth))
    assert abs(np.mean(baseline) - box_fill_iou) < 0.03, baseline  # what a box-filling answer scores
    assert min(ious) >= 0.85, ious
    assert np.mean(ious) >= np.mean(baseline) + 0.15, (ious, baseline)


def test_segment_shapes_on_a_photo_background():
    """Flat shapes drawn on a real photo (coffee()): GrabCut is exact on circles; triangles sometimes keep some
    background inside the box, but still beat the box clearly on average."""
    from PIL import Image, ImageDraw

    photo = skimage_data.coffee()[::2, ::2].copy()  # 200 x 300
    h, w = photo.shape[:2]
    seg = build_skill("segment")
    for shape, floor in (("circle", 0.95), ("triangle", 0.75)):
        ious = []
        for seed in range(4):
            rng = np.random.default_rng(seed)
            side = int(rng.integers(50, 110))
            x0, y0 = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            im, m = Image.fromarray(photo), Image.new("L", (w, h))
            if shape == "circle":
                box = [x0, y0, x0 + side - 1, y0 + side - 1]
                ImageDraw.Draw(im).ellipse(box, fill=colour)
                ImageDraw.Draw(m).ellipse(box, fill=1)
            else:
                pts = [(x0 + (side - 1) / 2, y0), (x0 + side - 1, y0 + side - 1), (x0, y0 + side - 1)]
                ImageDraw.Draw(im).polygon(pts, fill=colour)
                ImageDraw.Draw(m).polygon(pts, fill=1)
            truth = np.asarray(m) > 0
            ys, xs = np.nonzero(truth)
            r = seg.run({"box_px": [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]}, images(np.asarray(im)))
            ious.append(mask_iou(r.masks[0].to_array(), truth))
        assert np.mean(ious) >= floor, (shape, ious)


def test_segment_refuses_a_box_covering_the_whole_image(astronaut):
    r = build_skill("segment").run({"box_px": [0, 0, 512, 512]}, images(astronaut))
    assert r.error_code == "invalid_input" and "background" in r.error
    r = build_skill("segment").run({"box_px": [600, 600, 700, 700], "margin_px": 0}, images(astronaut))
    assert r.error_code == "invalid_input"


# ---- masks ------------------------------------------------------------------------------------------------------
def test_mask_rle_is_coco_uncompressed_column_major():
    m = np.array([[0, 1], [1, 1]], bool)  # column-major: 0, 1, 1, 1
    assert skills.encode_rle(m) == (1, 3)
    assert skills.encode_rle(np.array([[1, 0], [0, 0]])) == (0, 1, 3)  # starts with a (zero-length) run of 0s
    assert skills.encode_rle(np.zeros((2, 3))) == (6,)
    rng = np.random.default_rng(0)
    for shape in ((1, 1), (5, 7), (33, 20)):
        a = rng.random(shape) > 0.6
        mk = SkillMask.from_array(a, label="x")
        assert sum(mk.counts) == a.size and np.array_equal(mk.to_array(), a)
        assert mk.rle()["size"] == list(shape)
    with pytest.raises(ValueError, match="sum to H"):
        skills.decode_rle((1, 2), (2, 2))


def test_mask_bbox_area_png_and_overlay():
    from PIL import Image
    import io

    a = np.zeros((20, 30), bool)
    a[5:9, 10:16] = True
    mk = SkillMask.from_array(a, label="box", image_index=1)
    assert mk.bbox_px == (10.0, 5.0, 16.0, 9.0) and mk.area_px == 24 and mk.image_index == 1
    png = np.asarray(Image.open(io.BytesIO(mk.png())))
    assert png.shape == (20, 30) and np.array_equal(png > 0, a)
    assert SkillMask.from_array(np.zeros((3, 3))).bbox_px == (0.0, 0.0, 0.0, 0.0)
    img = np.full((20, 30, 3), 100, np.uint8)
    out = skills.draw_masks(img, [mk])
    changed = (out != img).any(-1)
    assert np.array_equal(changed, a)
    with pytest.raises(ValueError, match="mask of size"):
        skills.draw_masks(np.zeros((10, 10, 3), np.uint8), [mk])


# ---- generate_* -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_decoders():
    from decoders import build_decoder
    from polymodal.presets import get_preset

    preset = get_preset("tiny")
    return {m: build_decoder(m, cfg) for m, cfg in preset.decoders.items()}


def test_generate_with_tiny_decoders(tiny_decoders):
    for m, dec in tiny_decoders.items():
        skill = build_skill(f"generate_{m.value}", decoder=dec)
        r = skill.run({"caption": "a red circle", "seed": 3, "num_inference_steps": 2})
        assert r.ok, r.error
        (medium,) = r.media
        assert medium.modality is m and medium.seed == 3 and r.data["caption"] == "a red circle"
        again = skill.run({"caption": "a red circle", "seed": 3, "num_inference_steps": 2}).media[0]
        other = skill.run({"caption": "a blue square", "seed": 3, "num_inference_steps": 2}).media[0]
        assert np.array_equal(again.data, medium.data)  # caption and seed fix the medium
        assert not np.array_equal(other.data, medium.data)  # the caption reaches the decoder
    img = build_skill("generate_image", decoder=tiny_decoders[Modality.IMAGE])
    r = img.run({"caption": "a cat", "height_px": 16, "width_px": 24})
    assert r.media[0].data.shape == (16, 24, 3)
    r = img.run({"caption": "   "})
    assert r.error_code == "invalid_arguments"
    with pytest.raises(ValueError, match="needs a audio decoder"):
        build_skill("generate_audio", decoder=tiny_decoders[Modality.IMAGE])


def test_generate_turns_a_degenerate_medium_into_an_error_result(tiny_decoders):
    from decoders import DecodeError

    class Blank:
        """The tiny image decoder, except that every render is rejected as all black."""

        def __init__(self, inner):
            self.inner, self.modality, self.defaults, self.cond_shape = inner, inner.modality, inner.defaults, \
                inner.cond_shape

        def encode_text(self, captions):
            return self.inner.encode_text(captions)

        def render(self, prompt_embeds, seeds, options=None):
            return [DecodeError(s, "degenerate output: all black") for s in seeds]

    r = build_skill("generate_image", decoder=Blank(tiny_decoders[Modality.IMAGE])).run({"caption": "a cat"})
    assert r.error_code == "failed" and "all black" in r.error and r.media == ()


def test_generate_image_with_the_toy_decoder_draws_the_caption():
    """The toy image decoder was trained on captions: through its own text encoder, "a red circle" comes out as a
    red circle (read back by the toy checker), "a blue triangle" as a blue triangle."""
    from decoders import build_decoder
    from polymodal.presets import get_preset

    _, checkers = _toy()
    try:
        cfg = get_preset("toy").decoders[Modality.IMAGE]
    except FileNotFoundError as e:
        pytest.skip(f"no toy world build: {e}")
    skill = build_skill("generate_image", decoder=build_decoder(Modality.IMAGE, cfg))
    for caption, colour, shape in (("a red circle", "red", "circle"), ("a blue triangle", "blue", "triangle")):
        r = skill.run({"caption": caption})
        assert r.ok, r.error
        reading = checkers.check_image(r.media[0].data)
        assert (reading.colour, reading.shape) == (colour, shape), (caption, reading)


def test_generate_audio_with_the_toy_decoder_sounds_like_the_caption():
    from decoders import build_decoder
    from polymodal.presets import get_preset

    _, checkers = _toy()
    try:
        cfg = get_preset("toy").decoders[Modality.AUDIO]
    except FileNotFoundError as e:
        pytest.skip(f"no toy world build: {e}")
    r = build_skill("generate_audio", decoder=build_decoder(Modality.AUDIO, cfg)).run({"caption": "a high square tone"})
    assert r.ok, r.error
    reading = checkers.check_audio(r.media[0].data, r.media[0].sample_rate_hz)
    assert (reading.pitch, reading.timbre) == ("high", "square"), reading


# ---- detect_objects (OWL-ViT) ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_owlvit(tmp_path_factory) -> Path:
    from skills.objects import save_tiny_owlvit

    return save_tiny_owlvit(tmp_path_factory.mktemp("owlvit") / "tiny-owlvit")


def test_detect_objects_loads_a_tiny_folder_and_returns_boxes_in_pixels(tiny_owlvit, chelsea):
    skill = build_skill("detect_objects", path=str(tiny_owlvit))
    assert skill.model_type == "owlvit"
    queries = ["a cat", "a photo of a nose"]
    r = skill.run({"queries": queries, "threshold": 0.0, "nms_iou": 1.0, "max_detections": 100}, images(chelsea))
    assert r.ok, r.error
    h, w = chelsea.shape[:2]
    n = 64 // 16  # patches a side: the tiny box head (zero last layer) gives each patch's prior box
    assert len(r.boxes) == n * n
    for b in r.boxes:
        x1, y1, x2, y2 = b.box_px
        assert b.phrase in queries and 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        if x2 < w:
            assert abs((x2 - x1) - w / n) < 1.0, b.box_px  # x scaled by the width of the sent image
        if y2 < h:
            assert abs((y2 - y1) - h / n) < 1.0, b.box_px  # y by its height
    scores = [d["score"] for d in r.data["detections"]]
    assert scores == sorted(scores, reverse=True)
    few = skill.run({"queries": queries, "threshold": 0.0, "max_detections": 3}, images(chelsea))
    assert len(few.boxes) == 3
    r = skill.run({"queries": []}, images(chelsea))
    assert r.error_code == "invalid_arguments"
    r = skill.run({"queries": ["a cat"]}, images(np.zeros((0, 5, 3), np.uint8)))
    assert r.error_code == "invalid_input"


def test_detect_objects_loads_strictly(tiny_owlvit, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_owlvit / "model.safetensors"))
    for name, change in (("missing", lambda s: s.pop("box_head.dense2.bias")),
                         ("unexpected",
                          lambda s: s.__setitem__("extra_head.weight", s["box_head.dense2.bias"].clone()))):
        folder = tmp_path / name
        shutil.copytree(tiny_owlvit, folder)
        st = dict(state)
        change(st)
        save_file(st, str(folder / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(SkillLoadError, match=name):
            build_skill("detect_objects", path=str(folder))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "detr"}))
    with pytest.raises(SkillLoadError, match="choose a folder of: owlvit"):
        build_skill("detect_objects", path=str(other))
    with pytest.raises(SkillLoadError, match="not a local folder"):
        build_skill("detect_objects", path=str(tmp_path / "nowhere"))


def test_the_image_build_check_of_the_skills_passes_here():
    """docker/verify_image.py runs the same check at image build time (the Docker image's install)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("verify_image", ROOT / "docker" / "verify_image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.skill_problems() == []
    assert any(p.startswith("rapidocr-onnxruntime") for p in module.NO_DEPS_ON_PURPOSE)
    assert "rapidocr-onnxruntime==" not in (ROOT / "docker" / "requirements.lock").read_text()
    assert "opencv-python-headless==4." in (ROOT / "docker" / "requirements.lock").read_text()
    # the same rapidocr version in make setup and the image
    import re

    make = re.search(r"rapidocr-onnxruntime==(\S+)", (ROOT / "Makefile").read_text()).group(1)
    docker = re.search(r"ARG RAPIDOCR_VERSION=(\S+)", (ROOT / "Dockerfile").read_text()).group(1)
    assert make == docker == metadata.version("rapidocr-onnxruntime")
