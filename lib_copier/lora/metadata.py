"""The metadata a LoRA file carries: kohya's `ss_*` keys and Stability's `modelspec.*` (ModelSpec 1.0.1).

The WebUI reads `ss_base_model_version` / `ss_v2` to tell which model family a LoRA is for, and kohya's tools read
`ss_network_*`; `modelspec.*` is what other UIs and model hubs read.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

NETWORK_MODULE = "networks.lora"
SPEC_VERSION = "1.0.1"
IMPLEMENTATION_SGM = "https://github.com/Stability-AI/generative-models"
IMPLEMENTATION_DIFFUSERS = "diffusers"

_BASE_VERSION = {
    ("sd1", False): "sd_v1",
    ("sd2", False): "sd_v2",
    ("sd2", True): "sd_v2_v",
    ("sdxl", False): "sdxl_base_v1-0",
}
_ARCHITECTURE = {
    ("sd1", False): "stable-diffusion-v1",
    ("sd2", False): "stable-diffusion-v2-512",
    ("sd2", True): "stable-diffusion-v2-768-v",
    ("sdxl", False): "stable-diffusion-xl-v1-base",
}
_RESOLUTION = {"sd1": 512, "sd2": 512, "sdxl": 1024}


@dataclass
class NetworkInfo:
    """What a LoRA file says about itself; `training` holds further `ss_*` hyper-parameters (without the prefix)."""

    family: str
    rank: int | str  # an int, or "Dynamic" after a dynamic resize
    alpha: float | str
    title: str
    v_prediction: bool = False
    conv_rank: int | None = None
    conv_alpha: float | None = None
    resolution: tuple[int, int] | None = None  # the trained (width, height); the family's side squared if None
    comment: str = ""
    description: str = ""
    training: dict[str, object] = field(default_factory=dict)


def base_model_version(family: str, v_prediction: bool = False) -> str:
    return _BASE_VERSION[(family, v_prediction and family == "sd2")]


def build_metadata(info: NetworkInfo, now: float | None = None) -> dict[str, str]:
    now = time.time() if now is None else now
    v = info.v_prediction and info.family == "sd2"
    args = {}
    if info.conv_rank is not None:
        args = {"conv_dim": str(info.conv_rank), "conv_alpha": str(info.conv_alpha or info.conv_rank)}
    side = 768 if v else _RESOLUTION[info.family]
    width, height = info.resolution or (side, side)
    metadata = {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": str(info.rank),
        "ss_network_alpha": str(info.alpha),
        "ss_network_args": json.dumps(args),
        "ss_base_model_version": base_model_version(info.family, v),
        "ss_v2": str(info.family == "sd2"),
        "ss_output_name": info.title,
        "ss_training_comment": info.comment,
        "ss_resolution": str((width, height)),
        **{f"ss_{name}": str(value) for name, value in info.training.items()},
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.architecture": f"{_ARCHITECTURE[(info.family, v)]}/lora",
        "modelspec.implementation": IMPLEMENTATION_SGM if info.family == "sdxl" else IMPLEMENTATION_DIFFUSERS,
        "modelspec.title": info.title,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.prediction_type": "v" if v else "epsilon",
    }
    if info.description:
        metadata["modelspec.description"] = info.description
    return metadata


def family_from_metadata(metadata: dict[str, str]) -> str | None:
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl"):
        return "sdxl"
    if version.startswith("sd_v2") or metadata.get("ss_v2") == "True":
        return "sd2"
    if version.startswith("sd_v1"):
        return "sd1"
    return None
