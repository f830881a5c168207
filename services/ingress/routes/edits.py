"""``POST /v1/images/edits`` (OpenAI's multipart shape, issue #27): an image edited as the prompt asks.

Form fields: ``image`` (one file; ``image[]`` with one file, as the OpenAI SDK sends a list, is the same), optional
``mask`` (a PNG with alpha: its fully transparent pixels mark where the image may change, OpenAI's convention;
the same size as the image), ``prompt``, ``n``, ``size``, ``response_format`` and the extensions of
:class:`services.schemas.ImageEditRequest` (``seed``, ``num_inference_steps``, ``guidance_scale``, and ``strength`` or
``image_guidance_scale``: the one the image decoder's edits read).

The prompt goes through the LLM with the image group required (the source image before it in the user's turn
when the model reads images), as ``/v1/images/generations``; that group is rendered ``n`` times (seeds
``seed + k``) *from the source*: the image decoder's img2img pipeline, or its inpainting pipeline with a mask,
both composed over the loaded weights (:mod:`decoders.base`); an InstructPix2Pix decoder edits with its own
pipeline (the source read at every step; a mask keeps the source's pixels outside it). The source and the mask are
resized to ``size`` (``auto`` or absent: the preset's image size) and the edits have that size. Without a mask the
whole image may change (gpt-image-1's behaviour; an image's own transparency is not read as a mask).

Errors (400 unless said, OpenAI's error body naming the field): not multipart (``image``), no image or more than
one (``image``), an unreadable image (``image``; 413 over the media limit), a mask that is not a PNG with alpha or
of another size (``mask``), a bad field (its name), ``strength x num_inference_steps < 1`` (``strength``), the edit
option the decoder does not read (``strength`` / ``image_guidance_scale``, ``unsupported_parameter``).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from polymodal import media_io
from polymodal.media.image import decode_edit_mask, resize_image, resize_mask
from polymodal.modality import Modality
from polymodal.types import EditSource

from services.errors import bad_request
from services.ingress.edit_sources import EDIT_OPTION_FIELDS, check_edit_options, decoder_edit_options
from services.ingress.routes.generations import one_medium_options, run_one_medium
from services.ingress.service import IngressService, get_service, require_api_key
from services.schemas import ImageEditRequest

router = APIRouter(dependencies=[Depends(require_api_key)])

FILE_FIELDS = ("image", "image[]", "mask")


async def _read_form(request: Request):
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise bad_request("send multipart/form-data with the image file as 'image' (OpenAI's images.edit shape)",
                          param="image", code="invalid_request")
    try:
        return await request.form()
    except Exception as e:  # noqa: BLE001 - python-multipart's parse errors vary
        raise bad_request(f"unreadable multipart body ({e})", param="image", code="invalid_request") from None


def _fields(form) -> ImageEditRequest:
    """The form's text fields -> :class:`ImageEditRequest`.

    Raises:
        APIError: 400 naming the field (a file where text belongs, a missing or invalid field).
    """
    fields = {}
    for key, value in form.multi_items():
        if key in FILE_FIELDS:
            continue
        if isinstance(value, UploadFile):
            if key in ImageEditRequest.model_fields:
                raise bad_request(f"{key}: expected a text field, got a file", param=key)
            continue  # unknown fields are ignored, as in every request schema (extra="ignore")
        fields[key] = value
    try:
        return ImageEditRequest.model_validate(fields)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"]) or "prompt"
        raise bad_request(f"{param}: {err['msg']}", param=param, code="invalid_value") from None


async def _file(form, names: tuple[str, ...], param: str, svc: IngressService, *, required: bool) -> UploadFile | None:
    files = [v for n in names for v in form.getlist(n)]
    if any(not isinstance(f, UploadFile) for f in files):
        raise bad_request(f"{param}: expected a file upload", param=param)
    if not files:
        if required:
            raise bad_request(f"{param}: the image to edit is missing (a file field named 'image')", param=param,
                              code="missing_required_parameter")
        return None
    if len(files) > 1:
        raise bad_request(f"{param}: this server edits one image per request, got {len(files)}", param=param,
                          code="unsupported_parameter")
    return files[0]


@router.post("/v1/images/edits")
async def images_edits(request: Request, svc: IngressService = Depends(get_service)):
    form = await _read_form(request)
    body = _fields(form)
    overrides = svc.planner.parse_size(body.size)
    overrides.update(body.model_dump(include={"num_inference_steps", "guidance_scale", *EDIT_OPTION_FIELDS},
                                     exclude_none=True))
    options = one_medium_options(svc, body, Modality.IMAGE, overrides)
    edit_options = await decoder_edit_options(svc.backend, Modality.IMAGE, svc.planner.edit_options_cache)
    check_edit_options(edit_options, Modality.IMAGE, overrides, options, "")
    image_file = await _file(form, ("image", "image[]"), "image", svc, required=True)
    mask_file = await _file(form, ("mask",), "mask", svc, required=False)
    limits = svc.media.media_limits
    try:
        part = await asyncio.to_thread(media_io.decode_media, Modality.IMAGE, await image_file.read(), limits=limits)
    except media_io.MediaError as e:
        raise svc.media.media_error(e, "image") from None
    mask = None
    if mask_file is not None:
        try:
            mask = await asyncio.to_thread(decode_edit_mask, await mask_file.read(), limits)
        except media_io.MediaError as e:
            raise svc.media.media_error(e, "mask") from None
        if mask.shape != part.data.shape[:2]:
            raise bad_request(f"mask: {mask.shape[1]}x{mask.shape[0]} but the image is "
                              f"{part.data.shape[1]}x{part.data.shape[0]}; they must be the same size", param="mask",
                              code="invalid_value")
    h, w = options.height_px, options.width_px
    source = EditSource(Modality.IMAGE, await asyncio.to_thread(resize_image, part.data, h, w),
                        None if mask is None else resize_mask(mask, h, w))
    media = (part,) if Modality.IMAGE in svc.backend.input_modalities else ()
    return await run_one_medium(svc, request, body, Modality.IMAGE, options, "img", kind="img-edit", media=media,
                                edit_source=source)
