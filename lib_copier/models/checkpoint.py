"""Load and save whole models as LDM/SGM-layout checkpoints.

Loading builds the model on the meta device and assigns each tensor as it is read, so weights exist once in
memory (plus the file's page cache). The family is read from the keys; a config stored in our own metadata
(`copier.model_config`) wins, which is how the tiny and built-in models come back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from lib_copier.atomic import atomic_write
from lib_copier.errors import CopierError, check_file
from lib_copier.models.clip_text import UNWRAPPED
from lib_copier.models.configs import SD1, SD2, SD2_V, SDXL, ModelConfig
from lib_copier.models.sd_model import StableDiffusion

CONFIG_KEY = "copier.model_config"
INPUT_CONV = "model.diffusion_model.input_blocks.0.0.weight"  # its input channels: 4 latent ones, or more
_ORDINARY = "Copier LoRA needs an ordinary SD1, SD2 or SDXL checkpoint"

# A key only that family's checkpoints have, checked in this order.
FAMILY_MARKERS = (
    ("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", SDXL),
    ("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", SD2),
    ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", SD1),
)


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class _Safetensors:
    """A `.safetensors` file read one tensor at a time with a plain read, not through a memory map.

    `safe_open` maps the whole file, and every page a read touches then counts in the process's RSS for as long as
    the file is open: going through two SD checkpoints held both in memory. A read leaves only the tensor (the page
    cache belongs to the system)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > path.stat().st_size - 8:
                    raise ValueError(f"a header of {length} bytes in a file of {path.stat().st_size}")
                header = json.loads(f.read(length))
            self.metadata = header.pop("__metadata__", None) or {}
            self.entries = {name: (_DTYPES[e["dtype"]], e["shape"], *e["data_offsets"]) for name, e in header.items()}
        except (struct.error, ValueError, KeyError, TypeError) as exc:
            raise CopierError(f"checkpoint {path} is not a readable .safetensors file ({exc!r})") from exc
        self.start = 8 + length

    def get(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[name]
        data = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self.start + begin)
            if f.readinto(data) != len(data):
                raise CopierError(f"checkpoint {self.path} is truncated: {name} is cut off")
        if not data:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(shape)


def _torch_state(path: Path) -> dict:
    """The state dict of a weights-only torch file: zip (memory-mapped) or the legacy format torch wrote before 1.6."""
    with open(path, "rb") as f:
        start = f.read(1)
    zipped = zipfile.is_zipfile(path)
    if not zipped and start != b"\x80":  # a legacy torch file is a pickle, which begins with PROTO
        raise CopierError(f"checkpoint {path} is neither a torch checkpoint nor a .safetensors file")
    try:
        # str: torch 2.1 (A1111 1.10's) maps only a file named by a string
        data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as exc:
        raise CopierError(
            f"checkpoint {path} is a pickle that holds more than plain tensors, so it is not loaded for safety; "
            "convert it to .safetensors first"
        ) from exc
    except Exception as exc:  # a damaged file: torch raises what its reader met
        raise CopierError(f"checkpoint {path} is not a readable torch checkpoint ({exc.__class__.__name__})") from exc
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict):
        raise CopierError(f"checkpoint {path} holds no state dict")
    return state


# SD1 files saved with transformers before 4.x name the text encoder's parts without `text_model.`; A1111 renames them.
_OLD_SD1_TEXT = "cond_stage_model.transformer."


def _current_names(keys: Iterable[str]) -> dict[str, str]:
    """{the name a current SD1 file uses: the name in this one} for an old SD1 text encoder's keys."""
    renamed = {}
    for key in keys:
        rest = key.removeprefix(_OLD_SD1_TEXT)
        if rest != key and rest.startswith(UNWRAPPED):
            renamed[f"{_OLD_SD1_TEXT}text_model.{rest}"] = key
    return renamed


