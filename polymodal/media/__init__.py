"""The built-in modalities, one module each holding its :class:`~polymodal.modality.ModalitySpec` and codec:
:mod:`.image`, :mod:`.audio`, :mod:`.video`, :mod:`.object3d` (3D: point clouds and meshes; registered in this order, which is the order of ``for m in Modality``
and of the preset's random-part seeds). Importing the ``polymodal`` package imports this one, so the built-ins are
registered before anything asks for them.

A plug-in modality registers its own spec the same way (:func:`polymodal.modality.register_modality`); see
docs/architecture.md ("A new modality").
"""

from polymodal.media.image import IMAGE, IMAGE_SPEC
from polymodal.media.audio import AUDIO, AUDIO_SPEC  # noqa: I001 - registration order: image, audio, video
from polymodal.media.video import VIDEO, VIDEO_SPEC
from polymodal.media.object3d import OBJECT3D, OBJECT3D_SPEC  # after video: appended, the built-ins' seeds unchanged

__all__ = ["AUDIO", "AUDIO_SPEC", "IMAGE", "IMAGE_SPEC", "OBJECT3D", "OBJECT3D_SPEC", "VIDEO", "VIDEO_SPEC"]
