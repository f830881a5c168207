"""3D decoder (``object3d``): conditioning (B, Q, D_cond) -> a coloured mesh or point cloud.

One decoder kind, two pipelines (a pretrained folder's ``model_index.json`` names which, as the video decoder's
``TextToVideoSDPipeline`` / ``AnimateDiffPipeline``):

- ``diffusers.ShapEPipeline`` (Jun & Nichol 2023, "Shap-E"; hub ``openai/shap-e``): a ``PriorTransformer`` denoises
  latents conditioned on a CLIP ``text_embeds`` vector (D_cond 768, L2-normalised and scaled by sqrt(D_cond));
  ``ShapERenderer`` turns them into a mesh (``output_type="mesh"``) -> :class:`polymodal.media.object3d.Mesh3D` (GLB).
  Conditioning (Q, D_cond) = (1, 768). The stock ``__call__`` takes only prompt strings and builds the conditioning
  in ``_encode_prompt``; :class:`ProjectedShapEPipeline` is the stock pipeline over the same components with
  ``_encode_prompt`` alone overridden to take the projected states (composition: nothing else of it is copied).
  ``source="tiny"`` builds this pipeline with tiny random components (D_cond = ``config.cond_dim``).
- :class:`PointSetDiffusionPipeline` (ours; diffusers has no point-set pipeline): a small transformer denoiser
  (:class:`PointSetDenoiser`: diffusers ``BasicTransformerBlock`` s, self-attention over the P points and
  cross-attention to (Q, D_cond)) with a stock diffusers scheduler (DDIM), a CLIP text encoder for its own caption
  embeddings, epsilon prediction -> float32 (P, 6) points (PLY). The toy world trains one from scratch on CPU
  (:mod:`training.toyworld.object3d`).

Shap-E's ``__call__`` has no step callback, so a Shap-E render is cancelled only between items (``should_cancel`` is
polled before each item; ``on_step`` is called once per item); the point-set pipeline reports and cancels per step.
No edits (no 3D-to-3D pipeline).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, ShapEPipeline
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from decoders import tiny
from decoders.base import Decoder, seeded
from decoders.errors import DecodeError
from decoders.media import Medium
from polymodal.config import DecoderConfig, DecoderDefaults
from polymodal.media.object3d import GLB_MIME, OBJECT3D, PLY_MIME, Mesh3D
from polymodal.types import EditSource

TINY_SHAPE_E_TEXT_LENGTH = 16


# ------------------------------------------------------------------------------------------------------ Shap-E


class ProjectedShapEPipeline(ShapEPipeline):
    """``diffusers.ShapEPipeline`` whose ``prompt`` is a list of B conditioning vectors (D_cond,) (the output
    projector's states) instead of strings; only :meth:`_encode_prompt` differs from the stock pipeline."""

    def _encode_prompt(self, prompt, device, num_images_per_prompt, do_classifier_free_guidance):
        """B vectors (D_cond,) -> the prior's ``proj_embedding`` as the stock method makes it from CLIP's
        ``text_embeds``: L2-normalised, repeated per image, zeros prepended for classifier-free guidance, scaled by
        sqrt(D_cond). Returns (B', D_cond) (B' = 2 B with guidance)."""
        embeds = torch.stack([torch.as_tensor(p) for p in prompt]).to(device=device, dtype=self.prior.dtype)
        embeds = embeds.repeat_interleave(num_images_per_prompt, dim=0)
        embeds = embeds / torch.linalg.norm(embeds, dim=-1, keepdim=True)
        if do_classifier_free_guidance:
            embeds = torch.cat([torch.zeros_like(embeds), embeds])
        return math.sqrt(embeds.shape[1]) * embeds


def tiny_shap_e_pipeline(config: DecoderConfig, *, seed: int = 0) -> ShapEPipeline:
    """A stock ``ShapEPipeline`` with tiny random components (saved folders have the hub's layout): a one-layer
    ``PriorTransformer`` over 32 x 16 latents, a one-layer ``CLIPTextModelWithProjection`` projecting to D_cond =
    ``config.cond_dim`` over the offline tokenizer, a ``ShapERenderer`` with 8 hidden units, Shap-E's Heun scheduler."""
    from diffusers import HeunDiscreteScheduler, PriorTransformer
    from diffusers.pipelines.shap_e import ShapERenderer
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    d, latent_dim, hidden = config.cond_dim, 16, 8
    tokenizer = tiny.text_tokenizer(model_max_length=TINY_SHAPE_E_TEXT_LENGTH)
    with seeded(seed):
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=TINY_SHAPE_E_TEXT_LENGTH, projection_dim=d,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id)).eval()
        prior = PriorTransformer(
            num_attention_heads=2, attention_head_dim=16, embedding_dim=latent_dim, num_embeddings=32,
            embedding_proj_dim=d, time_embed_dim=4 * latent_dim, num_layers=1, clip_embed_dim=2 * latent_dim,
            additional_embeddings=0, time_embed_act_fn="gelu", norm_in_type="layer", encoder_hid_proj_type=None,
            added_emb_type=None)
        renderer = ShapERenderer(
            param_shapes=((hidden, 93), (hidden, 8), (hidden, 8), (hidden, 8)), d_latent=latent_dim,
            d_hidden=hidden, n_output=12, background=(0.1, 0.1, 0.1))
    scheduler = HeunDiscreteScheduler(beta_schedule="exp", num_train_timesteps=1024, prediction_type="sample",
                                      use_karras_sigmas=True, clip_sample=True, clip_sample_range=1.0)
    pipe = ShapEPipeline(prior=prior, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                         shap_e_renderer=renderer)
    _centre_tiny_sdf(pipe, seed)
    return pipe


