"""The web pane behind ``lifeboat web``: FastAPI, server-rendered Jinja2 pages, htmx (vendored in
``static/``, no CDN), a JSON API under ``/api/``. Imported only by that command, so other commands
never pay for FastAPI. It reads through the orchestrator's facade (``orchestrator/api.py``) and
``lifeboat.archive.Archive``, never the state database or archive files directly.
"""
