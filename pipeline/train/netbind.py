"""Where a replica's torch.distributed sockets listen: on the node's own address, never on every interface.

What listens in a replica's Ray Train workers (torch 2.14, Ray Train 2.60):
- rank 0's TCPStore, the rendezvous of the process group. torch binds it to the wildcard address (`::`,
  dual stack, or 0.0.0.0) whatever MASTER_ADDR says, and no environment variable changes that; only a
  listening socket handed to it (`TCPStore(master_listen_fd=...)`) does. `NodeBoundTorchConfig` has rank 0
  bind that socket to its node's address before the process group starts; torch's rendezvous then reuses
  that server (a multi-tenant TCPStore on the same port).
- Gloo's listener, one per rank: bound to the address of GLOO_SOCKET_IFNAME's interface, else to the
  address the host name resolves to (which, on a node with several interfaces, need not be the one Ray
  uses).
- NCCL's bootstrap and socket-transport listeners (GPU workers): bound to NCCL_SOCKET_IFNAME's interface,
  else to the first interface NCCL likes.
`bind_env` gives the interface settings for one node; the backend applies them in every worker, from that
worker's own node address (workers of one replica can be on different nodes). A variable the user already
set in the workers' environment is kept.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from datetime import timedelta

import psutil
from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend


class NetbindError(ValueError):
    """The node's address is not one of this machine's interfaces."""


def interface_of(node_ip: str) -> str:
    """The name of the network interface that holds `node_ip` (e.g. `lo` for 127.0.0.1, `ens5` for the
    private address of an EC2 node)."""
    try:
        want = ipaddress.ip_address(node_ip.strip("[]"))
    except ValueError:
        raise NetbindError(f"node address {node_ip!r} is not an IP address") from None
    found = []
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                bits = bin(int(ipaddress.ip_address(a.netmask))).count("1") if a.netmask else ""
                net = ipaddress.ip_interface(f"{a.address.split('%', 1)[0]}/{bits}".rstrip("/"))
            except ValueError:
                continue
            if net.ip == want:
                return name
            if want.is_loopback and want in net.network:  # 127.0.0.2: served by lo's 127.0.0.0/8
                found.append(name)
    if found:
        return found[0]
    raise NetbindError(f"node address {node_ip} is on none of this machine's interfaces "
                       f"({', '.join(sorted(psutil.net_if_addrs()))}): Ray's node address "
                       "(ray start --node-ip-address) must be one of them")


def bind_env(node_ip: str) -> dict[str, str]:
    """Environment variables that make Gloo and NCCL listen on `node_ip`'s interface only.
    NCCL_SOCKET_IFNAME's leading `=` asks for this exact interface (not every name that starts with it)."""
    iface = interface_of(node_ip)
    family = "AF_INET6" if ipaddress.ip_address(node_ip.strip("[]")).version == 6 else "AF_INET"
    return {"GLOO_SOCKET_IFNAME": iface, "NCCL_SOCKET_IFNAME": f"={iface}", "NCCL_SOCKET_FAMILY": family}


# rank 0's store server, kept alive from its start until torch's rendezvous has taken it over
_served_store = None


def _apply_bind_env() -> dict[str, str]:
    import ray

    env = bind_env(ray.util.get_node_ip_address())
    for k, v in env.items():
        os.environ.setdefault(k, v)
    return {k: os.environ[k] for k in env}


def _serve_store_on_node_address(timeout_s: int) -> tuple[str, int]:
    """Rank 0: the process group's TCPStore server on this node's address and a free port."""
    global _served_store
    import ray
    from torch.distributed import TCPStore

    addr = ray.util.get_node_ip_address()
    host = addr.strip("[]")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        sock.listen(socket.SOMAXCONN)
        port = sock.getsockname()[1]
        # multi_tenant: the rendezvous's own TCPStore(is_master=True, multi_tenant=True) on this port
        # reuses this server instead of binding the wildcard address; the store owns the socket from here
        _served_store = TCPStore(host, port, None, True, timedelta(seconds=timeout_s), wait_for_workers=False,
                                 multi_tenant=True, master_listen_fd=sock.fileno())
    except BaseException:
        sock.close()
        raise
    sock.detach()
    return addr, port


def _release_store() -> None:
    global _served_store
    _served_store = None


def _set_master(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)


class _NodeBoundTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config):
        import ray
        import torch.distributed as dist
        from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
        from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group

        if not dist.is_available():
            raise RuntimeError("Distributed torch is not available.")
        if backend_config.backend is None or backend_config.init_method != "env":
            # (TorchTrainer fills the backend in; the store bound here is found through MASTER_ADDR/PORT)
            raise ValueError("NodeBoundTorchConfig needs an explicit backend ('gloo' or 'nccl') and "
                             f"init_method='env' (got backend={backend_config.backend!r}, "
                             f"init_method={backend_config.init_method!r})")
        worker_group.execute(_apply_bind_env)
        addr, port = worker_group.execute_single(0, _serve_store_on_node_address, backend_config.timeout_s)
        worker_group.execute(_set_master, addr=addr, port=port)
        if not isinstance(worker_group, V1WorkerGroup):
            worker_group.execute(_set_torch_distributed_env_vars)
        try:
            ray.get([worker_group.execute_single_async(i, _setup_torch_process_group, backend=backend_config.backend,
                                                       world_rank=i, world_size=len(worker_group),
                                                       init_method="env://", timeout_s=backend_config.timeout_s)
                     for i in range(len(worker_group))])
        finally:
            worker_group.execute_single(0, _release_store)


class NodeBoundTorchConfig(TorchConfig):
    """Ray Train's TorchConfig whose process group listens on each worker's node address only:
    `TorchTrainer(..., torch_config=NodeBoundTorchConfig(backend=...))`."""

    @property
    def backend_cls(self):
        return _NodeBoundTorchBackend