def marching_cubes_table() -> tuple[torch.Tensor, torch.Tensor]:
    """The lookup table of Shap-E's ``MeshDecoder`` (``cases`` long (256, 5, 3), ``masks`` bool (256, 5)), derived
    here: the real checkpoint ships it as buffers, a randomly initialised renderer has zeros (so it never makes a
    triangle). In Shap-E's layout: corner k of a cube is (x, y, z) = bits (k & 1, k >> 1 & 1, k >> 2 & 1), a case is
    the bitmask of corners with a positive (inside) field, edges 0-3 span x at (y, z) = (0,0), (1,0), (0,1), (1,1),
    4-7 span y at (x, z), 8-11 span z at (x, y); a triangle is 3 edge indices, counter-clockwise seen from outside.

    Derivation: on each cube face the crossed edges are joined by segments (with four crossings, each inside corner
    is cut off on its own); the segments close into loops, each fanned into triangles and turned to face outside.
    """
    corner = [np.array([k & 1, k >> 1 & 1, k >> 2 & 1]) for k in range(8)]
    edges = []
    for axis in range(3):
        others = [a for a in range(3) if a != axis]
        for e in range(4):
            lo = np.zeros(3, int)
            lo[others[0]], lo[others[1]] = e & 1, e >> 1
            hi = lo.copy()
            hi[axis] = 1
            edges.append((int(lo @ [1, 2, 4]), int(hi @ [1, 2, 4])))
    cases = torch.zeros(256, 5, 3, dtype=torch.long)
    masks = torch.zeros(256, 5, dtype=torch.bool)
    for case in range(256):
        inside = [(case >> k) & 1 for k in range(8)]
        crossed = {i for i, (a, b) in enumerate(edges) if inside[a] != inside[b]}
        links: dict[int, list[int]] = {i: [] for i in crossed}
        for axis in range(3):
            for side in (0, 1):
                face_corners = [k for k in range(8) if corner[k][axis] == side]
                face_edges = [i for i, (a, b) in enumerate(edges) if a in face_corners and b in face_corners]
                cut = [i for i in face_edges if i in crossed]
                if len(cut) == 2:
                    pairs = [cut]
                else:  # 0 or 4 crossings: each inside corner's two face edges
                    pairs = [[i for i in cut if k in edges[i]] for k in face_corners if inside[k]] if cut else []
                for a, b in pairs:
                    links[a].append(b)
                    links[b].append(a)
        tris, seen = [], set()
        for start in sorted(crossed):
            if start in seen:
                continue
            loop, prev, cur = [start], None, start
            seen.add(start)
            while True:
                nxt = next(n for n in links[cur] if n != prev or links[cur].count(n) > 1)
                if nxt == start:
                    break
                loop.append(nxt)
                seen.add(nxt)
                prev, cur = cur, nxt
            mid = [(corner[edges[i][0]] + corner[edges[i][1]]) / 2 for i in loop]
            outward = sum(corner[b] - corner[a] if inside[a] else corner[a] - corner[b] for a, b in
                          (edges[i] for i in loop))
            normal = sum(np.cross(mid[j], mid[(j + 1) % len(mid)]) for j in range(len(mid)))
            if normal @ outward < 0:
                loop = loop[::-1]
            tris += [(loop[0], loop[j], loop[j + 1]) for j in range(1, len(loop) - 1)]
        if len(tris) > 5:
            raise RuntimeError(f"case {case}: {len(tris)} triangles")  # never: at most 4 for this derivation
        for j, t in enumerate(tris):
            cases[case, j] = torch.tensor(t)
            masks[case, j] = True
    return cases, masks


