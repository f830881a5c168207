"""polymodal: any-to-any generation in the NExT-GPT style.

The in-process model lives here (signal spec, presets, encoders, LLM engine, :class:`AnyToAnyPipeline`);
``projectors/`` and ``decoders/`` hold the projection and diffusion parts, ``services/`` the Ray Serve graph,
``training/`` the offline wing (alignment stages, converter, toy world).

Layers (top to bottom; a module imports only from its own layer or below; pyproject's ``[tool.importlinter]``
states them as contracts, tests/test_architecture.py checks them):

1. :mod:`polymodal.cli`: the composition root (reaches ``services``, ``mosit`` and ``training`` inside commands).
2. ``training`` (offline wing), then ``mosit``, then ``services``: never imported by the layers below.
3. :mod:`polymodal.pipeline`: composes the components.
4. Components, independent of one another: ``projectors``, ``decoders``, :mod:`polymodal.llm`,
   :mod:`polymodal.encoders`, :mod:`polymodal.export`, :mod:`polymodal.presets`.
5. The vocabulary every layer speaks: :mod:`polymodal.config`, :mod:`polymodal.signals`, :mod:`polymodal.types`,
   :mod:`polymodal.media_io`, :mod:`polymodal.grounding`, :mod:`polymodal.offline_tokenizer`,
   :mod:`polymodal.devices`, the built-in modalities' specs and codecs (:mod:`polymodal.media`), and at the bottom
   :mod:`polymodal.modality` (the registry of :class:`~polymodal.modality.ModalitySpec`).

So ``polymodal`` is two layers around ``decoders`` / ``projectors``: they import its vocabulary, its pipeline
imports them, and no module-level loop exists. This package's ``__init__`` imports only the vocabulary: the
modality registry and the built-in modalities (:mod:`polymodal.media` registers image, audio and video), so every
``Modality`` lookup sees them. docs/architecture.md draws the whole plan.
"""

import polymodal.media  # noqa: F401 - registers the built-in modalities (image, audio, video), in this order
from polymodal.modality import Modality

__all__ = ["Modality", "__version__"]
__version__ = "0.1.0"
