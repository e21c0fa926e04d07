"""A replica's torch.distributed sockets listen on the node's address only: a real two-worker Ray Train run
on the loopback cluster reads, in each worker, which of its own sockets listen and where."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sys
from pathlib import Path

import pytest

from pipeline.train.netbind import NetbindError, bind_env, interface_of


def listening_sockets() -> list[str]:
    """`address:port` of every TCP socket this process holds that listens, from /proc/net/tcp and tcp6."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:["):-1])
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A: LISTEN
                continue
            hexaddr, hexport = f[1].split(":")
            raw = bytes.fromhex(hexaddr)  # the kernel's 32-bit words, each in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.append(f"{socket.inet_ntop(family, raw)}:{int(hexport, 16)}")
    return found


def is_wildcard(listener: str) -> bool:
    return ipaddress.ip_address(listener.rsplit(":", 1)[0]).is_unspecified


def _report_listeners(config):
    import ray.train
    import torch
    import torch.distributed as dist

    t = torch.ones(1)
    dist.all_reduce(t)  # the group works, and Gloo's pairs are connected
    rank = ray.train.get_context().get_world_rank()
    out = {"rank": rank, "sum": t.item(), "listening": listening_sockets(),
           "env": {k: os.environ.get(k) for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "MASTER_ADDR",
                                                  "MASTER_PORT")}}
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(out))


def test_bind_env_names_the_interface_of_the_node_address():
    assert interface_of("127.0.0.1") == "lo" and interface_of("127.0.0.2") == "lo"  # all of 127/8 is lo's
    env = bind_env("127.0.0.1")
    assert env == {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "=lo", "NCCL_SOCKET_FAMILY": "AF_INET"}
    with pytest.raises(NetbindError, match="203.0.113.7 is on none of this machine's interfaces"):
        bind_env("203.0.113.7")  # (TEST-NET-3: on no machine)
    with pytest.raises(NetbindError, match="'node-1' is not an IP address"):
        bind_env("node-1")


def test_ray_train_workers_listen_on_the_node_address_only(ray_cluster, tmp_path):
    import ray.train
    from ray import cloudpickle
    from ray.train.torch import TorchTrainer

    from pipeline.train.netbind import NodeBoundTorchConfig

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    trainer = TorchTrainer(_report_listeners, train_loop_config={"out": str(tmp_path)},
                           scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                           torch_config=NodeBoundTorchConfig(backend="gloo"),
                           run_config=ray.train.RunConfig(name="netbind", storage_path=str(tmp_path / "ray")))
    trainer.fit()
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rep in reports:
        assert rep["listening"], rep  # Gloo's listener at least: the table was read
        assert not [s for s in rep["listening"] if is_wildcard(s)], rep
        assert rep["sum"] == 2.0 and rep["env"]["GLOO_SOCKET_IFNAME"] == "lo", rep
        assert rep["env"]["MASTER_ADDR"] == "127.0.0.1", rep
    # rank 0 holds the rendezvous store, on the node's address
    assert f"127.0.0.1:{reports[0]['env']['MASTER_PORT']}" in reports[0]["listening"], reports[0]
