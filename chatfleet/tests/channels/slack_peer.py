"""Slack's side of chatfleet's Slack tests, written with Slack's own SDK (`slack_sdk` from PyPI).

    slack_peer.py sign SECRET TIMESTAMP < body    prints X-Slack-Signature (SignatureVerifier)
    slack_peer.py api PORT                        a fake Slack Web API on 127.0.0.1:PORT
    slack_peer.py client PORT                     sends a chat.postMessage, then a chat.update of
                                                  that message, with WebClient to it

The fake Web API records every call under /api/<method> (method, headers, JSON or form body)
and keeps the messages as Slack would: `chat.postMessage` creates one (answering its `ts`),
`chat.update` replaces its text, `chat.delete` removes it (an unknown `ts` is
`message_not_found`). `POST /control` with {"rate_limit": N} makes the next N calls answer 429
with `Retry-After: 1` (or {"retry_after": S} seconds). `GET /calls` lists the recorded calls,
`GET /messages` the messages.
"""

import json
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from slack_sdk import WebClient
from slack_sdk.signature import SignatureVerifier


def sign(secret, timestamp):
    body = sys.stdin.buffer.read().decode("utf-8")
    print(SignatureVerifier(secret).generate_signature(timestamp=timestamp, body=body))


def api(port):
    state = {"calls": [], "rate_limit": 0, "retry_after": 1, "messages": {}, "clock": 1700000100.0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
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
            with lock:
                if self.path == "/messages":
                    return self.reply(200, list(state["messages"].values()))
                self.reply(200, state["calls"])

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode("utf-8")
            if self.path == "/control":
                with lock:
                    state.update(json.loads(raw))
                return self.reply(200, {"ok": True})
            kind = self.headers.get("Content-Type", "")
            body = json.loads(raw) if kind.startswith("application/json") else dict(urllib.parse.parse_qsl(raw))
            with lock:
                limited = state["rate_limit"] > 0
                if limited:
                    state["rate_limit"] -= 1
                state["calls"].append({
                    "path": self.path,
                    "authorization": self.headers.get("Authorization"),
                    "content_type": kind,
                    "body": body,
                    "at": time.time(),
                    "status": 429 if limited else 200,
                })
            if limited:
                return self.reply(429, {"ok": False, "error": "ratelimited"}, [("Retry-After", str(state["retry_after"]))])
            method = self.path.rsplit("/", 1)[-1]
            with lock:
                messages = state["messages"]
                if method == "chat.postMessage":
                    state["clock"] += 0.0001
                    ts = f"{state['clock']:.6f}"
                    messages[ts] = {"channel": body.get("channel"), "thread_ts": body.get("thread_ts"), "ts": ts,
                                    "text": body.get("text")}
                    answer = {"ok": True, "channel": body.get("channel"), "ts": ts}
                elif method in ("chat.update", "chat.delete"):
                    ts = body.get("ts")
                    if ts not in messages or messages[ts]["channel"] != body.get("channel"):
                        answer = {"ok": False, "error": "message_not_found"}
                    elif method == "chat.update":
                        messages[ts]["text"] = body.get("text")
                        answer = {"ok": True, "channel": body.get("channel"), "ts": ts, "text": body.get("text")}
                    else:
                        del messages[ts]
                        answer = {"ok": True, "channel": body.get("channel"), "ts": ts}
                else:
                    answer = {"ok": True}
            self.reply(200, answer)

    server = ThreadingHTTPServer(("127.0.0.1", int(port)), Handler)
    server.daemon_threads = True
    server.serve_forever()


def client(port):
    web = WebClient(token="xoxb-sdk", base_url=f"http://127.0.0.1:{port}/api/")
    posted = web.chat_postMessage(channel="C-SDK", thread_ts="1.5", text="from the SDK")
    web.chat_update(channel="C-SDK", ts=posted["ts"], text="from the SDK, updated")


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"sign": sign, "api": api, "client": client}[command](*args)
