"""The recipe's method names, importable without torch (the CLI's argument parser needs them)."""

from __future__ import annotations

from lib_copier.train.config import PAIR_LOSSES

COPIER_METHODS = ("copier", "extraction", "both")  # those that train the original's copier A first
METHODS = (*COPIER_METHODS, *PAIR_LOSSES)  # the pair methods learn from (original, processed) with no copier
# What the tab, the CLI and the API train unless told otherwise: in docs/method-report.md addift carries more of the
# effect than the copier method, leaks no more, keeps more of the structure, and trains in a sixth of the time.
DEFAULT_METHOD = "addift"
