"""Devices and dtypes, one rule for every part (LLM, encoders, decoders): the vocabulary layer's torch module.

Imported by :mod:`polymodal.llm`, :mod:`polymodal.encoders`, :mod:`polymodal.pipeline` and :mod:`decoders`;
imports only torch (never a component package), so every part can ask it.
"""

from __future__ import annotations

import torch

# config dtype name -> torch dtype ("auto" resolves per device, see :func:`resolve_dtype`)
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU.

    Raises:
        ValueError: an unknown device string, or CUDA asked of a torch build without it.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this torch build has no usable CUDA "
                         f"(torch {torch.__version__}); install a CUDA torch or use --device cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU whatever the config says (fp16 matmuls are slow or unsupported there); on an accelerator the
    config's dtype, ``auto`` = float16.

    Raises:
        ValueError: an unknown dtype name (lists the choices).
    """
    if device.type == "cpu":
        return torch.float32
    if dtype == "auto":
        return torch.float16
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


__all__ = ["DTYPES", "resolve_device", "resolve_dtype"]
