"""The 3D modality (``object3d``): its :class:`~polymodal.modality.ModalitySpec` and codec (plyfile, trimesh; no torch).

A rendered 3D medium is one of two things (the decoder decides which):

- a coloured point cloud: ``float32 (P, 6)``, columns x, y, z (object units, finite) and r, g, b in [0, 1]
  -> a binary little-endian PLY file (``application/ply``, ``.ply``; plyfile): one ``vertex`` element with float32
  ``x y z`` and uint8 ``red green blue`` (the properties every PLY reader knows: MeshLab, Open3D, CloudCompare);
- a coloured triangle mesh: :class:`Mesh3D` (vertices ``float32 (V, 3)``, faces ``int32 (F, 3)``, per-vertex colours
  ``uint8 (V, 3)``) -> a binary glTF 2.0 file (``model/gltf-binary``, ``.glb``; trimesh): one mesh with a
  ``COLOR_0`` vertex attribute.

MIME types: ``model/gltf-binary`` is IANA-registered (Khronos); PLY has no IANA registration, ``application/ply`` is the
name Apache Tika and most web servers use. Signal tokens ``<3D0>..``; the answer's array ``message.objects3d`` and the
ordered parts' ``object3d_url``, like the other modalities (all read from the spec). No 3D *inputs*: the codec
recognises PLY / glTF files (so an uploaded one is refused by name, ``unsupported``) but does not decode them (no
encoder reads 3D).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from polymodal.media_io import DecodeOptions, MediaCodec, MediaError, MediaLimits
from polymodal.modality import ModalitySpec, register_modality

PLY_MIME = "application/ply"
GLB_MIME = "model/gltf-binary"
POINT_COLUMNS = 6  # x, y, z, r, g, b
# A rendered medium whose points (or vertices) span less than this in every axis has collapsed to one point.
COLLAPSED_EXTENT = 1e-6


@dataclass(frozen=True, eq=False)
class Mesh3D:
    """A coloured triangle mesh (what a mesh decoder, e.g. Shap-E, renders).

    Attributes:
        vertices: float32 (V, 3), finite.
        faces: int32 (F, 3), indices into ``vertices`` (counter-clockwise seen from outside).
        colors: uint8 (V, 3), per-vertex RGB.

    Raises:
        ValueError: wrong dtypes or shapes, non-finite vertices, face indices out of range.
    """

    vertices: np.ndarray
    faces: np.ndarray
    colors: np.ndarray

    def __post_init__(self) -> None:
        v, f, c = self.vertices, self.faces, self.colors
        if not (isinstance(v, np.ndarray) and v.dtype == np.float32 and v.ndim == 2 and v.shape[1] == 3):
            raise ValueError(f"mesh vertices must be float32 (V, 3), got {getattr(v, 'dtype', type(v))} "
                             f"{getattr(v, 'shape', '')}")
        if not (isinstance(f, np.ndarray) and f.dtype == np.int32 and f.ndim == 2 and f.shape[1] == 3):
            raise ValueError(f"mesh faces must be int32 (F, 3), got {getattr(f, 'dtype', type(f))} "
                             f"{getattr(f, 'shape', '')}")
        if not (isinstance(c, np.ndarray) and c.dtype == np.uint8 and c.shape == v.shape):
            raise ValueError(f"mesh colors must be uint8 (V, 3) like the vertices {v.shape}, got "
                             f"{getattr(c, 'dtype', type(c))} {getattr(c, 'shape', '')}")
        if not np.all(np.isfinite(v)):
            raise ValueError("mesh vertices must be finite")
        if f.size and (int(f.min()) < 0 or int(f.max()) >= len(v)):
            raise ValueError(f"mesh faces index vertices 0..{len(v) - 1}, got {int(f.min())}..{int(f.max())}")

    @property
    def shape(self) -> tuple[int, int]:
        """(V, F): vertex and face counts (what manifests record as a medium's ``shape``)."""
        return len(self.vertices), len(self.faces)


def validate_points(points: Any) -> None:
    """Check a point cloud: float32 (P, 6), P >= 1, finite, colours in [0, 1].

    Raises:
        ValueError: naming what is wrong.
    """
    if not (isinstance(points, np.ndarray) and points.dtype == np.float32 and points.ndim == 2
            and points.shape[1] == POINT_COLUMNS and len(points) >= 1):
        raise ValueError(f"object3d point data must be float32 (P, 6) (x, y, z, r, g, b) with P >= 1, got "
                         f"{getattr(points, 'dtype', type(points).__name__)} {getattr(points, 'shape', '')}")
    if not np.all(np.isfinite(points)):
        raise ValueError("object3d points must be finite")
    rgb = points[:, 3:]
    if float(rgb.min()) < 0.0 or float(rgb.max()) > 1.0:
        raise ValueError(f"object3d point colours must be in [0, 1], got "
                         f"{float(rgb.min()):.3g}..{float(rgb.max()):.3g}")


def encode_ply(points: np.ndarray) -> bytes:
    """float32 (P, 6) xyz + rgb in [0, 1] -> binary little-endian PLY bytes (x, y, z float32; red, green, blue
    uint8)."""
    from plyfile import PlyData, PlyElement

    rows = np.empty(len(points), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                                        ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    for k, name in enumerate(("x", "y", "z")):
        rows[name] = points[:, k]
    rgb = np.clip(np.rint(points[:, 3:] * 255.0), 0, 255).astype(np.uint8)
    for k, name in enumerate(("red", "green", "blue")):
        rows[name] = rgb[:, k]
    buf = io.BytesIO()
    PlyData([PlyElement.describe(rows, "vertex")], text=False, byte_order="<").write(buf)
    return buf.getvalue()


def decode_ply(data: bytes) -> np.ndarray:
    """PLY bytes with a ``vertex`` element (x, y, z and optional red, green, blue) -> float32 (P, 6), colours in
    [0, 1] (white when absent). The reader of the files :func:`encode_ply` writes (tests, the toy world's checker).

    Raises:
        ValueError: not a PLY file, or no vertex element with x, y, z.
    """
    from plyfile import PlyData

    try:
        ply = PlyData.read(io.BytesIO(bytes(data)))
        vertex = ply["vertex"].data
    except Exception as e:  # noqa: BLE001 - plyfile raises several kinds for malformed input
        raise ValueError(f"not a readable PLY point cloud ({type(e).__name__}: {e})") from None
    names = vertex.dtype.names or ()
    if not all(n in names for n in ("x", "y", "z")):
        raise ValueError(f"the PLY vertex element has no x, y, z (properties: {', '.join(names)})")
    out = np.ones((len(vertex), POINT_COLUMNS), dtype=np.float32)
    for k, n in enumerate(("x", "y", "z")):
        out[:, k] = vertex[n]
    if all(n in names for n in ("red", "green", "blue")):
        for k, n in enumerate(("red", "green", "blue")):
            out[:, 3 + k] = np.asarray(vertex[n], dtype=np.float32) / 255.0
    return out


def encode_glb(mesh: Mesh3D) -> bytes:
    """:class:`Mesh3D` -> binary glTF 2.0 bytes (trimesh; positions, triangle indices, ``COLOR_0``)."""
    import trimesh

    rgba = np.concatenate([mesh.colors, np.full((len(mesh.colors), 1), 255, np.uint8)], axis=1)
    tm = trimesh.Trimesh(vertices=mesh.vertices, faces=mesh.faces, vertex_colors=rgba, process=False)
    return tm.export(file_type="glb")


def decode_glb(data: bytes) -> Mesh3D:
    """GLB bytes -> :class:`Mesh3D` (all meshes of the scene concatenated; white where a mesh has no colours). The
    reader of the files :func:`encode_glb` writes (tests).

    Raises:
        ValueError: not a readable GLB file, or one without triangles.
    """
    import trimesh

    try:
        scene = trimesh.load(io.BytesIO(bytes(data)), file_type="glb", force="scene", process=False)
    except Exception as e:  # noqa: BLE001 - trimesh raises several kinds for malformed input
        raise ValueError(f"not a readable GLB file ({type(e).__name__}: {e})") from None
    meshes = [g for g in scene.geometry.values() if isinstance(g, trimesh.Trimesh)]
    if not meshes:
        raise ValueError("the GLB file holds no triangle mesh")
    verts, faces, colors, base = [], [], [], 0
    for g in meshes:
        verts.append(np.asarray(g.vertices, dtype=np.float32))
        faces.append(np.asarray(g.faces, dtype=np.int64) + base)
        vc = getattr(g.visual, "vertex_colors", None)
        colors.append(np.asarray(vc, dtype=np.uint8)[:, :3] if vc is not None and len(vc) == len(g.vertices)
                      else np.full((len(g.vertices), 3), 255, np.uint8))
        base += len(g.vertices)
    return Mesh3D(np.concatenate(verts), np.concatenate(faces).astype(np.int32), np.concatenate(colors))


class Object3DCodec(MediaCodec):
    """3D files: PLY out for point clouds (float32 (P, 6)), GLB out for meshes (:class:`Mesh3D`).

    ``mime_type`` / ``ext`` are the point cloud's; :meth:`encode` returns each file's own type, which the stored
    artifact keeps; an artifact reserved before rendering is named after the type its decoder writes
    (``decoders.Decoder.output_mime_type``: GLB for Shap-E) through :meth:`extension`.
    """

    mime_type = PLY_MIME
    ext = "ply"

    def sniff(self, head: bytes) -> bool:
        return head.startswith((b"ply\n", b"ply\r\n")) or head[:4] == b"glTF"

    def decode(self, data: bytes, *, limits: MediaLimits, options: DecodeOptions, name: str | None = None):
        raise MediaError(self.modality, "unsupported", "3D files are an output only: no encoder reads them")

    def validate(self, data: Any, meta: Mapping[str, Any]) -> None:
        if isinstance(data, Mesh3D):
            return  # checked at construction
        validate_points(data)

    def encode(self, data: Any, meta: Mapping[str, Any]) -> tuple[bytes, str, str]:
        if isinstance(data, Mesh3D):
            return encode_glb(data), GLB_MIME, "glb"
        return encode_ply(data), PLY_MIME, "ply"

    def output_types(self) -> dict[str, str]:
        return {PLY_MIME: "ply", GLB_MIME: "glb"}

    def degenerate(self, data: Any) -> str | None:
        xyz = data.vertices if isinstance(data, Mesh3D) else data[:, :3]
        if isinstance(data, Mesh3D) and len(data.faces) == 0:
            return "a mesh without faces"
        if len(xyz) == 0 or float(np.ptp(xyz, axis=0).max()) < COLLAPSED_EXTENT:
            return "every point at one place"
        return None


OBJECT3D_SPEC = ModalitySpec(
    name="object3d",
    label="object3d",  # as the other modalities: the name (the page and history references match labels to media)
    noun="3D model",
    signal_prefix="3D",
    default_signal_count=4,
    input_markers=("<Object3d>", "</Object3d>"),
    content_part="object3d_url",
    answer_field="objects3d",
    input_mime_types=(),  # an output only (see the module docstring)
    file_extensions=(".ply", ".glb"),
    option_fields=("num_inference_steps", "guidance_scale"),
    in_default_signals=False,  # added after the presets were trained: only a preset that lists or decodes it
    codec=Object3DCodec(),
)
OBJECT3D = register_modality(OBJECT3D_SPEC)