@torch.no_grad()
def _centre_tiny_sdf(pipe: ShapEPipeline, seed: int) -> None:
    """Give the random renderer the marching-cubes table (:func:`marching_cubes_table`) and shift its SDF output
    bias so that, for latents the tiny prior makes, about half of the
    volume is inside: its zero level set (the mesh marching cubes extracts) is then not empty, as it would almost
    never be with raw random weights (their SDF keeps one sign everywhere)."""
    from diffusers.pipelines.shap_e.renderer import volume_query_points

    r = pipe.shap_e_renderer
    r.mesh_decoder.cases, r.mesh_decoder.masks = marching_cubes_table()
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(4, pipe.prior.config.embedding_proj_dim, generator=gen)
    pipe.set_progress_bar_config(disable=True)
    values = []
    for k in range(len(embeds)):
        latents = ProjectedShapEPipeline(**pipe.components)(
            [embeds[k]], generator=gen, num_inference_steps=2, guidance_scale=1.0, output_type="latent").images
        params = r.params_proj(latents[0][None])
        mlp = copy.deepcopy(r.mlp)
        for name, param in mlp.state_dict().items():
            if f"nerstf.{name}" in params:
                param.copy_(params[f"nerstf.{name}"].squeeze(0))
        pos = volume_query_points(r.volume, 16)[None].to(mlp.dtype)
        out = mlp(position=pos, direction=None, ts=None, nerf_level="fine", rendering_mode="stf")
        values.append(torch.atanh(out.signed_distance.clamp(-0.999999, 0.999999)).flatten())
    r.mlp.mlp[-1].bias[0] -= torch.cat(values).median()


def mesh_from_shap_e(raw) -> Mesh3D:
    """A ``MeshDecoderOutput`` (verts (V, 3), faces (F, 3), vertex_channels R, G, B in [0, 1]) -> :class:`Mesh3D`.

    Raises:
        ValueError: an empty mesh (no vertices or no faces).
    """
    verts = raw.verts.detach().float().cpu().numpy().astype(np.float32)
    faces = raw.faces.detach().cpu().numpy().astype(np.int32)
    if len(verts) == 0 or len(faces) == 0:
        raise ValueError("an empty mesh")
    rgb = np.stack([raw.vertex_channels[c].detach().float().cpu().numpy() for c in ("R", "G", "B")], axis=1)
    colors = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
    return Mesh3D(verts, faces, colors)


# ------------------------------------------------------------------------------------------------- point sets


class PointSetDenoiser(ModelMixin, ConfigMixin):
    """Epsilon prediction over a set of P points (B, P, point_dim), conditioned on (B, Q, cross_attention_dim).

    Points -> Linear(point_dim, width) + the timestep's embedding (sinusoidal ``Timesteps`` -> ``TimestepEmbedding``)
    -> ``num_layers`` diffusers ``BasicTransformerBlock`` s (self-attention over the points, cross-attention to the
    conditioning, GEGLU feed-forward) -> LayerNorm -> Linear(width, point_dim). No positional embedding: the
    output is permutation-equivariant in the points, as a set's should be.
    """

    @register_to_config
    def __init__(self, num_points: int = 256, point_dim: int = 6, width: int = 128, num_layers: int = 4,
                 num_heads: int = 4, cross_attention_dim: int = 64):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} must be a multiple of num_heads {num_heads}")
        self.proj_in = torch.nn.Linear(point_dim, width)
        self.time_proj = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(width, width)
        self.blocks = torch.nn.ModuleList(
            BasicTransformerBlock(width, num_heads, width // num_heads, cross_attention_dim=cross_attention_dim,
                                  activation_fn="geglu")
            for _ in range(num_layers))
        self.norm_out = torch.nn.LayerNorm(width)
        self.proj_out = torch.nn.Linear(width, point_dim)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """sample (B, P, point_dim), timestep scalar or (B,), encoder_hidden_states (B, Q, D_cond) -> (B, P,
        point_dim)."""
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        emb = self.time_embedding(self.time_proj(t).to(sample.dtype))  # (B, width)
        h = self.proj_in(sample) + emb[:, None, :]
        for block in self.blocks:
            h = block(h, encoder_hidden_states=encoder_hidden_states)
        return self.proj_out(self.norm_out(h))


