"""The `sshs_model_hash` / `sshs_legacy_hash` metadata kohya writes and the WebUI shows.

kohya hashes a safetensors serialisation of the final tensors that carries only the `ss_*` metadata, so that
adding user metadata later does not change the hash: the model hash is sha256 over the tensor-data section
(everything after the header), the legacy hash the first 8 hex digits of sha256 over 64 KiB read at 1 MiB.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping

import torch
from safetensors.torch import save

LEGACY_OFFSET = 0x100000
LEGACY_LENGTH = 0x10000


def sshs_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(model hash, legacy hash) of `tensors` (already in their saved dtype) with the `ss_*` part of `metadata`."""
    training = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = save(dict(tensors), metadata=training)
    (header_length,) = struct.unpack("<Q", data[:8])
    model_hash = hashlib.sha256(data[8 + header_length :]).hexdigest()
    legacy_hash = hashlib.sha256(data[LEGACY_OFFSET : LEGACY_OFFSET + LEGACY_LENGTH]).hexdigest()[:8]
    return model_hash, legacy_hash
