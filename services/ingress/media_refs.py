"""How a medium is named in an answer, in one place: the per-modality table, artifact URLs and the markdown
references in ``message.content`` (written by :mod:`~services.ingress.responses`, read back from a history by
:mod:`~services.ingress.history`).

The per-modality facts of the answer's shape come from each modality's registered spec
(:class:`polymodal.modality.ModalitySpec`: ``label``, ``answer_field``, ``inline_markdown``, ``content_part``,
``message_slot``; the artifact's extension is ``spec.codec.extension(its MIME type)``).

A reference is ``![image 1](URL)`` for a modality shown inline (images) and ``[audio 1](URL)`` /
``[video 1](URL)`` for the others; URL is the medium's artifact URL ``{base}/v1/artifacts/{id}.{ext}``. Our own
artifact URLs are recognised by their path whatever the host or base (a proxy, ``public_base_url``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlparse

from polymodal.modality import Modality


ARTIFACT_PATH = re.compile(r"/v1/artifacts/(?P<id>[A-Za-z0-9_-]{8,64})(?:\.(?P<ext>[A-Za-z0-9]{1,8}))?$")
"""The path of an artifact URL (any host, any base before ``/v1``)."""

_REF = re.compile(r"(?P<bang>!?)\[(?P<alt>[^\[\]\n]{0,200})\]\((?P<url><[^<>\n]*>|[^()\s]*)(?:\s+\"[^\"\n]*\")?\)")
_LABELLED = re.compile(r"^\s*(?P<label>[A-Za-z][A-Za-z0-9_-]*)\s+\d{1,6}\s*$")


def artifact_url(base_url: str, artifact_id: str, ext: str) -> str:
    """``{base_url}/v1/artifacts/{id}.{ext}``."""
    return f"{base_url.rstrip('/')}/v1/artifacts/{artifact_id}.{ext}"


def artifact_id_of(url: str) -> str | None:
    """The artifact id if ``url`` (absolute or a bare path) has our artifact path, else ``None``."""
    try:
        path = urlparse(url.strip()).path
    except ValueError:
        return None
    m = ARTIFACT_PATH.search(path)
    return m.group("id") if m else None


def markdown_ref(modality: Modality, number: int, url: str) -> str:
    """``![image 1](URL)`` (inline modalities) or ``[audio 1](URL)``; ``number`` counts from 1 per modality."""
    return Modality.parse(modality).spec.reference(number, url)


@dataclass(frozen=True)
class MarkdownRef:
    """A media reference found in a text: ``[start, end)`` its span, ``url`` its target (angle brackets removed)."""

    start: int
    end: int
    url: str


def find_media_refs(text: str) -> list[MarkdownRef]:
    """The media references of ``text`` in order: every markdown image ``![alt](url)``, and every link whose text
    is a modality label and a number (``[audio 1](url)``, as our answers write them). Other links are text.
    """
    labels = {m.spec.label.lower() for m in Modality}
    out = []
    for m in _REF.finditer(text):
        labelled = _LABELLED.match(m.group("alt"))
        if m.group("bang") or (labelled and labelled.group("label").lower() in labels):
            url = m.group("url")
            out.append(MarkdownRef(m.start(), m.end(), url[1:-1] if url.startswith("<") else url))
    return out
