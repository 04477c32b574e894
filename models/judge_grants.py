"""A reinforcement job's pass to its judge models on the inference server. The training child must not hold
the inference token, which would let it ask for any organisation's model: the worker gives it instead a
grant signed with that token, naming the job's organisation and the judges' targets, and the inference
server admits a chat completion carrying it only for exactly those. A grant expires: the worker signs a
fresh one at every heartbeat, valid for a lease, so one read from a trainer's files stops working about a
lease after its attempt ended (the clocks of workers and inference servers must agree, as leases already
ask)."""

import base64
import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any

from models.inference import Forwarded, Target

PREFIX = "judge."
FILE = "judge_grant"
"""The grant's file in an attempt's working directory."""


def sign(secret: str, organization: str, targets: list[Target], *, expires: float) -> str:
    """A grant for chat completions of `targets` on behalf of `organization`, until `expires` (epoch)."""
    claims = {
        "organization": organization,
        "targets": [_canonical(t.model_dump(mode="json")) for t in targets],
        "expires": expires,
    }
    payload = base64.urlsafe_b64encode(json.dumps(claims, sort_keys=True).encode()).decode()
    return f"{PREFIX}{payload}.{_mac(secret, payload)}"


def admits(secret: str, grant: str, body: Forwarded, *, now: float) -> bool:
    """Whether `grant` is one signed with `secret`, unexpired at `now`, that covers this request's
    organisation and target."""
    payload, _, mac = grant.removeprefix(PREFIX).partition(".")
    if not grant.startswith(PREFIX) or not hmac.compare_digest(mac.encode(), _mac(secret, payload).encode()):
        return False
    claims = json.loads(base64.urlsafe_b64decode(payload))
    target = _canonical(body.target.model_dump(mode="json"))
    covered = claims["organization"] == body.organization and target in claims["targets"]
    return covered and claims["expires"] > now


def write(path: Path, grant: str) -> None:
    """Replace the grant at `path` in one step: a trainer reading it mid-renewal sees the old or the new."""
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text(grant)
    os.replace(partial, path)


def _canonical(target: dict[str, Any]) -> str:
    return json.dumps(target, sort_keys=True)


def _mac(secret: str, payload: str) -> str:
    return hmac.new(secret.encode(), payload.encode(), hashlib.sha256).hexdigest()
