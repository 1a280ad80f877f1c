"""The one user-facing error type, its 'did you mean' helper, and `user_message`: which exceptions the CLI
prints as one line. Kept apart from hparams so pure modules import them without transformers."""

import difflib
import errno
import json


class TunelabError(Exception):
    """A user-facing error: printed by the CLI as one line naming the problem and the valid choices."""


def closest(name: str, valid, n: int = 3) -> str:
    """'did you mean ...' text for an unknown name, or the full list when nothing is close."""
    near = difflib.get_close_matches(name, list(valid), n=n, cutoff=0.6)
    if near:
        return "did you mean " + " or ".join(near) + "?"
    return "valid: " + ", ".join(valid)


_OS_HINTS = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
             errno.EACCES: "no permission", errno.EPERM: "no permission", errno.EDQUOT: "disk quota exceeded"}


def user_message(err: BaseException) -> str | None:
    """The one line to print for an error that is the user's input or the machine's state (not a bug in
    tunelab), or None for anything else (a bug: the CLI shows its traceback)."""
    if isinstance(err, TunelabError):
        return str(err)
    if isinstance(err, OSError):  # disk full, read-only, permission, missing file: name the path
        what = _OS_HINTS.get(err.errno) or err.strerror or str(err)
        if err.filename is None:
            return f"{what} ({type(err).__name__}: {err})"
        paths = f"{err.filename}" + (f" -> {err.filename2}" if err.filename2 else "")
        return f"{what}: {paths} ({type(err).__name__})"
    if isinstance(err, UnicodeDecodeError):
        return f"not UTF-8 text: {err.reason} at byte offset {err.start}"
    if isinstance(err, json.JSONDecodeError):
        return f"malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}"
    name = type(err).__name__
    if any(c.__name__ == "YAMLError" for c in type(err).__mro__):  # yaml's errors, without importing yaml
        return "malformed YAML: " + " ".join(str(err).split())
    if name == "SafetensorError" and "os error" in str(err).lower():  # safetensors' I/O errors (disk full)
        return "writing weights failed: " + " ".join(str(err).split())
    if name == "OutOfMemoryError" or isinstance(err, MemoryError):
        return ("out of memory: lower --per_device_train_batch_size / --per_device_eval_batch_size or the "
                "max lengths (" + " ".join(str(err).split())[:200] + ")")
    return None
