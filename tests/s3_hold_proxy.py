"""An HTTP relay in front of an S3 API server that can hold one request in flight, as a slow network, a
stalled load balancer or a frozen client host does: the request reaches the server only when released,
whatever the client did meanwhile (waited, gave up, retried).

    python tests/s3_hold_proxy.py LISTEN_PORT UPSTREAM_PORT CONTROL_DIR

Every request is relayed on a connection of its own (the relay asks for `Connection: close`). Control
files in CONTROL_DIR:
    hold       a regular expression; the first request whose head (request line and headers) matches it
               is held (later ones pass)
    held       written by the relay when it holds that request: the pid of the process that sent it (a
               process on this machine), then its request line
    delivered  written once the held request has been sent on and the server's answer relayed: what was
               sent and the answer's status line
Removing `hold` releases the held request.
"""

import os
import re
import socket
import sys
import threading
import time
from pathlib import Path

LISTEN, UPSTREAM, CONTROL = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
HOLD, HELD, DELIVERED = CONTROL / "hold", CONTROL / "held", CONTROL / "delivered"
_lock = threading.Lock()


def read_head(conn: socket.socket) -> tuple[bytes, bytes] | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def closing(head: bytes) -> bytes:
    lines = [ln for ln in head.split(b"\r\n") if not ln.lower().startswith(b"connection:")]
    return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n"


def pump(src: socket.socket, dst: socket.socket) -> bytes:
    """Relay until `src` ends; returns the first line relayed."""
    first = b""
    try:
        while chunk := src.recv(65536):
            first = first or chunk.split(b"\r\n", 1)[0]
            try:
                dst.sendall(chunk)
            except OSError:
                pass  # the client is gone: the server's answer is read to its end all the same
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    return first


def should_hold(head: bytes, port: int) -> bool:
    with _lock:
        if not HOLD.exists() or HELD.exists():
            return False
        if not re.search(HOLD.read_text().rstrip("\n"), head.decode("latin-1")):
            return False
        HELD.write_text(f"{sender_pid(port)}\n" + head.split(b"\r\n", 1)[0].decode("latin-1") + "\n")
        return True


def sender_pid(port: int) -> int:
    """The pid of the local process whose TCP socket has local port `port` (0 if none is found)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{cols[9]}]")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    return int(proc.name)
        except OSError:
            continue
    return 0


def handle(client: socket.socket) -> None:
    upstream = None
    try:
        got = read_head(client)
        if got is None:
            return
        head, rest = got
        held = should_hold(head, client.getpeername()[1])
        pending, client_done = [rest], False
        if held:  # keep taking the client's bytes while the request waits
            client.settimeout(0.1)
            while HOLD.exists():
                if client_done:
                    time.sleep(0.1)
                    continue
                try:
                    chunk = client.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    chunk = b""
                if chunk:
                    pending.append(chunk)
                else:
                    client_done = True  # the client gave up: the request still reaches the server
            client.settimeout(None)
        upstream = socket.create_connection(("127.0.0.1", UPSTREAM))
        upstream.sendall(closing(head) + b"".join(pending))
        if client_done:
            upstream.shutdown(socket.SHUT_WR)
        else:
            threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
        answer = pump(upstream, client)
        if held:
            DELIVERED.write_text(f"{sum(map(len, pending))} bytes sent on, client {'gone' if client_done else 'waiting'}; "
                                 f"answer: {answer.decode('latin-1')}\n")
    except OSError:
        pass
    finally:
        for s in (client, upstream):
            if s is not None:
                s.close()


def main() -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", LISTEN))
    srv.listen(128)
    print("listening", flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
