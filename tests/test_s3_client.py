"""The S3 client of the shard job (writer lease, conditional manifest writes) takes its region from the
environment or the AWS profile, and sends no checksum an S3-compatible server might refuse."""

import socket
import threading

from pipeline.shards.storage.lease import s3_client


def _aws_env(monkeypatch, tmp_path, endpoint: str = "http://127.0.0.1:9") -> None:
    for k in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))


def test_the_region_comes_from_the_environment_or_the_profile(monkeypatch, tmp_path):
    _aws_env(monkeypatch, tmp_path)
    assert s3_client().meta.region_name == "us-east-1"  # nothing names one
    config = tmp_path / "config"
    config.write_text("[default]\nregion = eu-west-3\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    assert s3_client().meta.region_name == "eu-west-3"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    assert s3_client().meta.region_name == "ap-south-1"


def test_a_put_carries_no_checksum(monkeypatch, tmp_path):
    """A server on loopback records what a PutObject sends."""
    srv = socket.create_server(("127.0.0.1", 0))
    heads: list[str] = []

    def serve():
        conn, _ = srv.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            heads.append(data.split(b"\r\n\r\n", 1)[0].decode("latin-1"))
            conn.sendall(b'HTTP/1.1 200 OK\r\nETag: "0"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n')

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        _aws_env(monkeypatch, tmp_path, f"http://127.0.0.1:{srv.getsockname()[1]}")
        s3_client().put_object(Bucket="b", Key="k", Body=b"x" * 100)
        t.join(10)
    finally:
        srv.close()
    [head] = heads
    assert head.startswith("PUT /b/k ")
    assert "checksum" not in head.lower(), head
