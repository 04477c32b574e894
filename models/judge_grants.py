"""A reinforcement job's pass to its judge models on the inference server. The training child must not hold
the inference token, which would let it ask for any organisation's model: the worker gives it instead a
grant signed with that token, naming the job's organisation and the judges' targets, and the inference
server admits a chat completion carrying it only for exactly those."""

import base64
import hashlib
import hmac
import json
from typing import Any

from models.inference import Forwarded, Target

PREFIX = "judge."


def sign(secret: str, organization: str, targets: list[Target]) -> str:
    """A grant for chat completions of `targets` on behalf of `organization`."""
    claims = {
        "organization": organization,
        "targets": [_canonical(t.model_dump(mode="json")) for t in targets],
    }
    payload = base64.urlsafe_b64encode(json.dumps(claims, sort_keys=True).encode()).decode()
    return f"{PREFIX}{payload}.{_mac(secret, payload)}"


def admits(secret: str, grant: str, body: Forwarded) -> bool:
    """Whether `grant` is one signed with `secret` that covers this request's organisation and target."""
    payload, _, mac = grant.removeprefix(PREFIX).partition(".")
    if not grant.startswith(PREFIX) or not hmac.compare_digest(mac.encode(), _mac(secret, payload).encode()):
        return False
    claims = json.loads(base64.urlsafe_b64decode(payload))
    target = _canonical(body.target.model_dump(mode="json"))
    return claims["organization"] == body.organization and target in claims["targets"]


def _canonical(target: dict[str, Any]) -> str:
    return json.dumps(target, sort_keys=True)


def _mac(secret: str, payload: str) -> str:
    return hmac.new(secret.encode(), payload.encode(), hashlib.sha256).hexdigest()