@dataclass
class PointSetPipelineOutput(BaseOutput):
    """``points``: float32 (B, P, 6): x, y, z and r, g, b in [0, 1]."""

    points: np.ndarray


def points_to_model(points: torch.Tensor) -> torch.Tensor:
    """(..., 6) xyz + rgb in [0, 1] -> what the denoiser models: xyz as is, rgb scaled to [-1, 1]."""
    return torch.cat([points[..., :3], points[..., 3:] * 2.0 - 1.0], dim=-1)


def points_from_model(x: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`points_to_model` (colours clipped to [0, 1])."""
    return torch.cat([x[..., :3], ((x[..., 3:] + 1.0) / 2.0).clamp(0.0, 1.0)], dim=-1)


class PointSetDiffusionPipeline(DiffusionPipeline):
    """Text-to-point-cloud diffusion over stock diffusers parts: ``denoiser`` (:class:`PointSetDenoiser`),
    ``text_encoder`` (CLIP, its last hidden state is the conditioning (Q, D_cond)), ``tokenizer``, ``scheduler``
    (any diffusers scheduler with ``set_timesteps`` / ``step``; the toy world's is DDIM).

    Called like Stable Diffusion with ``prompt_embeds`` and ``negative_prompt_embeds`` (B, Q, D_cond),
    classifier-free guidance when ``guidance_scale > 1``, one generator per item.
    """

    model_cpu_offload_seq = "text_encoder->denoiser"

    def __init__(self, denoiser: PointSetDenoiser, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.register_modules(denoiser=denoiser, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    @torch.no_grad()
    def encode_prompt(self, prompt, device, num_images_per_prompt: int = 1, do_classifier_free_guidance: bool = False):
        """Captions -> (prompt_embeds (B, Q, D_cond), None): the text encoder's last hidden state (Stable
        Diffusion's ``encode_prompt`` contract; the second value is never computed here)."""
        tok = self.tokenizer
        ids = tok(list(prompt), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        embeds = self.text_encoder(ids)[0]
        return embeds.repeat_interleave(num_images_per_prompt, dim=0), None

    @torch.no_grad()
    def __call__(self, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 1.0, generator=None,
                 output_type: str = "np", callback_on_step_end: Callable | None = None, return_dict: bool = True):
        """(B, Q, D_cond) -> :class:`PointSetPipelineOutput` (``output_type`` ``"np"``; ``"pt"`` keeps a tensor).

        Raises:
            ValueError: guidance without ``negative_prompt_embeds``, or a generator list of another length than B.
        """
        b = prompt_embeds.shape[0]
        cfg = guidance_scale > 1.0
        if cfg and negative_prompt_embeds is None:
            raise ValueError("guidance_scale > 1 needs negative_prompt_embeds")
        if isinstance(generator, list) and len(generator) != b:
            raise ValueError(f"{len(generator)} generators for a batch of {b}")
        den = self.denoiser
        device, dtype = prompt_embeds.device, den.dtype
        shape = (den.config.num_points, den.config.point_dim)
        gens = generator if isinstance(generator, list) else [generator] * b
        x = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens]).to(device, dtype)
        x = x * self.scheduler.init_noise_sigma
        cond = torch.cat([negative_prompt_embeds, prompt_embeds]) if cfg else prompt_embeds
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            inp = self.scheduler.scale_model_input(torch.cat([x, x]) if cfg else x, t)
            eps = den(inp, t, cond.to(dtype))
            if cfg:
                uncond, text = eps.chunk(2)
                eps = uncond + guidance_scale * (text - uncond)
            x = self.scheduler.step(eps, t, x).prev_sample
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, t, {})
        points = points_from_model(x.float())
        out = points.cpu().numpy() if output_type == "np" else points
        return PointSetPipelineOutput(points=out) if return_dict else (out,)


def point_set_scheduler(beta_schedule: str = "linear") -> DDIMScheduler:
    """DDIM over 1000 steps, epsilon prediction, samples clipped to [-1.5, 1.5] (points live in [-1, 1]).
    ``beta_schedule``: ``linear`` (1e-4 .. 0.02, DDPM's) or ``squaredcos_cap_v2`` (the cosine schedule of Nichol &
    Dhariwal 2021, Point-E's), a diffusers ``DDIMScheduler`` option."""
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, beta_start=1e-4, beta_end=0.02,
                         clip_sample=True, clip_sample_range=1.5, prediction_type="epsilon")


