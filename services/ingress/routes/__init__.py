"""One FastAPI router per resource; :data:`ROUTERS` in the order the app includes them."""

from __future__ import annotations

from services.ingress.routes.artifacts import router as artifacts
from services.ingress.routes.chat import router as chat
from services.ingress.routes.edits import router as edits
from services.ingress.routes.generations import router as generations
from services.ingress.routes.page import router as page
from services.ingress.routes.speech import router as speech
from services.ingress.routes.skills import router as skills
from services.ingress.routes.system import router as system
from services.ingress.routes.transcriptions import router as transcriptions
from services.ingress.routes.videos import router as videos

ROUTERS = (chat, generations, edits, speech, transcriptions, videos, skills, artifacts, system, page)

__all__ = ["ROUTERS"]
