"""polymodal: any-to-any generation in the NExT-GPT style.

The in-process model lives here (signal spec, presets, encoders, LLM engine, :class:`AnyToAnyPipeline`);
``projectors/`` and ``decoders/`` hold the projection and diffusion parts, ``services/`` the Ray Serve graph.
"""

from polymodal.modality import Modality

__all__ = ["Modality", "__version__"]
__version__ = "0.1.0"