# ---------------------------------------------------------------------------------------------------- decoder


class Object3DDecoder(Decoder):
    """3D diffusion driven by ``prompt_embeds`` (B, Q, D_cond): a Shap-E folder (Q = 1) -> :class:`Mesh3D`, a
    point-set folder -> float32 (P, 6) points (see the module docstring)."""

    modality = OBJECT3D
    pipeline_class = ShapEPipeline
    pipeline_classes = (ShapEPipeline, PointSetDiffusionPipeline)

    def __init__(self, pipeline, config: DecoderConfig, *, init_state: str, device="cpu"):
        if type(pipeline) is ShapEPipeline:  # the stock pipeline's components, driven by projected states
            pipeline = ProjectedShapEPipeline(**pipeline.components)
        super().__init__(pipeline, config, init_state=init_state, device=device)

    @property
    def is_shap_e(self) -> bool:
        return isinstance(self.pipeline, ShapEPipeline)

    @property
    def output_mime_type(self) -> str:
        """GLB for Shap-E's meshes, PLY for the point-set pipeline's clouds."""
        return GLB_MIME if self.is_shap_e else PLY_MIME

    @classmethod
    def tiny_pipeline(cls, config: DecoderConfig, *, seed: int = 0) -> ShapEPipeline:
        return tiny_shap_e_pipeline(config, seed=seed)

    def _pipeline_cond_shape(self) -> tuple[int, int]:
        if self.is_shap_e:
            return 1, int(self.pipeline.text_encoder.config.projection_dim)
        return super()._pipeline_cond_shape()

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """Captions -> (B, Q, D_cond): Shap-E: the stock ``_encode_prompt`` (CLIP ``text_embeds``, normalised and
        scaled), (B, 1, D_cond); point sets: the text encoder's last hidden state."""
        if self.is_shap_e:
            embeds = ShapEPipeline._encode_prompt(self.pipeline, list(captions), self.device, 1, False)
            return embeds[:, None, :].to(self.dtype)
        return super().encode_text(captions)

    def _call_options(self, options: DecoderDefaults, batch_size: int) -> dict:
        return {}

    def _output_items(self, output):
        return output.points

    def _to_medium(self, raw, seed: int, options: DecoderDefaults) -> Medium:
        return Medium(self.modality, np.ascontiguousarray(raw, dtype=np.float32), seed=seed)

    def render(self, prompt_embeds: torch.Tensor, seeds: list[int], options: DecoderDefaults | None = None,
               should_cancel: Callable[[], bool] | None = None, on_step: Callable[[int], None] | None = None,
               sources: list[EditSource] | None = None) -> list[Medium | DecodeError]:
        """As :meth:`decoders.base.Decoder.render`; a Shap-E pipeline renders item by item (a mesh each).

        Raises:
            ValueError: sources (no 3D edits), wrong ``prompt_embeds`` shape or seed count.
        """
        if sources is not None:
            raise ValueError("the object3d decoder cannot edit (diffusers has no 3D-to-3D pipeline)")
        if not self.is_shap_e:
            return super().render(prompt_embeds, seeds, options, should_cancel, on_step)
        seeds = [int(s) for s in seeds]
        embeds = self._check_embeds(prompt_embeds, len(seeds))[:, 0, :]  # (B, D_cond)
        options = options or self.defaults
        results: list[Medium | DecodeError] = []
        with self._lock, torch.inference_mode():
            for k, seed in enumerate(seeds):
                if should_cancel is not None and should_cancel():
                    return [DecodeError(s, DecodeError.CANCELLED) for s in seeds]
                try:
                    out = self.pipeline(
                        [embeds[k]], generator=torch.Generator("cpu").manual_seed(seed),
                        num_inference_steps=options.num_inference_steps, guidance_scale=options.guidance_scale,
                        output_type="mesh")
                    medium, reason = Medium(self.modality, mesh_from_shap_e(out.images[0]), seed=seed), None
                except ValueError as e:  # an empty mesh, non-finite vertices (Mesh3D)
                    reason = f"degenerate output: {e}"
                except (RuntimeError, ZeroDivisionError) as e:  # marching cubes found no surface (0 vertices)
                    reason = f"degenerate output: no surface ({type(e).__name__}: {e})"
                if reason is None:
                    cv = self.modality.spec.codec.degenerate(medium.data)
                    reason = f"degenerate output: {cv}" if cv else None
                results.append(DecodeError(seed, reason) if reason else medium)
                if on_step is not None:
                    on_step(k)
        return results
