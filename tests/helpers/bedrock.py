"""Amazon Bedrock test helpers: recorded answers, the operator's credentials, a SigV4 check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import boto3
import pytest
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

__all__ = [
    "FIXTURES",
    "MODEL",
    "OPERATOR",
    "bedrock_upstream",
    "body",
    "client_for",
    "operator_env",
    "signature_ok",
]

FIXTURES = Path(__file__).parent.parent / "fixtures" / "bedrock"
MODEL = "anthropic.claude-3-5-sonnet-20240620-v1:0"
OPERATOR = Credentials("AKIDOPERATOR0000", "operator-secret", "operator-session-token")


def body(name: str) -> bytes:
    return (FIXTURES / f"{name}.body").read_bytes()


def signature_ok(request: web.Request, payload: bytes, creds: Credentials) -> bool:
    """Recompute the request's SigV4 signature as AWS does, from what arrived."""
    auth = request.headers.get("authorization", "")
    signed = auth.split("SignedHeaders=", 1)[1].split(",", 1)[0].split(";")
    sent = auth.rsplit("Signature=", 1)[1]
    scope = auth.split("Credential=", 1)[1].split(",", 1)[0].split("/")
    url = f"http://{request.headers['host']}{request.raw_path}"
    headers = {name: request.headers[name] for name in signed if name != "host"}
    check = AWSRequest(method=request.method, url=url, data=payload, headers=headers)
    check.context["timestamp"] = request.headers["x-amz-date"]
    signer = SigV4Auth(creds, scope[3], scope[2])
    expected = signer.signature(signer.string_to_sign(check, signer.canonical_request(check)), check)
    return scope[0] == creds.access_key and expected == sent


def bedrock_upstream(upstream: Any, replies: dict[str, tuple[bytes, str, dict[str, str]]]) -> list[Any]:
    seen: list[tuple[web.Request, bytes]] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        payload = await request.read()
        seen.append((request, payload))
        if not signature_ok(request, payload, OPERATOR):
            return web.json_response(
                {"message": "The request signature we calculated does not match"}, status=403
            )
        data, content_type, headers = replies[request.raw_path.rsplit("/", 1)[1]]
        response = web.StreamResponse(headers={"Content-Type": content_type, **headers})
        await response.prepare(request)
        for i in range(len(data)):  # one byte at a time
            await response.write(data[i : i + 1])
        await response.write_eof()
        return response

    prefix = f"/model/{MODEL.replace(':', '%3A')}"
    for operation in replies:
        upstream.replies[f"{prefix}/{operation}".replace("%3A", ":")] = handle
    return seen


@pytest.fixture
def operator_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", OPERATOR.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", OPERATOR.secret_key)
    monkeypatch.setenv("AWS_SESSION_TOKEN", OPERATOR.token)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def client_for(proxy_url: str) -> Any:
    # What a client sets: the proxy as endpoint_url; its own credentials are only used to
    # sign the hop to the proxy, which drops that signature.
    return boto3.client(
        "bedrock-runtime",
        region_name="us-east-1",
        endpoint_url=f"{proxy_url}/bedrock",
        aws_access_key_id="AKIDCLIENT000000",
        aws_secret_access_key="client-secret",
        config=Config(retries={"max_attempts": 1}),
    )
