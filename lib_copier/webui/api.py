"""HTTP API under /copier-lora/v1, on the WebUI's FastAPI app.

Requests are checked before a job starts (a bad one gets 4xx and one sentence); jobs run in the background under
the WebUI's queue lock. Routes ask for the same HTTP Basic credentials as the WebUI's own API when it was started
with --api-auth.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lib_copier.effects.registry import all_effects
from lib_copier.errors import CopierError
from lib_copier.fields import json_schema
from lib_copier.recipes.request import TrainRequest, check_originals_fit, request_from_json
from lib_copier.webui.jobs import JobRunner, JobState
from lib_copier.webui.lora_tools import REQUESTS, TOOLS, check_tool, run_checked

PREFIX = "/copier-lora/v1"


def effects_listing() -> list[dict]:
    return [
        {
            "name": e.name,
            "label": e.label,
            "description": e.description,
            "params": [vars(p) for p in e.params],
        }
        for e in all_effects()
    ]


def add_routes(
    app,
    runner: JobRunner,
    run: Callable[[TrainRequest, JobState], list[dict]],
    lora_dirs: Callable[[], list[Path]],
    checkpoint: Callable[[str], Path] | None = None,
    checkpoint_dir: Callable[[], Path] | None = None,
    auth: str | None = None,
    model_side: Callable[[], int | None] | None = None,
) -> None:
    """Register the routes on the WebUI's FastAPI `app`. `run(request, state)` trains on the loaded model,
    `checkpoint(name)` is the file of one of the WebUI's checkpoints, `model_side()` the loaded model's native side
    (what the originals are fitted to; None while no model is loaded)."""
    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic

    from lib_copier.webui.json_body import json_body

    dependencies = []
    if auth:
        users = dict(pair.split(":", 1) for pair in auth.split(","))
        basic = HTTPBasic()

        # No annotation: FastAPI 0.94 (A1111 1.10's) resolves one only among the module's names, not this function's.
        def check(credentials=Depends(basic)):  # noqa: B008 (FastAPI's idiom)
            expected = users.get(credentials.username)
            given = credentials.password.encode()  # compare_digest takes str only when it is ASCII
            if expected is None or not secrets.compare_digest(given, expected.encode()):
                raise HTTPException(401, "incorrect username or password", headers={"WWW-Authenticate": "Basic"})

        dependencies = [Depends(check)]

    def bad(exc: CopierError):
        return HTTPException(400, str(exc))

    def train(body: Any = Depends(json_body)):  # noqa: B008 (FastAPI's idiom); checked by request_from_json
        try:
            request = request_from_json(body)
            side = model_side() if model_side is not None else None
            if side is not None:  # None: the model is still to be loaded, and the job checks them then
                check_originals_fit(request, side)
        except CopierError as exc:
            raise bad(exc) from exc
        state = runner.submit(lambda state: run(request, state))
        return {"id": state.id}

    def job(job_id: str):
        try:
            return runner.describe(job_id)
        except CopierError as exc:
            raise HTTPException(404, str(exc)) from exc

    def interrupt(job_id: str):
        try:
            return runner.interrupt(job_id).as_dict()
        except CopierError as exc:
            raise HTTPException(404, str(exc)) from exc

    def tool(name: str):
        def run(body: Any = Depends(json_body)):  # noqa: B008 (FastAPI's idiom); checked by check_tool
            try:
                checked = check_tool(name, body, lora_dirs(), checkpoint, checkpoint_dir() if checkpoint_dir else None)
                with runner.lock:  # like every job: not while a generation or a training runs
                    return run_checked(checked)
            except CopierError as exc:
                raise bad(exc) from exc

        return run

    app.add_api_route(
        f"{PREFIX}/train", train, methods=["POST"], dependencies=dependencies, openapi_extra=_schema(TrainRequest)
    )
    app.add_api_route(f"{PREFIX}/jobs/{{job_id}}", job, methods=["GET"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/jobs/{{job_id}}/interrupt", interrupt, methods=["POST"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/effects", effects_listing, methods=["GET"], dependencies=dependencies)
    for name in TOOLS:
        app.add_api_route(
            f"{PREFIX}/lora/{name}",
            tool(name),
            methods=["POST"],
            dependencies=dependencies,
            openapi_extra=_schema(REQUESTS[name]),
        )


def _schema(cls) -> dict:
    """The request body's schema for /docs, from the same fields that check it."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": json_schema(cls)}}}}
