"""HTTP API under /copier-lora/v1, on the WebUI's FastAPI app.

Requests are checked before a job starts (a bad one gets 4xx and one sentence); jobs run in the background under
the WebUI's queue lock. Routes ask for the same HTTP Basic credentials as the WebUI's own API when it was started
with --api-auth.
"""

from __future__ import annotations

import base64
import binascii
import io
import secrets
from collections.abc import Callable
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from lib_copier.effects.registry import all_effects
from lib_copier.errors import CopierError
from lib_copier.models.cli import slug
from lib_copier.models.generate import Txt2Img
from lib_copier.recipes.job import METHODS, make_effects
from lib_copier.recipes.outputs import check_name
from lib_copier.train.config import make_config
from lib_copier.webui.jobs import JobRunner, JobState
from lib_copier.webui.lora_tools import TOOLS, run_tool
from lib_copier.webui.training import TrainRequest

PREFIX = "/copier-lora/v1"


def decode_image(data: str) -> Image.Image:
    """A base64 image (a `data:image/...;base64,` prefix allowed) → RGB, or one sentence saying what is wrong."""
    try:
        raw = base64.b64decode(data.split(",", 1)[1] if data.startswith("data:") else data, validate=True)
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (binascii.Error, ValueError) as exc:
        raise CopierError("the image is not valid base64") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise CopierError("the image could not be read (not a PNG, JPEG or WebP file, or truncated)") from exc
    return image.convert("RGB")


def train_request(body: dict) -> TrainRequest:
    """The JSON of POST /train → a checked TrainRequest."""
    known = {
        "image", "generate", "name", "effects", "method", "preset", "overrides", "caption", "prompt_pool", "size",
        "grid_prompts", "grid_steps", "grid_seed", "save_on_interrupt",
    }  # fmt: skip
    unknown = sorted(set(body) - known)
    if unknown:
        raise CopierError(f"unknown field(s) {', '.join(unknown)}; the fields are {', '.join(sorted(known))}")
    if ("image" in body) == ("generate" in body):
        raise CopierError('give either "image" (base64) or "generate" (generation parameters), not both or neither')
    generate = None
    if "generate" in body:
        try:
            generate = Txt2Img(**body["generate"])
        except TypeError as exc:
            raise CopierError(f'"generate" takes prompt, negative, seed, steps, cfg, width, height ({exc})') from exc
    image = decode_image(body["image"]) if "image" in body else None
    name = body.get("name") or slug(generate.prompt if generate else "copier", 30) or "copier"
    method = body.get("method", "copier")
    if method not in METHODS:
        raise CopierError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    effects = make_effects([_chain(spec) for spec in body.get("effects", [])])
    preset, overrides = body.get("preset", "quick"), dict(body.get("overrides", {}))
    make_config(preset, **overrides)  # unknown settings and out-of-range values fail here, before the job
    return TrainRequest(
        image=image,
        generate=generate,
        name=check_name(name),
        effects=effects,
        method=method,
        preset=preset,
        overrides=overrides,
        caption=str(body.get("caption", "")),
        prompt_pool=int(body.get("prompt_pool", 32)),
        size=body.get("size"),
        grid_prompts=list(
            body.get("grid_prompts", TrainRequest.__dataclass_fields__["grid_prompts"].default_factory())
        ),
        grid_steps=int(body.get("grid_steps", 20)),
        grid_seed=int(body.get("grid_seed", 0)),
        save_on_interrupt=bool(body.get("save_on_interrupt", False)),
    )


def _chain(spec) -> list[str]:
    """An effect chain: "outline:thickness=3+grayscale" or ["outline:thickness=3", "grayscale"]."""
    if isinstance(spec, str):
        return spec.split("+")
    if isinstance(spec, list) and all(isinstance(s, str) for s in spec):
        return spec
    raise CopierError(f"an effect is a string like 'outline:thickness=3+grayscale', not {spec!r}")


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
    lora_dir: Callable[[], Path],
    checkpoint: Callable[[str], Path] | None = None,
    checkpoint_dir: Callable[[], Path] | None = None,
    auth: str | None = None,
) -> None:
    """Register the routes on the WebUI's FastAPI `app`. `run(request, state)` trains on the loaded model,
    `checkpoint(name)` is the file of one of the WebUI's checkpoints."""
    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    dependencies = []
    if auth:
        users = dict(pair.split(":", 1) for pair in auth.split(","))
        basic = HTTPBasic()

        def check(credentials: HTTPBasicCredentials = Depends(basic)):  # noqa: B008 (FastAPI's idiom)
            expected = users.get(credentials.username)
            if expected is None or not secrets.compare_digest(credentials.password, expected):
                raise HTTPException(401, "incorrect username or password", headers={"WWW-Authenticate": "Basic"})

        dependencies = [Depends(check)]

    def bad(exc: CopierError):
        return HTTPException(400, str(exc))

    def train(body: dict):
        try:
            request = train_request(body)
        except CopierError as exc:
            raise bad(exc) from exc
        state = runner.submit(lambda state: run(request, state))
        return {"id": state.id}

    def job(job_id: str):
        try:
            return runner.get(job_id).as_dict()
        except CopierError as exc:
            raise HTTPException(404, str(exc)) from exc

    def interrupt(job_id: str):
        try:
            return runner.interrupt(job_id).as_dict()
        except CopierError as exc:
            raise HTTPException(404, str(exc)) from exc

    def tool(name: str):
        def run(body: dict):
            try:
                with runner.lock:  # like every job: not while a generation or a training runs
                    return run_tool(name, body, lora_dir(), checkpoint, checkpoint_dir() if checkpoint_dir else None)
            except CopierError as exc:
                raise bad(exc) from exc

        return run

    app.add_api_route(f"{PREFIX}/train", train, methods=["POST"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/jobs/{{job_id}}", job, methods=["GET"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/jobs/{{job_id}}/interrupt", interrupt, methods=["POST"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/effects", effects_listing, methods=["GET"], dependencies=dependencies)
    for name in TOOLS:
        app.add_api_route(f"{PREFIX}/lora/{name}", tool(name), methods=["POST"], dependencies=dependencies)
