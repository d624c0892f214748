"""The API routes' request body, read by us rather than by FastAPI, whose answer to a body that is not JSON is a 422
list of its own. Imported only inside the WebUI, which brings FastAPI; no `from __future__ import annotations` here,
because FastAPI 0.94 (A1111 1.10's) needs the `Request` annotation as the class itself."""

import json
from typing import Any

from fastapi import HTTPException, Request


async def json_body(request: Request) -> Any:
    """The parsed body, None when it is empty, or a 400 with one sentence."""
    raw = await request.body()
    try:
        return json.loads(raw) if raw.strip() else None
    except ValueError as exc:  # UnicodeDecodeError included
        raise HTTPException(400, f"the request body is not valid JSON ({exc})") from exc
    except RecursionError as exc:
        raise HTTPException(400, "the request body is JSON nested too deeply to read") from exc
