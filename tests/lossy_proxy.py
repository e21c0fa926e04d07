"""An HTTP proxy on loopback that loses answers or fails requests, as a flaky network or an overloaded
server does: it forwards every request to the upstream server, except the chosen ones (the Nth, Mth...
request of a method whose path contains a given text):

- ACTION `drop` (the default): the request is forwarded and handled, then the client's connection is
  closed without its answer. The client sees a dropped connection for a request that took effect.
- ACTION a status code (e.g. 503): the request is not forwarded; the client gets that status with an S3
  error body (`SlowDown` for 503, else `InternalError`).
- ACTION `pass`: the request is forwarded and answered as any other; only printed (to count requests).

    python tests/lossy_proxy.py UPSTREAM_URL PORT METHOD PATH_TEXT NUMBERS [ACTION]

NUMBERS: comma-separated 1-based numbers of the matching requests, or `all`. Prints "ready" when
listening and "<action> <n> <path>" for each request it drops or fails.
"""

import http.client
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Lock
from urllib.parse import urlsplit

upstream = urlsplit(sys.argv[1])
port, method, text, numbers = int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
action = sys.argv[6] if len(sys.argv) > 6 else "drop"
chosen = None if numbers == "all" else {int(n) for n in numbers.split(",") if n}
seen = 0
lock = Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _forward(self):
        global seen
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        hit = None
        if self.command == method and text in self.path:
            with lock:
                seen += 1
                hit = seen if chosen is None or seen in chosen else None
        if hit is not None and action == "pass":
            print(f"pass {hit} {self.path}", flush=True)
            hit = None
        if hit is not None and action != "drop":
            print(f"{action} {hit} {self.path}", flush=True)
            code = "SlowDown" if action == "503" else "InternalError"
            data = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
            self.send_response_only(int(action))
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("expect", "connection")}
        conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
        conn.request(self.command, self.path, body=body or None, headers=headers)
        r = conn.getresponse()
        data = r.read()
        if hit is not None:
            print(f"drop {hit} {self.path}", flush=True)
            self.close_connection = True
            return  # the server handled it; the client never hears so
        self.send_response_only(r.status, r.reason)
        for k, v in r.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        # (a HEAD answer has no body but the object's length)
        length = r.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", length)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
print("ready", flush=True)
server.serve_forever()
