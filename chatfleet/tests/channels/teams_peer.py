"""Microsoft's side of chatfleet's Teams tests, with Microsoft's own Bot Framework validator
(`botframework-connector` from PyPI) as the judge of every token.

    teams_peer.py serve PORT    the Bot Framework's services on 127.0.0.1:PORT

One server stands in for all of them:
- the OpenID metadata (`GET /v1/.well-known/openidconfiguration`) and its JWKS (`GET /keys`), of
  RSA keys generated at start-up, each with its `endorsements` (channel ids), as
  login.botframework.com publishes them; `POST /keys` {"kid", "endorsements"} publishes one more;
- `POST /mint` {"kid", "claims"}: a token signed RS256 by that key (`kid` in its header);
- `POST /validate` {"authorization", "activity", "app_id"}: what Microsoft's
  `JwtTokenValidation.authenticate_request` says of that request, with its OpenID metadata
  pointed at this server: {"ok": true} or {"ok": false, "error": ...};
- the Azure AD token endpoint (`POST /botframework.com/oauth2/v2.0/token`): client credentials
  in, an access token out (`token-1`, `token-2`, ...);
- the Connector API (`POST /teams/v3/conversations/...`): records every call (path,
  Authorization, body, whether the token was one it issued, whether botbuilder-schema reads
  the body as an `Activity`), and answers like the Connector. `POST /control` {"throttle": N}
  makes the next N message activities answer 429 with `Retry-After: 1`;
- `GET /calls`: {"connector": [...], "token_requests": [...], "jwks_fetches": N}.
"""

import asyncio
import base64
import json
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from botbuilder.schema import Activity
from botframework.connector.auth import (
    ChannelValidation,
    JwtTokenExtractor,
    JwtTokenValidation,
    SimpleCredentialProvider,
)
from cryptography.hazmat.primitives.asymmetric import rsa


def b64url_uint(value):
    data = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def serve(port):
    base = f"http://127.0.0.1:{port}"
    lock = threading.Lock()
    state = {
        "keys": {},
        "connector": [],
        "token_requests": [],
        "tokens": set(),
        "jwks_fetches": 0,
        "throttle": 0,
    }

    def add_key(kid, endorsements):
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        state["keys"][kid] = {"private": private, "endorsements": endorsements}

    add_key("key-teams", ["msteams", "webchat"])
    add_key("key-webchat", ["webchat"])

    def jwks():
        keys = []
        for kid, key in state["keys"].items():
            numbers = key["private"].public_key().public_numbers()
            keys.append({
                "kty": "RSA",
                "use": "sig",
                "kid": kid,
                "n": b64url_uint(numbers.n),
                "e": b64url_uint(numbers.e),
                "endorsements": key["endorsements"],
            })
        return {"keys": keys}

    def validate(request):
        # Microsoft's validator caches metadata and keys for a day; each verdict starts afresh.
        JwtTokenExtractor.metadataCache = {}
        ChannelValidation.open_id_metadata_endpoint = f"{base}/v1/.well-known/openidconfiguration"
        activity = Activity().deserialize(request["activity"])
        credentials = SimpleCredentialProvider(request["app_id"], "")
        try:
            identity = asyncio.run(
                JwtTokenValidation.authenticate_request(activity, request["authorization"], credentials)
            )
        except Exception as error:  # the validator refuses by raising
            return {"ok": False, "error": f"{type(error).__name__}: {error}"}
        if identity is None or not identity.is_authenticated:
            return {"ok": False, "error": "no identity"}
        return {"ok": True}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def reply(self, status, payload, headers=()):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/v1/.well-known/openidconfiguration":
                return self.reply(200, {
                    "issuer": "https://api.botframework.com",
                    "authorization_endpoint": "https://invalid.botframework.com",
                    "jwks_uri": f"{base}/keys",
                    "id_token_signing_alg_values_supported": ["RS256"],
                    "token_endpoint_auth_methods_supported": ["private_key_jwt"],
                })
            with lock:
                if self.path == "/keys":
                    state["jwks_fetches"] += 1
                    return self.reply(200, jwks())
                if self.path == "/calls":
                    return self.reply(200, {
                        "connector": state["connector"],
                        "token_requests": state["token_requests"],
                        "jwks_fetches": state["jwks_fetches"],
                    })
            self.reply(404, {"error": "no such path"})

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode("utf-8")
            if self.path == "/control":
                with lock:
                    state.update(json.loads(raw))
                return self.reply(200, {})
            if self.path == "/keys":
                request = json.loads(raw)
                with lock:
                    add_key(request["kid"], request["endorsements"])
                return self.reply(200, {})
            if self.path == "/mint":
                request = json.loads(raw)
                with lock:
                    private = state["keys"][request["kid"]]["private"]
                token = jwt.encode(request["claims"], private, algorithm="RS256", headers={"kid": request["kid"]})
                return self.reply(200, {"token": token})
            if self.path == "/validate":
                return self.reply(200, validate(json.loads(raw)))
            if self.path == "/botframework.com/oauth2/v2.0/token":
                form = dict(urllib.parse.parse_qsl(raw))
                with lock:
                    token = f"token-{len(state['token_requests']) + 1}"
                    state["token_requests"].append({"form": form, "content_type": self.headers.get("Content-Type")})
                    state["tokens"].add(token)
                if form.get("grant_type") != "client_credentials":
                    return self.reply(400, {"error": "unsupported_grant_type"})
                return self.reply(200, {
                    "token_type": "Bearer",
                    "expires_in": 3599,
                    "ext_expires_in": 3599,
                    "access_token": token,
                })
            if self.path.startswith("/teams/v3/conversations/"):
                body = json.loads(raw)
                try:
                    activity = Activity().deserialize(body)
                    schema_ok = activity.type == body.get("type")
                except Exception:
                    schema_ok = False
                authorization = self.headers.get("Authorization") or ""
                with lock:
                    throttled = state["throttle"] > 0 and body.get("type") == "message"
                    if throttled:
                        state["throttle"] -= 1
                    known = authorization.removeprefix("Bearer ") in state["tokens"]
                    status = 401 if not known else 429 if throttled else 200
                    state["connector"].append({
                        "path": self.path,
                        "authorization": authorization,
                        "token_known": known,
                        "schema_ok": schema_ok,
                        "body": body,
                        "at": time.time(),
                        "status": status,
                    })
                if status == 401:
                    return self.reply(401, {"error": {"code": "Unauthorized", "message": "bad token"}})
                if status == 429:
                    return self.reply(429, {"error": {"code": "Throttled"}}, [("Retry-After", "1")])
                return self.reply(200, {"id": f"reply-{time.time_ns()}"})
            self.reply(404, {"error": "no such path"})

    server = ThreadingHTTPServer(("127.0.0.1", int(port)), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"serve": serve}[command](*args)
