"""A real local Redis Cluster for tests: 3 primaries and 3 replicas on free loopback ports.

(Tests that do not fail a node over may go without replicas: on a 2-core machine their
replication takes CPU the drain's timing needs.)

`LocalCluster` starts the six servers with `--cluster-enabled yes` and a short
`cluster-node-timeout` (so a failover takes about two seconds), creates the cluster with
`redis-cli --cluster create`, and offers what the cluster tests do to it: the seed URL, the
primary serving a key, SIGKILL of a node, waiting for a replica's promotion, moving slots from
one primary to another while clients run, and stop. `cluster-require-full-coverage no` is what
a gateway deployment needs too: without it, one failed primary stops every node answering.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import redis as redis_sync
from redis.crc import key_slot

from gateway.embedded_redis import find_server
from tests.servers import free_port

NODE_TIMEOUT_MS = 1000


def _node_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


@dataclass(eq=False)
class Node:
    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> redis_sync.Redis:
        return redis_sync.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class LocalCluster:
    def __init__(self, directory: Path, *, primaries: int = 3, replicas: int = 1) -> None:
        self.directory = directory
        self.server = find_server()
        cli = Path(self.server).with_name(Path(self.server).name.replace("server", "cli"))
        if not cli.exists():
            raise RuntimeError(f"no {cli.name} beside {self.server}")
        self.cli = str(cli)
        self.nodes = [
            Node(port, directory / str(port))
            for port in (_node_port() for _ in range((1 + replicas) * primaries))
        ]
        self.primaries = primaries
        self.replicas = replicas

    @property
    def url(self) -> str:
        """The seed URL the gateway is given: every node (any one is enough)."""
        return "redis+cluster://" + ",".join(node.address for node in self.nodes)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()  # no server outlives a cluster that did not come up
            raise

    def _start(self) -> None:
        for node in self.nodes:
            self._launch(node)
        for node in self.nodes:
            for _ in range(3):  # another process may have taken the free port meanwhile
                if self._wait_ping(node):
                    break
                node.port = _node_port()
                node.directory = self.directory / str(node.port)
                self._launch(node)
            else:
                raise RuntimeError(f"redis-server did not start in {node.directory}")
        self._run_cli(
            "--cluster",
            "create",
            *(node.address for node in self.nodes),
            "--cluster-replicas",
            str(self.replicas),
            "--cluster-yes",
        )
        self.wait_ok()
        self.wait_replicas()

    def wait_replicas(self, within_s: float = 30.0) -> None:
        """Until every live replica has synced with its primary (so a failover keeps data)."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            linked = 0
            for node in self.nodes:
                if not node.alive:
                    continue
                with node.client() as client:
                    info = client.info("replication")
                if info.get("role") == "master" or info.get("master_link_status") == "up":
                    linked += 1
            if linked == sum(1 for node in self.nodes if node.alive):
                return
            time.sleep(0.05)
        raise RuntimeError("the replicas did not sync with their primaries")

    def _launch(self, node: Node) -> None:
        node.directory.mkdir(parents=True, exist_ok=True)
        node.process = subprocess.Popen(
            [
                self.server,
                "--port",
                str(node.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(node.directory),
                "--save",
                "",
                "--appendonly",
                "no",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                str(NODE_TIMEOUT_MS),
                "--cluster-require-full-coverage",
                "no",
                "--repl-diskless-sync-delay",
                "0",
                "--hash-max-listpack-value",
                "1024",
                "--logfile",
                str(node.directory / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
        )

    def _wait_ping(self, node: Node, within_s: float = 10.0) -> bool:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline and node.alive:
            try:
                with node.client() as client:
                    if client.ping():
                        return True
            except redis_sync.ConnectionError:
                time.sleep(0.02)
        if node.process is not None:
            node.process.kill()
            node.process.wait(10)
        return False

    def _run_cli(self, *args: str) -> str:
        done = subprocess.run(
            [self.cli, *args], capture_output=True, text=True, timeout=60, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli {' '.join(args)} failed: {done.stdout}{done.stderr}")
        return done.stdout

    def stop(self) -> None:
        for node in self.nodes:
            process, node.process = node.process, None
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(10)

    # -- what tests ask ------------------------------------------------------------------

    def _info(self, node: Node) -> dict[str, str]:
        with node.client() as client:
            text = client.execute_command("CLUSTER", "INFO")
        if isinstance(text, bytes):
            text = text.decode()
        pairs = (line.split(":", 1) for line in str(text).splitlines() if ":" in line)
        return {k: v.strip() for k, v in pairs}

    def wait_ok(self, within_s: float = 30.0) -> None:
        """Until every live node says `cluster_state:ok` and agrees all slots are served."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            try:
                infos = [self._info(node) for node in self.nodes if node.alive]
                if all(
                    i.get("cluster_state") == "ok" and i.get("cluster_slots_ok") == "16384"
                    for i in infos
                ):
                    return
            except redis_sync.RedisError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the cluster did not reach cluster_state:ok")

    def slot_owners(self) -> dict[int, Node]:
        """Slot -> the primary serving it, as a live node sees it."""
        by_port = {node.port: node for node in self.nodes}
        for node in self.nodes:
            if not node.alive:
                continue
            try:
                with node.client() as client:
                    shards = client.execute_command("CLUSTER", "SLOTS")
            except redis_sync.RedisError:
                continue
            owners: dict[int, Node] = {}
            for start, end, primary, *_ in shards:
                for slot in range(int(start), int(end) + 1):
                    owners[slot] = by_port[int(primary[1])]
            return owners
        raise RuntimeError("no live node answers CLUSTER SLOTS")

    def primary_for(self, key: str) -> Node:
        return self.slot_owners()[key_slot(key.encode())]

    def node_id(self, node: Node) -> str:
        with node.client() as client:
            return str(client.execute_command("CLUSTER", "MYID").decode())

    def replica_of(self, primary: Node) -> Node:
        primary_id = self.node_id(primary)
        for node in self.nodes:
            if node is primary or not node.alive:
                continue
            with node.client() as client:
                role = client.execute_command("ROLE")
            if role[0] == b"slave" and int(role[2]) == primary.port:
                return node
        raise RuntimeError(f"no replica of {primary.address} ({primary_id})")

    def role(self, node: Node) -> str:
        """`master` or `slave`, as the node says (ROLE)."""
        with node.client() as client:
            return str(client.execute_command("ROLE")[0].decode())

    def kill(self, node: Node) -> None:
        """SIGKILL a node, as a crash would."""
        process, node.process = node.process, None
        assert process is not None
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)

    def wait_promoted(self, replica: Node, within_s: float = 30.0) -> None:
        """Until `replica` is a primary and the cluster serves every slot again."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            with replica.client() as client:
                if client.execute_command("ROLE")[0] == b"master":
                    break
            time.sleep(0.05)
        else:
            raise RuntimeError(f"{replica.address} was not promoted")
        self.wait_ok(max(1.0, deadline - time.monotonic()))

    def move_slots(self, slots: list[int], target: Node, *, pipeline: int = 10) -> None:
        """Move `slots` (each served by some other primary) to `target`, as `redis-cli
        --cluster reshard` does: IMPORTING/MIGRATING, MIGRATE of the keys `pipeline` at a time,
        then the new owner announced to every primary."""
        owners = self.slot_owners()
        target_id = self.node_id(target)
        primaries = {owner.port: owner for owner in owners.values()}
        for slot in slots:
            source = owners[slot]
            if source is target:
                continue
            source_id = self.node_id(source)
            with target.client() as dst, source.client() as src:
                dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
                src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
                while True:
                    names = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, pipeline)
                    if not names:
                        break
                    src.execute_command(
                        "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *names
                    )
                dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
                src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
            for primary in primaries.values():
                if primary.alive and primary not in (source, target):
                    with primary.client() as other:
                        other.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)

    def reshard(self, source: Node, target: Node, count: int, *, pipeline: int = 10) -> None:
        """`redis-cli --cluster reshard`: move `count` slots from `source` to `target`."""
        self._run_cli(
            "--cluster",
            "reshard",
            target.address,
            "--cluster-from",
            self.node_id(source),
            "--cluster-to",
            self.node_id(target),
            "--cluster-slots",
            str(count),
            "--cluster-pipeline",
            str(pipeline),
            "--cluster-yes",
        )


@asynccontextmanager
async def local_cluster(
    directory: Path | None = None, *, replicas: int = 1
) -> AsyncIterator[LocalCluster]:
    """A started `LocalCluster` (in a temporary directory unless given), stopped after."""
    owned = directory is None
    path = Path(tempfile.mkdtemp(prefix="gw-cluster-")) if directory is None else directory
    cluster = LocalCluster(path, replicas=replicas)
    try:
        await asyncio.to_thread(cluster.start)
        yield cluster
    finally:
        cluster.stop()
        if owned:
            shutil.rmtree(path, ignore_errors=True)
