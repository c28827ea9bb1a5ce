"""Hugging Face Hub ids: telling one from a local path."""

from __future__ import annotations

import os
from pathlib import Path


def is_hub_id(name: str | os.PathLike | None) -> bool:
    """True for a name that can only be a Hub repo id: valid as one (huggingface_hub's
    ``validate_repo_id``), not an existing path and not a ``.gguf`` file; None (the
    embedded model) is not one."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name is None or str(name).endswith(".gguf") or Path(name).exists():
        return False
    try:
        validate_repo_id(str(name))
    except HFValidationError:
        return False
    return True
