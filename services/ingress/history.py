"""An assistant message sent back in a history -> its turn's parts, its media resolved from our own artifacts.

Clients store our answers in different ways (LangChain keeps only ``content``; litellm and the openai SDK keep
the message with its arrays), so an assistant message's media are read from:

1. ``content``: a string's markdown media references (``![image 1](URL)``, ``[audio 1](URL)``; any markdown
   image, and any link whose text is a modality label and a number), each replaced by its medium where it
   stands; the text between them (stripped) stays text. A list of content parts is read part by part.
2. the media arrays named by each modality's spec (``answer_field`` (``images``, ``audios``,
   ``videos``: ``[{"type": "image_url", "image_url": {"url"}}]``), and OpenAI's ``audio`` ``{"id"}``: each
   medium not already taken from ``content`` (same artifact, or same bytes) is appended to the turn.

A medium of a modality this model writes but does not read (a 3D point cloud: no encoder reads it back) stays in
the turn as its reference text (``[<label> 1](URL)``, a data URL as ``[<label> 1]``), after its artifact is checked
like any other: the model sees that it made one there, the conversation goes on, and nothing is decoded.

A URL there must be one of ours (the ``/v1/artifacts/{id}.{ext}`` path on any host, its id in the store) or a
data URL (the medium itself); an unknown or expired id, or a media reference to anything else, is a 400 naming
the field: never fetched, never dropped. Other fields of the message (``parts``, ``boxes``) are
not read. Links in user text stay text.
"""

from __future__ import annotations

import hashlib
from typing import Any

from polymodal import media_io
from polymodal.modality import Modality
from polymodal.types import MediaPart, TextPart

from services.errors import bad_request
from services.ingress.media_input import MediaReader
from services.ingress.media_refs import artifact_id_of, find_media_refs
from services.schemas import ChatMessage, TextContent


