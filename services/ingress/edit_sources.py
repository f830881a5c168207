"""What a chat edit renders from (issue #27): the edited modality and its source medium.

The rule (also in :mod:`services.ingress` and the README):

- ``edit: "<artifact id or artifact URL>"``: that stored medium, read from the store only (never fetched); an image
  artifact is an image edit, a video artifact a video edit (video-to-video).
- ``edit: true``: a video edit when the request's ``modalities`` ask for video and not for an image, else an image
  edit; the source is the last medium of that kind the last user message holds (uploaded, or one of our artifact
  URLs), else the conversation's most recent one (an earlier answer's medium sent back in the history counts: it
  resolves from the store).

The source is brought to the answer's size: an image resized to ``image.height_px`` x ``width_px``; a video's frames
resized to ``video.height_px`` x ``width_px`` and sampled evenly to ``video.num_frames`` (the edit keeps its
length). The whole medium may change (no mask in chat). Refusals are 400s with param ``edit`` (``image.strength`` /
``video.strength`` for a strength that leaves no denoising step).

Edit options (:func:`check_edit_options`): a decoder's edits read ``strength`` (SDEdit-style: img2img, inpainting,
video-to-video) or ``image_guidance_scale`` (InstructPix2Pix, which reads its source at every step and noises
nothing), as its deployment describes it (``edit_options``; :meth:`decoders.base.Decoder.edit_options`). An edit
request that sets the other one is refused (400, ``unsupported_parameter``, naming it), never silently ignored.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from polymodal.config import DecoderDefaults
from polymodal.modality import Modality
from polymodal.types import EditSource, MediaPart, Turn

from services.errors import bad_request
from services.ingress.media_input import MediaReader
from services.ingress.media_refs import artifact_id_of

_ARTIFACT_ID = re.compile(r"^art_[A-Za-z0-9_-]{8,60}$")


@dataclasses.dataclass(frozen=True)
class EditRef:
    """A chat ``edit`` resolved before planning: ``modality`` edited, and the stored file when ``edit`` named an
    artifact (``data``: its bytes; ``None`` for ``edit: true``, whose source is read from the turns)."""

    modality: Modality
    data: bytes | None = None


def _inputs(turns: Sequence[Turn], modality: Modality) -> list[MediaPart]:
    return [p for t in turns for p in t.parts if isinstance(p, MediaPart) and p.modality is modality]


async def resolve_edit(media: MediaReader, edit: bool | str, modalities: list[str] | None) -> EditRef:
    """The edited modality of a chat request's ``edit`` (and the artifact's bytes when it names one).

    Raises:
        APIError: 400 ``edit``: a string that is not one of our artifact ids / URLs (``invalid_history_reference``),
        an unknown / expired / failed artifact (``artifact_not_found`` / ``artifact_failed``), an artifact that is
        neither an image nor a video (``invalid_value``).
    """
    if edit is True:  # the first editable medium the request asks for (image before video), else an image
        asked = {str(m).lower() for m in modalities or ()}
        return EditRef(next((m for m in EDITABLE if m.value in asked), EDITABLE[0]))
    ref = str(edit).strip()
    artifact_id = artifact_id_of(ref) or (ref if _ARTIFACT_ID.match(ref) else None)
    if artifact_id is None:
        raise bad_request("edit: expected true or one of this server's artifact ids / URLs "
                          f"(/v1/artifacts/...); got {ref[:100]!r} (never fetched)", param="edit",
                          code="invalid_history_reference")
    mime, data = await media.stored(artifact_id, "edit")
    kind = (mime or "").split("/")[0]
    modality = next((m for m in EDITABLE if m.value == kind), None)
    if modality is None:
        raise bad_request(f"edit: artifact {artifact_id} is {mime}; a chat edit changes an image or a video",
                          param="edit", code="invalid_value")
    return EditRef(modality, data)


async def edit_source(media: MediaReader, ref: EditRef, turns: Sequence[Turn], options: DecoderDefaults) -> EditSource:
    """The :class:`EditSource` of a resolved edit (see the module's rule), at the answer's size.

    Raises:
        APIError: 400: no medium of the kind in the conversation (``no_image_to_edit`` / ``no_video_to_edit``); a
        stored file that does not decode as its kind.
    """
    from polymodal import media_io

    m = ref.modality
    if ref.data is None:
        found = _inputs(turns[-1:], m) or _inputs(turns, m)
        if not found:
            raise bad_request(f"edit: the conversation holds no {m.value} to edit (send one, refer to one of this "
                              "server's artifact URLs, or give its id as edit)", param="edit",
                              code=f"no_{m.value}_to_edit")
        data = found[-1].data
    else:  # our own file: a video is sampled at the answer's frame count (the server's limit bounds it)
        frames = options.num_frames
        limits = dataclasses.replace(media.media_limits, max_video_frames_sampled=max(
            media.media_limits.max_video_frames_sampled, frames))
        try:  # a file that does not decode as its kind is a MediaError
            data = media_io.decode_media(m, ref.data, limits=limits, num_frames=frames).data
        except media_io.MediaError as e:
            raise media.media_error(e, "edit") from None
    return EditSource(m, FIT[m](data, options))


EDIT_OPTION_FIELDS = ("strength", "image_guidance_scale")
"""The decoder options that only an edit reads; a decoder takes one of them (``edit_options`` of its describe)."""


async def decoder_edit_options(backend, modality: Modality, cache: dict) -> tuple[str, ...] | None:
    """The edit options of ``modality``'s decoder, from the backend's ``describe`` (kept in ``cache`` once read: a
    deployment's decoder does not change its pipeline); ``None`` while it cannot be described (not ready)."""
    if modality not in cache:
        try:
            parts = await backend.describe()
        except Exception:  # noqa: BLE001 - not ready: the decoder is not asked, nothing cached
            return None
        described = (parts.get("decoders") or {}).get(modality.value)
        if not isinstance(described, dict) or "edit_options" not in described:
            return None
        cache[modality] = tuple(described["edit_options"])
    return cache[modality]


def check_edit_options(edit_options: tuple[str, ...] | None, modality: Modality, overrides: dict,
                       options: DecoderDefaults, prefix: str) -> None:
    """Refuse an edit option the decoder does not read, and a strength that leaves no denoising step.

    Args:
        edit_options: :func:`decoder_edit_options` (``None``: unknown; only the strength product is checked).
        overrides: the fields the request set; ``options``: the merged options; ``prefix``: of the field names
            (``"image."`` in chat, ``""`` for ``/v1/images/edits``).

    Raises:
        APIError: 400 naming ``prefix + field``: a set edit option not in ``edit_options`` (``unsupported_parameter``);
        ``strength x num_inference_steps < 1`` for a decoder that reads strength (``invalid_value``).
    """
    for name in EDIT_OPTION_FIELDS:
        if edit_options is not None and name in overrides and name not in edit_options:
            reads = " and ".join(edit_options) or "no edit options"
            raise bad_request(f"{prefix}{name}: this model's {modality.value} decoder does not read it in an edit; "
                              f"its edits read {reads} (GET /v1/models: edit_options)", param=f"{prefix}{name}",
                              code="unsupported_parameter")
    if (edit_options is None or "strength" in edit_options) and options.num_inference_steps * options.strength < 1:
        raise bad_request(f"{prefix}strength {options.strength} x {prefix}num_inference_steps "
                          f"{options.num_inference_steps} leaves no denoising step (the product must be >= 1)",
                          param=f"{prefix}strength", code="invalid_value")


def fit_image(image: np.ndarray, options: DecoderDefaults) -> np.ndarray:
    """uint8 (H', W', 3) -> uint8 (height_px, width_px, 3) of ``options``."""
    from polymodal.media.image import resize_image

    return resize_image(image, options.height_px, options.width_px)


def fit_video(frames: np.ndarray, num_frames: int, height_px: int, width_px: int) -> np.ndarray:
    """uint8 (F', H', W', 3) -> uint8 (num_frames, height_px, width_px, 3): frames sampled evenly (segment centres,
    repeated when F' < num_frames), each resized."""
    from polymodal.media.image import resize_image

    pick = np.minimum(((np.arange(num_frames) + 0.5) * len(frames) / num_frames).astype(int), len(frames) - 1)
    return np.stack([resize_image(frames[i], height_px, width_px) for i in pick])


FIT = {Modality.IMAGE: fit_image,
       Modality.VIDEO: lambda frames, o: fit_video(frames, o.num_frames, o.height_px, o.width_px)}
"""How a source of each editable modality is brought to the answer's size (its decoder options); the registry of
what a chat edit can change (audio cannot: diffusers has no AudioLDM audio-to-audio)."""
EDITABLE: tuple[Modality, ...] = tuple(FIT)
"""The modalities a chat edit can change, in the order ``edit: true`` picks them."""
