"""Seeds as the WebUIs take them: -1 asks for a random one."""

from __future__ import annotations

import secrets

RANDOM = -1


def fixed_seed(seed: int) -> int:
    """`seed`, or in place of -1 a random one, drawn once so that whatever uses it can record which it was."""
    return secrets.randbelow(2**31) if seed == RANDOM else seed