class TensorSource:
    """Keys, metadata and lazily read tensors of a `.safetensors` file or a weights-only `.ckpt`."""

    def __init__(self, path: Path):
        if path.is_dir() and ((path / "model_index.json").is_file() or (path / "unet").is_dir()):
            raise CopierError(
                f"checkpoint {path} is a diffusers folder; Copier LoRA reads single-file checkpoints (the .safetensors "
                "the WebUIs load): convert it first, with diffusers' scripts/convert_diffusers_to_original_"
                "stable_diffusion.py (or …_sdxl.py)"
            )
        self.path = check_file(path, "checkpoint")
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            file = _Safetensors(path)
            self.metadata, self._read = file.metadata, file.get
            shapes = {name: tuple(entry[1]) for name, entry in file.entries.items()}
        elif suffix in (".ckpt", ".pt", ".pth"):
            state = _torch_state(path)
            self.metadata, self._read = {}, state.__getitem__
            shapes = {name: tuple(v.shape) for name, v in state.items() if isinstance(v, torch.Tensor)}
        else:
            raise CopierError(f"checkpoint {path} has an unknown extension; expected .safetensors or .ckpt")
        self._renamed = renamed = _current_names(shapes)  # a name as current files have it → the name in this file
        names = (set(shapes) - set(renamed.values())) | set(renamed)
        self._shapes = {name: shapes[renamed.get(name, name)] for name in sorted(names)}
        self.keys = set(self._shapes)

    def get(self, name: str) -> torch.Tensor:
        return self._read(self._renamed.get(name, name))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, without reading the tensors."""
        return dict(self._shapes)


def check_ldm_checkpoint(source: TensorSource) -> None:
    """A LoRA, a VAE alone, or anything else without an LDM UNet, refused saying which."""
    if any(k.startswith("lora_") or ".lora_" in k for k in source.keys):  # kohya's, LyCORIS's, PEFT's keys
        raise CopierError(f"{source.path} is a LoRA, not a checkpoint")
    if any(k.startswith(("encoder.", "decoder.", "quant_conv.")) for k in source.keys):
        raise CopierError(f"{source.path} is a VAE alone, not a checkpoint")
    if not any(k.startswith("model.diffusion_model.") for k in source.keys):
        raise CopierError(
            f"checkpoint {source.path} is not a Stable Diffusion checkpoint in the LDM layout: "
            "it has no keys under model.diffusion_model."
        )


def detect_config(source: TensorSource) -> ModelConfig:
    if CONFIG_KEY in source.metadata:
        return ModelConfig.from_json(source.metadata[CONFIG_KEY])
    check_ldm_checkpoint(source)
    for marker, config in FAMILY_MARKERS:
        if marker in source.keys:
            return config
    if any(k.startswith("conditioner.embedders.0.model.") for k in source.keys):
        raise CopierError(
            f"checkpoint {source.path} has one OpenCLIP text encoder in SGM's layout: it is the SDXL refiner (or an "
            f"SD2 model saved by SGM, like SD-Turbo), which Copier LoRA does not train; {_ORDINARY}"
        )
    raise CopierError(
        f"checkpoint {source.path} has a UNet but no text encoder we know: expected one of "
        + ", ".join(m for m, _ in FAMILY_MARKERS)
    )


def check_plain_unet(shapes: Mapping[str, tuple[int, ...]], family: str, what: str) -> None:
    """One sentence for a UNet that needs more than noise and a prompt: one whose first convolution takes more than
    the 4 latent channels (the image to inpaint or to edit, or a depth map, comes in beside the noise), or an SD1/SD2
    one with a class embedding (unCLIP's image embedding). Neither drawing from a prompt nor training from one image
    has them to give. `shapes` maps LDM parameter names to shapes."""
    channels = shapes[INPUT_CONV][1] if INPUT_CONV in shapes else 4
    if channels != 4:
        kind = {9: "an inpainting model", 8: "an instruct-pix2pix model", 5: "a depth model"}
        kind = kind.get(channels, "not a plain text-to-image model")
        raise CopierError(f"{what} takes {channels} input channels, not 4: it is {kind}; {_ORDINARY}")
    if family != "sdxl" and any(name.startswith("model.diffusion_model.label_emb.") for name in shapes):
        raise CopierError(f"{what} takes an image embedding beside the prompt: it is an unCLIP model; {_ORDINARY}")


def _stored_prediction(metadata: dict[str, str]) -> str | None:
    value = metadata.get("modelspec.prediction_type", "")
    if value in ("v", "v_prediction"):
        return "v"
    if value in ("epsilon", "eps"):
        return "eps"
    return None


def _yaml_prediction(path: Path) -> str | None:
    """From the model config beside the checkpoint (`name.yaml`), which A1111 uses before its own test: LDM's
    `parameterization: "v"`, or eps where it names none; None without such a file."""
    config = path.with_suffix(".yaml")
    if not config.is_file():
        return None
    found = re.search(r"^\s*parameterization:\s*[\"']?(\w+)", config.read_text(errors="replace"), re.MULTILINE)
    return "v" if found and found.group(1) == "v" else "eps"


@torch.no_grad()
def _looks_like_v_prediction(model: StableDiffusion) -> bool:
    """SD2 files do not say whether they predict v; A1111's test: at t=999, a v model's output is far below x."""
    param = next(model.unet.parameters())
    x = torch.full((1, model.latent_channels, 8, 8), 0.5, dtype=param.dtype)
    ctx = torch.full((1, 77, model.config.unet.context_dim), 0.5, dtype=param.dtype)
    return (model.unet(x, torch.tensor([999]), ctx).float() - x.float()).mean().item() < -1


_PARTS = {"model.diffusion_model.": "UNet", "first_stage_model.": "VAE", "cond_stage_model.": "text encoder"}


def _check_complete(source: TensorSource, family: str, missing: list[str]) -> None:
    """One sentence for weights the model needs that the file lacks, naming a part it lacks entirely."""
    if not missing:
        return
    for prefix, part in _PARTS.items():
        if any(k.startswith(prefix) for k in missing) and not any(k.startswith(prefix) for k in source.keys):
            raise CopierError(
                f"checkpoint {source.path} holds no {part} (no {prefix}… weights): Copier LoRA needs a checkpoint "
                "that holds the whole model"
            )
    raise CopierError(
        f"checkpoint {source.path} looks like {family} but lacks {len(missing)} weights, e.g. {', '.join(missing[:3])}"
    )


def load_checkpoint(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    prediction: str | None = None,
) -> StableDiffusion:
    """Load an LDM-layout checkpoint. `dtype` None keeps the file's UNet dtype; `prediction` overrides detection."""
    source = TensorSource(Path(path))
    config = detect_config(source)
    with torch.device("meta"):
        model = StableDiffusion(config)
    expected = model.state_dict()
    check_plain_unet(source.shapes(), config.family, f"the UNet of checkpoint {source.path}")
    unread = tuple(model.unread_parameters())
    _check_complete(source, config.family, [k for k in expected if k not in source.keys and not k.startswith(unread)])
    if dtype is None:
        dtype = source.get(next(k for k in expected if k.startswith("model.diffusion_model."))).dtype
    state = {}
    for key, meta in expected.items():
        if key not in source.keys:  # one no output reads (a conversion from diffusers leaves them out)
            state[key] = torch.zeros(meta.shape, device=device, dtype=dtype)
            continue
        tensor = source.get(key)
        if tensor.shape != meta.shape:
            raise CopierError(
                f"checkpoint {source.path}: {key} has shape {tuple(tensor.shape)}, a {config.family} model needs "
                f"{tuple(meta.shape)}"
            )
        state[key] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval().requires_grad_(False)
    if config.family == "sd2" and CONFIG_KEY not in source.metadata:
        stored = prediction or _stored_prediction(source.metadata) or _yaml_prediction(source.path)
        is_v = stored == "v" if stored else _looks_like_v_prediction(model)
        model.config = SD2_V if is_v else SD2
    elif prediction:
        model.config = dataclasses.replace(model.config, prediction=prediction)
    return model


def standard_config(config: ModelConfig) -> bool:
    return config in (SD1, SD2, SD2_V, SDXL)


def save_checkpoint(
    model: StableDiffusion,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the model in the LDM layout, atomically; the config travels in the metadata unless it is standard."""
    state = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    metadata = {
        "modelspec.prediction_type": "v" if model.config.prediction == "v" else "epsilon",
        "copier.family": model.config.family,
    }
    if not standard_config(model.config):
        metadata[CONFIG_KEY] = model.config.to_json()
    ordered = dict(sorted(metadata.items()))
    return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=ordered), overwrite)
