"""A fake OpenID provider of the tests' own, for ID tokens the real mock provider would
never sign: wrong nonce, other issuer or audience, expired, ``alg: none``, HS256 signed
with the public key, unknown ``kid``. Serves discovery, JWKS and a token endpoint that
answers with whatever token the test hands it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import jwt
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support import free_port


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class FakeIdP:
    def __init__(self) -> None:
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = "k1"
        self.client_id = "qnp-test-client"
        self.subject = "fake-subject"
        # Given the nonce of the sign-in, returns the ID token to answer with.
        self.make_token: Callable[[str], str] = self.good_token
        self.nonce = ""
        self.token_requests: list[dict[str, str]] = []

    @property
    def public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def claims(self, nonce: str, **changes: Any) -> dict[str, Any]:
        now = int(time.time())
        found = {"iss": self.issuer, "aud": self.client_id, "sub": self.subject,
                 "iat": now, "exp": now + 300, "nonce": nonce,
                 "email": "fake@example.test", "email_verified": True}
        found.update(changes)
        return {k: v for k, v in found.items() if v is not None}

    def good_token(self, nonce: str, **changes: Any) -> str:
        return jwt.encode(self.claims(nonce, **changes), self.key, algorithm="RS256",
                          headers={"kid": self.kid})

    def unsigned_token(self, nonce: str) -> str:
        header = b64(json.dumps({"alg": "none", "kid": self.kid}).encode())
        return f"{header}.{b64(json.dumps(self.claims(nonce)).encode())}."

    def hs256_with_public_key(self, nonce: str) -> str:
        # The classic confusion attack: HMAC keyed with the (public) PEM.
        header = b64(json.dumps({"alg": "HS256", "kid": self.kid, "typ": "JWT"}).encode())
        body = b64(json.dumps(self.claims(nonce)).encode())
        mac = hmac.new(self.public_pem, f"{header}.{body}".encode(), hashlib.sha256).digest()
        return f"{header}.{body}.{b64(mac)}"

    def app(self) -> web.Application:
        app = web.Application()

        async def discovery(request: web.Request) -> web.Response:
            return web.json_response({
                "issuer": self.issuer,
                "authorization_endpoint": f"{self.issuer}/authorize",
                "token_endpoint": f"{self.issuer}/token",
                "jwks_uri": f"{self.issuer}/jwks",
                "id_token_signing_alg_values_supported": ["RS256", "HS256", "none"],
            })

        async def jwks(request: web.Request) -> web.Response:
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
            jwk |= {"kid": self.kid, "use": "sig", "alg": "RS256"}
            return web.json_response({"keys": [jwk]})

        async def token(request: web.Request) -> web.Response:
            self.token_requests.append(dict(await request.post()))
            return web.json_response({"access_token": "x", "token_type": "Bearer",
                                      "id_token": self.make_token(self.nonce)})

        app.router.add_get("/.well-known/openid-configuration", discovery)
        app.router.add_get("/jwks", jwks)
        app.router.add_post("/token", token)
        return app

    async def serve(self) -> AsyncIterator[FakeIdP]:
        server = TestServer(self.app(), host="127.0.0.1", port=self.port)
        await server.start_server()
        try:
            yield self
        finally:
            await server.close()
