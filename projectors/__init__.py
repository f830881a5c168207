"""Input and output projectors: one registry per role, builders, safetensors checkpoints with metadata.

Output projectors (``OUTPUT_PROJECTORS``: ``transformer``, ``linear``, ``mlp``) map one signal group
``hidden_states + token_embeds`` (B, N, D_llm) into a decoder's conditioning space (B, Q, D_cond);
input projectors (``INPUT_PROJECTORS``: ``linear``, ``mlp``) map a media embedding (B, D_enc) into
k LLM input embeddings (B, k, D_llm). Projectors and decoders never import each other: they meet in
tensors of these documented shapes.

Layer: a component (see :mod:`polymodal`): imports only polymodal's vocabulary (:mod:`polymodal.config`);
composed by :mod:`polymodal.pipeline`.
"""

from projectors.base import InputProjector, OutputProjector, Projector
from projectors.build import build_input_projector, build_output_projector
from projectors.checkpoint import (
    ProjectorLoadError,
    load_projector,
    projector_metadata,
    read_projector_metadata,
    save_projector,
)
from projectors.input import INPUT_PROJECTORS, LinearInputProjector, MLPInputProjector
from projectors.output import (
    NEXTGPT_TRANSFORMER_KEY_MAP,
    OUTPUT_PROJECTORS,
    LinearOutputProjector,
    MLPOutputProjector,
    TokenMixer,
    TransformerOutputProjector,
)

__all__ = [
    "INPUT_PROJECTORS",
    "NEXTGPT_TRANSFORMER_KEY_MAP",
    "OUTPUT_PROJECTORS",
    "InputProjector",
    "LinearInputProjector",
    "LinearOutputProjector",
    "MLPInputProjector",
    "MLPOutputProjector",
    "OutputProjector",
    "Projector",
    "ProjectorLoadError",
    "TokenMixer",
    "TransformerOutputProjector",
    "build_input_projector",
    "build_output_projector",
    "load_projector",
    "projector_metadata",
    "read_projector_metadata",
    "save_projector",
]