class AssistantTurn:
    """Reads one assistant message (``p``: its path, e.g. ``messages[1]``) into turn parts.

    Args:
        media: reads artifacts and data URLs, decodes under the limits.
        p: the message's path in the request (``messages[1]``).
        max_media: how many media the turn may hold (what the request's ``max_media_inputs`` leaves).
    """

    def __init__(self, media: MediaReader, p: str, max_media: int):
        self.media = media
        self.p = p
        self.max_media = max_media
        self.parts: list[TextPart | MediaPart] = []
        self._seen: set[str] = set()  # artifact ids and sha256 of the files already in the turn

    def _written_only(self, mime: str | None, modality: Modality | None = None) -> Modality | None:
        """The modality of a file of ``mime`` (or ``modality``) when this model writes it but does not read it."""
        backend = self.media.backend
        if modality is None:
            mime = (mime or "").split(";", 1)[0].strip().lower()
            modality = next((m for m in backend.output_modalities
                             if mime in {k.lower() for k in m.spec.codec.output_types()}), None)
        ok = modality is not None and modality in backend.output_modalities
        return modality if ok and modality not in backend.input_modalities else None

    def _keep_reference(self, modality: Modality, number: int, url: str, artifact_id: str | None) -> None:
        """An unread medium stays as its reference text (the artifact URL; a data URL is left out)."""
        self.parts.append(TextPart(modality.spec.reference(number, url) if artifact_id else
                                   f"[{modality.spec.label} {number}]"))
        if artifact_id:
            self._seen.add(artifact_id)

    @property
    def n_media(self) -> int:
        return sum(isinstance(x, MediaPart) for x in self.parts)

    def _take(self, part: MediaPart, data: bytes, artifact_id: str | None) -> None:
        if self.n_media >= self.max_media:
            raise bad_request(f"{self.p}: too many media inputs (at most {self.media.limits.max_media_inputs} per "
                              "request, the history included)", param=self.p, code="too_many_media")
        self._seen.update({hashlib.sha256(data).hexdigest(), *([artifact_id] if artifact_id else [])})
        self.parts.append(part)

    def _known(self, data: bytes | None, artifact_id: str | None) -> bool:
        return (artifact_id is not None and artifact_id in self._seen) or (
            data is not None and hashlib.sha256(data).hexdigest() in self._seen)

    async def _artifact(self, url: str, param: str) -> tuple[str, bytes, str]:
        """Our artifact named by ``url`` -> (its MIME type, file, id).

        Raises:
            APIError: 400 ``invalid_history_reference`` when ``url`` is not one of ours; see
            :meth:`MediaReader.stored`.
        """
        artifact_id = artifact_id_of(url)
        if artifact_id is None:
            raise bad_request(f"{param}: an assistant message may refer only to media this server generated (its "
                              f"/v1/artifacts/ URLs); {url[:100]!r} is not one (it is never fetched)", param=param,
                              code="invalid_history_reference")
        mime, data = await self.media.stored(artifact_id, param)
        return mime, data, artifact_id

    async def _decode(self, mime: str, data: bytes, param: str) -> MediaPart:
        modality = media_io.modality_of_mime(mime)
        if modality is None:
            raise bad_request(f"{param}: the artifact is not a medium ({mime})", param=param,
                              code="invalid_history_reference")
        return await self.media.decode(modality, data, mime, param)

    async def read(self, msg: ChatMessage) -> list[TextPart | MediaPart]:
        """The message's parts, in order (content first, then the arrays' other media).

        Raises:
            APIError: 400 naming the field (a reference that is not ours, unknown / expired / failed artifact,
            malformed array item, medium the model does not read), 413 (too large).
        """
        content = msg.content
        if isinstance(content, str):
            await self._text(content, f"{self.p}.content")
        elif content:
            for j, c in enumerate(content):
                if isinstance(c, TextContent):
                    self.parts.append(TextPart(c.text))
                    continue
                part, data = await self.media.read_part_bytes(c, f"{self.p}.content[{j}]", assistant=True)
                self._take(part, data, None)
        extra = msg.model_extra or {}
        for modality in Modality:
            field = modality.spec.answer_field
            await self._array(extra.get(field), modality, f"{self.p}.{field}")
        await self._audio_slot(extra.get("audio"), f"{self.p}.audio")
        return self.parts

    async def _text(self, text: str, param: str) -> None:
        refs = find_media_refs(text)
        if not refs:
            if text:
                self.parts.append(TextPart(text))
            return
        cursor = 0
        numbers: dict[Modality, int] = {}
        for ref in refs:
            if text[cursor:ref.start].strip():
                self.parts.append(TextPart(text[cursor:ref.start].strip()))
            if ref.url.startswith("data:"):  # the medium itself (e.g. a chat UI's inline image): no fetch
                mime, data = await self.media.media_bytes(ref.url, param, assistant=True)
                artifact_id = None
            else:
                mime, data, artifact_id = await self._artifact(ref.url, param)
            unread = self._written_only(mime)
            if unread is not None:
                numbers[unread] = numbers.get(unread, 0) + 1
                self._keep_reference(unread, numbers[unread], ref.url, artifact_id)
            else:
                self._take(await self._decode(mime or "", data, param), data, artifact_id)
            cursor = ref.end
        if text[cursor:].strip():
            self.parts.append(TextPart(text[cursor:].strip()))

    async def _array(self, items: Any, modality, param: str) -> None:
        if items is None:
            return
        key = modality.spec.content_part
        if not isinstance(items, list):
            raise bad_request(f"{param}: expected a list of {{'type': '{key}', '{key}': {{'url': ...}}}}", param=param)
        unread = self._written_only(None, modality)
        for k, item in enumerate(items):
            pk = f"{param}[{k}].{key}.url"
            url = item.get(key, {}).get("url") if isinstance(item, dict) and isinstance(item.get(key), dict) else None
            if not isinstance(url, str):
                raise bad_request(f"{param}[{k}]: expected {{'type': '{key}', '{key}': {{'url': ...}}}}",
                                  param=f"{param}[{k}]")
            if url.startswith("data:"):
                mime, data = await self.media.media_bytes(url, pk, assistant=True)
                if unread is not None:
                    self._keep_reference(unread, k + 1, url, None)
                elif not self._known(data, None):
                    self._take(await self.media.decode(modality, data, mime, pk), data, None)
                continue
            artifact_id = artifact_id_of(url)
            if artifact_id is not None and self._known(None, artifact_id):
                continue
            mime, data, artifact_id = await self._artifact(url, pk)
            if unread is not None:
                self._keep_reference(unread, k + 1, url, artifact_id)
            elif not self._known(data, None):
                self._take(await self.media.decode(modality, data, mime, pk), data, artifact_id)

    async def _audio_slot(self, audio: Any, param: str) -> None:
        """OpenAI's ``audio: {"id"}`` of an earlier answer: our artifact id (the answer's first sound)."""
        if audio is None:
            return
        artifact_id = audio.get("id") if isinstance(audio, dict) else None
        if not isinstance(artifact_id, str):
            raise bad_request(f"{param}: expected {{'id': ...}} (the id of an earlier answer's audio)", param=param)
        if artifact_id in self._seen:
            return
        mime, data = await self.media.stored(artifact_id, f"{param}.id")
        if not self._known(data, None):
            self._take(await self._decode(mime, data, f"{param}.id"), data, artifact_id)
