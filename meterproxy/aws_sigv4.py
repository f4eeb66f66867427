"""Re-signing requests for an AWS upstream (Amazon Bedrock) with the operator's credentials.

A Bedrock client signs each request with AWS Signature Version 4 for the host it
talks to, which is meterproxy: that signature cannot be forwarded (it names the
wrong host, and meterproxy never holds the client's secret key to redo it). For
an upstream the operator lists in ``aws_sigv4``, meterproxy therefore drops the
client's ``Authorization`` and ``X-Amz-Date`` / ``X-Amz-Security-Token`` /
``X-Amz-Content-Sha256`` and signs the request again, as sent (method, raw path
and query, body), for the upstream's host, with credentials botocore finds the
standard way (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and ``~/.aws``, container and instance
roles; temporary credentials are refreshed by botocore).

What this means for security: anyone who can reach such a route spends the
operator's AWS account, so it is off unless configured, and the proxy should
listen where only its clients can reach it. The client's own access key id is
still fingerprinted (never stored), so rows say which client key asked.
"""

from __future__ import annotations

from collections.abc import Iterable

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.session import Session
from yarl import URL

__all__ = ["AwsSigner", "SigningError", "signing_service"]

# The client's signature and what it signed: replaced, never forwarded.
_CLIENT_SIGNATURE = frozenset({"authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256"})
# Headers we sign besides host and the x-amz-* we add: the ones that say what the body is.
_SIGNED = frozenset({"content-type", "accept", "x-amzn-bedrock-accept"})
# Bedrock's endpoints sign as service "bedrock".
_SERVICES = {
    "bedrock-runtime": "bedrock",
    "bedrock-runtime-fips": "bedrock",
    "bedrock-agent-runtime": "bedrock",
}


class SigningError(RuntimeError):
    """No AWS credentials could be found for a route that re-signs."""


def signing_service(host: str) -> str:
    """The SigV4 service name for an AWS endpoint host (``bedrock-runtime.*`` signs as bedrock)."""
    first = host.split(".", 1)[0].lower()
    return _SERVICES.get(first, "bedrock")


class AwsSigner:
    """Signs requests for one upstream: a region, a service, the operator's credentials."""

    def __init__(self, region: str, *, credentials: Credentials | None = None) -> None:
        self.region = region
        creds = credentials if credentials is not None else Session().get_credentials()
        if creds is None:
            raise SigningError(
                "no AWS credentials found for re-signing (set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with an instance/container role)"
            )
        self._credentials = creds

    def sign(
        self, method: str, url: URL, headers: Iterable[tuple[str, str]], body: bytes
    ) -> list[tuple[str, str]]:
        """The headers to send: the client's, minus its signature, plus ours for ``url``."""
        kept = [(n, v) for n, v in headers if n.lower() not in _CLIENT_SIGNATURE]
        to_sign = {n: v for n, v in kept if n.lower() in _SIGNED}
        request = AWSRequest(method=method, url=str(url), data=body, headers=to_sign)
        frozen = self._credentials.get_frozen_credentials()
        SigV4Auth(frozen, signing_service(url.raw_host or ""), self.region).add_auth(request)
        added = [
            (name, value)
            for name, value in request.headers.items()
            if name.lower() in _CLIENT_SIGNATURE and isinstance(value, str)
        ]
        return kept + added
