"""The output record schema (NExT-GPT MosIT style), as pydantic models; the build also writes it as JSON
Schema (``mosit.schema.json``).

A record::

    {"id": "mosit-000003", "mode": "T_I", "topic": "cats", "origin": "generated",
     "conversation": [{"from": "human", "value": "Can you show me a cat?"},
                      {"from": "gpt", "value": "Here is one. <Image>chelsea.png</Image>"}],
     "image_list": [{"name": "chelsea.png", "data_source": "skimage", "caption": "a ginger cat ...",
                     "from": "gpt", "turn": 1, "source": "catalog", "catalog_id": "chelsea",
                     "query": "a cat on a sofa", "score": 0.61, "embedding": "embeddings/chelsea.png.npy"}],
     "audio_list": [], "video_list": []}

Media are referred to by file name inside their tags; files live in ``images/``, ``audios/``,
``videos/`` of the dataset folder; ``embedding`` (output media only) is the caption's embedding by the
matching decoder's text encoder, (Q, D_cond) float32 ``.npy``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from polymodal.modality import Modality



class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class MediaEntry(_Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9._-]+$", description="file name inside the media folder")
    data_source: str = Field(..., min_length=1)
    caption: str = Field(..., min_length=1, description="what the medium shows / sounds like")
    from_: Literal["human", "gpt"] = Field(..., alias="from")
    turn: int = Field(..., ge=0, description="index of the conversation message")
    source: Literal["catalog", "generated"]
    catalog_id: str | None = None
    query: str = Field(..., description="the placeholder caption the dialogue asked for")
    score: float | None = Field(None, description="cosine similarity of query and caption (catalog media)")
    embedding: str | None = Field(None, description="embeddings/<name>.npy (output media)")


class Message(_Strict):
    from_: Literal["human", "gpt"] = Field(..., alias="from")
    value: str = Field(..., min_length=1)


class MositRecord(_Strict):
    id: str = Field(..., min_length=1)
    mode: str
    topic: str
    origin: Literal["generated", "draft"]
    conversation: list[Message] = Field(..., min_length=2)
    image_list: list[MediaEntry]
    audio_list: list[MediaEntry]
    video_list: list[MediaEntry]

    @model_validator(mode="after")
    def _consistent(self) -> "MositRecord":
        keys = {m.spec.tag: key for m, key in MEDIA_LISTS.items()}
        if self.conversation[0].from_ != "human" or self.conversation[-1].from_ != "gpt":
            raise ValueError("a conversation starts with the human and ends with gpt")
        refs: list[tuple[str, str, int]] = []
        for i, m in enumerate(self.conversation):
            refs += [(keys[t], name, i) for t, name in _TAG.findall(m.value)]
        listed = [(key, e.name, e.turn) for key in keys.values() for e in getattr(self, key)]
        if sorted(refs) != sorted(listed):
            raise ValueError(f"media referenced in the conversation {sorted(refs)} differ from the lists {sorted(listed)}")
        for key in keys.values():
            for e in getattr(self, key):
                if e.from_ != self.conversation[e.turn].from_:
                    raise ValueError(f"{e.name}: 'from' {e.from_!r} but message {e.turn} is {self.conversation[e.turn].from_!r}")
        return self


MEDIA_LISTS: dict[Modality, str] = {Modality(f.removesuffix("_list")): f for f in MositRecord.model_fields
                                    if f.endswith("_list")}
"""The record's media list per modality (NExT-GPT's MosIT format: ``image_list``, ``audio_list``, ``video_list``);
the files of a list live in the modality's ``answer_field`` folder (``images/``, ``audios/``, ``videos/``)."""
_TAG = re.compile(r"<({})>([^<>]+)</\1>".format("|".join(m.spec.tag for m in MEDIA_LISTS)))


def missing_files(record: dict | MositRecord, root: str | Path) -> list[str]:
    """Relative paths a record refers to (media, embeddings) that do not exist under ``root``."""
    rec = record if isinstance(record, MositRecord) else MositRecord.model_validate(record)
    root = Path(root)
    out = []
    for m, key in MEDIA_LISTS.items():
        folder = m.spec.answer_field
        for e in getattr(rec, key):
            if not (root / folder / e.name).is_file():
                out.append(f"{folder}/{e.name}")
            if e.embedding and not (root / e.embedding).is_file():
                out.append(e.embedding)
    return out


def media_path(root: str | Path, modality: Modality, name: str) -> Path:
    """Where a record's medium ``name`` of ``modality`` lives under ``root`` (``images/<name>``)."""
    return Path(root) / modality.spec.answer_field / name
