"""The one exception type that reaches a user as a single clear sentence."""

import sys
import traceback


class CopierError(Exception):
    """Bad input or a failed run, explained in one sentence that names the input and what is wrong."""


class Interrupted(CopierError):
    """The user stopped the run; the sentence says where. `kept`: the results it kept (with save_on_cancel)."""

    kept: list | tuple = ()  # set per exception, never changed in place


def sentence(exc: BaseException) -> str:
    """The one line a user sees for `exc`: a CopierError's own sentence; for an error no check foresaw (a full disk,
    out of memory), its kind and message, or an OSError's reason and file."""
    if isinstance(exc, CopierError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}"
    return f"{type(exc).__name__}: {exc}"


def reported(exc: BaseException) -> str:
    """`sentence(exc)`, and an error no check foresaw also as its traceback on stderr (the WebUI's console), where
    a report can take it from."""
    if not isinstance(exc, CopierError):
        traceback.print_exception(exc, file=sys.stderr)
    return sentence(exc)


def check_file(path, what: str):
    """`path` (a `pathlib.Path`) if it is a file; otherwise the sentence for an input that is missing or a folder."""
    if path.is_dir():
        raise CopierError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise CopierError(f"{what} {path} does not exist")
    return path


def shown(value, limit: int = 60) -> str:
    """`repr(value)` for a sentence, cut to about `limit` characters: a request can hold megabytes where a name goes."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}… ({len(str(value))} characters)"
