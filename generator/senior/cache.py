"""The response cache: an unchanged request costs nothing the second time."""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..user_cache import write_whole
from .models import ModelReply


class ResponseCache:
    """Content-addressed answers: `<dir>/<hash[:2]>/<hash>.json`, written atomically."""

    def __init__(self, folder: Path):
        self.folder = folder

    def _path(self, request_hash: str) -> Path:
        return self.folder / request_hash[:2] / f"{request_hash}.json"

    def get(self, request_hash: str) -> ModelReply | None:
        path = self._path(request_hash)
        try:
            return ModelReply.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # a corrupt entry is a miss, and goes away (when the folder lets it)
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            return None

    def put(self, request_hash: str, reply: ModelReply) -> None:
        try:
            text = reply.model_copy(update={"cached": False}).model_dump_json()
        except ValueError:  # an answer that cannot be kept costs tokens later, not the build
            return
        write_whole(self._path(request_hash), text)

