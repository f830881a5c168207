"""The serving graph: an OpenAI-compatible FastAPI ingress (no torch) over an LLM stage and one decoder
stage per modality, hosted by Ray Serve (:mod:`services.app`) or in one process (:mod:`services.local`).

Entry points: :func:`services.run.serve_main` (the CLI's ``serve``), :func:`services.app.app_builder`
(``deploy/serve.yaml``), :func:`services.ingress.build_app` (any backend).
"""
