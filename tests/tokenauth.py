"""A bearer-token realm for distribution's ``auth: token`` mode that grants every scope
asked (tests of the registry client's token dance, pushes included).

Its tokens are made and signed by the production issuer
(``controller/registrytokens.py``: RS256, the signing certificate in ``x5c``),
which grants only pulls; here one user's basic credentials get whatever they
ask. docker-registry verifies the tokens against the same certificate as its
``rootcertbundle``: the real token flow, end to end.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from controller import registrytokens as rt
from kube.httpreply import reply

SERVICE = rt.SERVICE
ISSUER = rt.ISSUER


class TokenServer:
    def __init__(self, workdir: str, username: str, password: str) -> None:
        self.username, self.password = username, password
        self.issued = 0
        keys = rt.new_keys()
        self.issuer = rt.Issuer(keys, lambda: (username, password))
        self.cert_path = os.path.join(workdir, "token-ca.pem")
        with open(self.cert_path, "wb") as f:
            f.write(keys.cert)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                q = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
                expected = base64.b64encode(f"{server.username}:{server.password}".encode())
                if self.headers.get("Authorization", "") != f"Basic {expected.decode()}":
                    reply(self, 401, b"")
                    return
                body = json.dumps({"token": server.token(q.get("scope", []))}).encode()
                reply(self, 200, body)

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.http.server_address[1]
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def registry_auth(self) -> dict[str, object]:
        return {"token": {"realm": self.realm, "service": SERVICE, "issuer": ISSUER,
                          "rootcertbundle": self.cert_path}}

    def token(self, scopes: list[str]) -> str:
        access = [{"type": kind, "name": name, "actions": sorted(actions)}
                  for kind, name, actions in rt.parse_scopes(scopes)]
        self.issued += 1
        return self.issuer.token(self.username, access)

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()
