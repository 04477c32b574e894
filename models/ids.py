"""Public identifiers in OpenAI's shapes (`ftjob-…`, `file-…`), random base62."""

import secrets
import string

_ALPHABET = string.ascii_letters + string.digits


def random_id(prefix: str, length: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(length))


def job_id() -> str:
    return random_id("ftjob-")


def file_id() -> str:
    return random_id("file-")


def event_id() -> str:
    return random_id("ftevent-")


def checkpoint_id() -> str:
    return random_id("ftckpt_")


def model_suffix_id() -> str:
    return random_id("", 8)


def sweep_id() -> str:
    return random_id("ftsweep-")
