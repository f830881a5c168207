"""Speech audio in the response formats of ``/v1/audio/speech``: PCM16 chunks in, file bytes out, as they come.

The speech stage sends 16-bit signed little-endian mono PCM, one chunk per sentence
(:class:`services.protocol.SpeechAudioChunk`, 24 kHz). :class:`SpeechEncoder` turns chunks into a file's bytes
incrementally (``start()``, ``add(pcm16)`` per chunk, ``finish()``); :func:`encode_chunks` builds a whole file.

=========== ================ =========================================================================================
format      MIME type        whole file / streamed (``stream_format: "audio"`` and the bytes of ``"sse"`` events)
=========== ================ =========================================================================================
``pcm``     audio/pcm        raw samples, no header; streamed bytes = whole file
``wav``     audio/wav        44-byte RIFF header + PCM16; streamed: the header's two size fields are 0xFFFFFFFF
                             (unknown length; libsndfile, ffmpeg and browsers read it), the samples the same
``flac``    audio/flac       whole: libsndfile (STREAMINFO with length and MD5); streamed: PyAV's FLAC muxer on a
                             stream that cannot seek (STREAMINFO without them), the same decoded samples
``mp3``     audio/mpeg       PyAV libmp3lame (64 kbit/s mono) on a non-seekable stream: streamed bytes = whole file
``opus``    audio/ogg        PyAV libopus in Ogg (bit-exact: serial 0; pages of 100 ms): streamed = whole file
``aac``     audio/aac        PyAV aac in ADTS: streamed bytes = whole file
=========== ================ =========================================================================================

The compressed encoders hold back samples until they fill a frame, so a streamed chunk of bytes does not end at a
sentence boundary; ``finish()`` flushes the rest. PyAV is CPU work: callers run ``add`` / ``finish`` of the
compressed formats in a worker thread (:attr:`SpeechEncoder.blocking`).
"""

from __future__ import annotations

import io
import struct

import numpy as np

SPEECH_MIME_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac", "mp3": "audio/mpeg",
                     "opus": "audio/ogg", "aac": "audio/aac"}

_AV_FORMATS = {  # response format -> (container, codec, container options)
    "mp3": ("mp3", "libmp3lame", {}),
    "opus": ("ogg", "libopus", {"fflags": "+bitexact", "page_duration": "100000"}),
    "aac": ("adts", "aac", {}),
    "flac": ("flac", "flac", {}),
}
_BIT_RATES = {"mp3": 64000, "opus": 32000, "aac": 64000}
UNKNOWN_SIZE = 0xFFFFFFFF


def wav_header(num_samples: int | None, sample_rate_hz: int) -> bytes:
    """The 44-byte header of a PCM16 mono WAV of ``num_samples`` (``None``: unknown, sizes 0xFFFFFFFF)."""
    data = UNKNOWN_SIZE if num_samples is None else 2 * num_samples
    riff = UNKNOWN_SIZE if num_samples is None else 36 + data
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, sample_rate_hz, 2 * sample_rate_hz, 2, 16) +
            b"data" + struct.pack("<I", data))


class _Sink:
    """A write-only, non-seekable file for PyAV (muxers then never go back to patch a header)."""

    def __init__(self):
        self._buf = bytearray()

    def write(self, b) -> int:
        self._buf += b
        return len(b)

    def take(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        return out


class SpeechEncoder:
    """One stream's incremental encoder.

    Args:
        fmt: a key of :data:`SPEECH_MIME_TYPES`.
        sample_rate_hz: the PCM's rate.

    Raises:
        ValueError: an unknown format (lists the choices).
    """

    def __init__(self, fmt: str, sample_rate_hz: int):
        if fmt not in SPEECH_MIME_TYPES:
            raise ValueError(f"unknown speech format {fmt!r}; choose from: {', '.join(SPEECH_MIME_TYPES)}")
        self.fmt, self.sample_rate_hz = fmt, int(sample_rate_hz)
        self.blocking = fmt in _AV_FORMATS  # PyAV work: run add / finish in a thread
        self._container = self._stream = self._sink = None
        self._pts = 0

    @property
    def mime_type(self) -> str:
        return SPEECH_MIME_TYPES[self.fmt]

    def start(self) -> bytes:
        """The bytes that go before any audio (a streamed WAV's header; nothing for the others yet)."""
        if self.fmt == "wav":
            return wav_header(None, self.sample_rate_hz)
        if self.blocking:
            import av

            container, codec, options = _AV_FORMATS[self.fmt]
            self._sink = _Sink()
            self._container = av.open(self._sink, mode="w", format=container, container_options=options)
            self._stream = self._container.add_stream(codec, rate=self.sample_rate_hz)
            self._stream.layout = "mono"
            if self.fmt in _BIT_RATES:
                self._stream.bit_rate = _BIT_RATES[self.fmt]
            return self._sink.take()
        return b""

    def add(self, pcm16: bytes) -> bytes:
        """The bytes ready after one more chunk of PCM16 (maybe none: a compressed frame is not full yet)."""
        if not self.blocking:
            return bytes(pcm16)
        import av

        samples = np.frombuffer(pcm16, dtype="<i2")
        if not len(samples):
            return b""
        frame = av.AudioFrame.from_ndarray(samples.astype(np.int16).reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.sample_rate_hz
        frame.pts = self._pts
        self._pts += len(samples)
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        return self._sink.take()

    def finish(self) -> bytes:
        """The bytes left once the audio is complete (flushed frames, trailers)."""
        if not self.blocking:
            return b""
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        return self._sink.take()


def encode_chunks(fmt: str, chunks: list[bytes], sample_rate_hz: int) -> bytes:
    """A whole file of ``fmt`` from PCM16 chunks (see the module table: the same bytes as the stream but for the
    WAV / FLAC headers).

    Raises:
        ValueError: an unknown format.
    """
    pcm = b"".join(chunks)
    if fmt == "pcm":
        return pcm
    if fmt == "wav":
        return wav_header(len(pcm) // 2, sample_rate_hz) + pcm
    if fmt == "flac":
        import soundfile as sf

        buf = io.BytesIO()
        sf.write(buf, np.frombuffer(pcm, dtype="<i2"), int(sample_rate_hz), format="FLAC", subtype="PCM_16")
        return buf.getvalue()
    enc = SpeechEncoder(fmt, sample_rate_hz)
    out = [enc.start()]
    out += [enc.add(c) for c in chunks]  # the stream's own steps, chunk by chunk: byte-identical to it
    out.append(enc.finish())
    return b"".join(out)
