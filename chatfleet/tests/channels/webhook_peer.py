"""The other side of chatfleet's signed webhooks, written with the `standardwebhooks` package
(the Standard Webhooks reference library), for chatfleet's tests.

    webhook_peer.py sign SECRET MSG_ID TIMESTAMP < body      prints the webhook-signature header
    webhook_peer.py receive SECRET PORT                      a receiver on 127.0.0.1:PORT

The receiver verifies every delivery with `Webhook(secret).verify` and answers by its mode:
`ok` (200), `fail` (503), `gone` (410), or `hang` (waits 60 s, then 503). `POST /mode` with
{"mode": ...} changes it. `GET /log` lists every request: the `webhook-id`, whether the
signature verified, the status answered, and the JSON body of those answered 200.
"""

import json
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


def sign(secret, msg_id, timestamp):
    body = sys.stdin.buffer.read().decode("utf-8")
    at = datetime.fromtimestamp(int(timestamp), tz=timezone.utc)
    print(Webhook(secret).sign(msg_id, at, body))


def receive(secret, port):
    webhook = Webhook(secret)
    state = {"mode": "ok", "log": []}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, status, payload=b""):
            self.send_response(status)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self):
            with lock:
                payload = json.dumps(state["log"]).encode()
            self.reply(200, payload)

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.path == "/mode":
                with lock:
                    state["mode"] = json.loads(body)["mode"]
                return self.reply(204)
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                payload = webhook.verify(body, headers)
                verified = True
            except WebhookVerificationError:
                payload, verified = None, False
            with lock:
                mode = state["mode"]
            status = 400 if not verified else {"ok": 200, "fail": 503, "gone": 410, "hang": 503}[mode]
            if mode == "hang":
                with lock:
                    state["log"].append({"webhook_id": headers.get("webhook-id"), "verified": verified,
                                         "status": "hanging", "body": None, "mode": mode})
                time.sleep(60)
            with lock:
                state["log"].append({
                    "webhook_id": headers.get("webhook-id"),
                    "verified": verified,
                    "status": status,
                    "body": payload if status == 200 else None,
                    "mode": mode,
                })
            self.reply(status)

    server = ThreadingHTTPServer(("127.0.0.1", int(port)), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"sign": sign, "receive": receive}[command](*args)
