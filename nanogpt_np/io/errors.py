"""The one error type of run directories and GPT-2 folders, and the JSON reader both use.

checkpoint.py (our run directories) and hf_gpt2.py (Hugging Face GPT-2 folders) both raise CheckpointError,
so the command lines report a missing, corrupt or foreign checkpoint the same way, whichever kind it is.
"""
import json


class CheckpointError(ValueError):
    """A run directory (or GPT-2 folder) that is missing, incomplete, corrupt or from another architecture."""


def read_json_object(path) -> dict:
    """The JSON object in `path`; CheckpointError naming the file if it is missing, corrupt or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable or not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data
