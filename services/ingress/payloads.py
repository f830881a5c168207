"""Large media in answers without stalling the event loop.

Base64 of a 20 MB medium and the JSON text around it take tens of milliseconds of CPU, all of it holding the GIL
(``binascii`` and ``json`` do not release it, so moving one big call to a thread would still stall the loop for
its whole length), and every other request of the ingress waits meanwhile. So an answer's large media are not
encoded while its body is built: the body holds a short placeholder for each (:meth:`Splicer.inline`), is
serialised small, and is sent in pieces (:func:`stream_pieces`) whose base64 a worker thread encodes
:data:`CHUNK_BYTES` at a time, handing the GIL back after each chunk. The bytes sent are exactly those of the whole JSON (base64 needs no JSON escaping), and the length is known
up front (``Content-Length``). Media under :data:`LARGE_PAYLOAD_BYTES` are encoded in place as before.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse

LARGE_PAYLOAD_BYTES = 256 * 1024
"""Media at least this large are base64-encoded piece by piece while the answer is sent."""
CHUNK_BYTES = 3 * 8 * 1024
"""Raw bytes base64-encoded at a time (a multiple of 3, so the chunks join into one valid base64 text): well under a
millisecond of CPU each, even on a loaded machine."""
SEND_CHUNKS = 64
"""Encoded chunks joined into one piece sent (about 2 MB of base64)."""


@dataclass(frozen=True)
class Payload:
    """A medium's base64 text, still to be encoded: ``prefix`` (e.g. ``data:image/png;base64,``) then base64 of
    ``data``."""

    data: bytes
    prefix: str = ""

    @property
    def size(self) -> int:
        """Bytes it takes in the body."""
        return len(self.prefix.encode()) + 4 * ((len(self.data) + 2) // 3)


Piece = bytes | Payload


class Splicer:
    """Placeholders for the large payloads of one body (each body gets its own: the placeholders carry a random
    nonce, so text in the answer cannot forge one)."""

    def __init__(self) -> None:
        self._nonce = uuid.uuid4().hex
        self._payloads: dict[str, Payload] = {}
        self._pattern = re.compile(rf"@pm-payload-{self._nonce}-(\d+)@".encode())

    def inline(self, data: bytes, prefix: str = "") -> str:
        """``prefix`` + base64 of ``data``, or a placeholder for it when ``data`` is large."""
        if len(data) < LARGE_PAYLOAD_BYTES:
            return prefix + base64.b64encode(bytes(data)).decode("ascii")
        key = str(len(self._payloads))
        self._payloads[key] = Payload(data if isinstance(data, bytes) else bytes(data), prefix)
        return f"@pm-payload-{self._nonce}-{key}@"

    @property
    def empty(self) -> bool:
        return not self._payloads

    def pieces(self, text: bytes) -> list[Piece]:
        """``text`` (a serialised body) split at its placeholders: bytes and :class:`Payload` in order."""
        out: list[Piece] = []
        pos = 0
        for m in self._pattern.finditer(text):
            if m.start() > pos:
                out.append(text[pos:m.start()])
            out.append(self._payloads[m.group(1).decode()])
            pos = m.end()
        if pos < len(text):
            out.append(text[pos:])
        return out

    def response(self, body: dict[str, Any], headers: dict[str, str] | None = None, status_code: int = 200) -> Response:
        """The JSON response of ``body``: a plain ``JSONResponse`` when it holds no placeholder, else the same
        bytes streamed in pieces (with ``Content-Length``)."""
        if self.empty:
            return JSONResponse(body, status_code=status_code, headers=headers)
        text = json.dumps(body, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode()
        pieces = self.pieces(text)
        return StreamingResponse(stream_pieces(pieces), status_code=status_code, media_type="application/json",
                                 headers={**(headers or {}), "Content-Length": str(pieces_length(pieces))})


def pieces_length(pieces: Sequence[Piece]) -> int:
    """Bytes :func:`stream_pieces` sends."""
    return sum(p.size if isinstance(p, Payload) else len(p) for p in pieces)


async def stream_pieces(pieces: Sequence[Piece]) -> AsyncIterator[bytes]:
    """The bytes of ``pieces``. A payload's base64 is encoded in a worker thread, :data:`CHUNK_BYTES` at a time,
    handing the GIL back between chunks (so the event loop waits at most one chunk for it), and reaches the loop
    in pieces of :data:`SEND_CHUNKS` chunks (few sends per medium). Stopping the iteration stops the thread."""
    for p in pieces:
        if not isinstance(p, Payload):
            yield p
            continue
        if p.prefix:
            yield p.prefix.encode()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        done = object()

        def encode(data: bytes = p.data) -> None:
            view = memoryview(data)
            group: list[bytes] = []
            try:
                for off in range(0, len(view), CHUNK_BYTES):
                    if stop.is_set():
                        return
                    group.append(base64.b64encode(view[off:off + CHUNK_BYTES]))
                    if len(group) == SEND_CHUNKS:
                        loop.call_soon_threadsafe(queue.put_nowait, b"".join(group))
                        group = []
                    time.sleep(0)  # releases the GIL: a waiting event loop takes it now, not after the switch interval
                if group:
                    loop.call_soon_threadsafe(queue.put_nowait, b"".join(group))
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)

        worker = loop.run_in_executor(None, encode)
        try:
            while (piece := await queue.get()) is not done:
                yield piece
        finally:
            stop.set()
            await asyncio.wait({worker}, timeout=10)
