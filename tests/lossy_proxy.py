"""An HTTP proxy on loopback that loses answers: it forwards every request to the upstream server, and for
the chosen ones (the Nth, Mth... PUT whose path contains a given text) it closes the client's connection
after the server has handled the request, without sending its answer. The client sees a dropped
connection for a request that took effect, as over a flaky network, and retries it.

    python tests/lossy_proxy.py UPSTREAM_URL PORT PATH_TEXT DROP_LIST

DROP_LIST: comma-separated 1-based numbers of the matching PUTs whose answers are lost. Prints "ready" when
listening and "dropped <n> <path>" for each lost answer.
"""

import http.client
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Lock
from urllib.parse import urlsplit

upstream = urlsplit(sys.argv[1])
port, text = int(sys.argv[2]), sys.argv[3]
drop = {int(n) for n in sys.argv[4].split(",") if n}
seen = 0
lock = Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _forward(self):
        global seen
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("expect", "connection")}
        conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
        conn.request(self.command, self.path, body=body or None, headers=headers)
        r = conn.getresponse()
        data = r.read()
        lose = False
        if self.command == "PUT" and text in self.path:
            with lock:
                seen += 1
                lose = seen in drop
        if lose:
            print(f"dropped {seen} {self.path}", flush=True)
            self.close_connection = True
            return  # the server stored it; the client never hears so
        self.send_response_only(r.status, r.reason)
        for k, v in r.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
print("ready", flush=True)
server.serve_forever()
