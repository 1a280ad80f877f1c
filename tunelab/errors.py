"""The one user-facing error type and its 'did you mean' helper. Kept apart from hparams so pure modules
import them without transformers."""

import difflib


class TunelabError(Exception):
    """A user-facing error: printed by the CLI as one line naming the problem and the valid choices."""


def closest(name: str, valid, n: int = 3) -> str:
    """'did you mean ...' text for an unknown name, or the full list when nothing is close."""
    near = difflib.get_close_matches(name, list(valid), n=n, cutoff=0.6)
    if near:
        return "did you mean " + " or ".join(near) + "?"
    return "valid: " + ", ".join(valid)
