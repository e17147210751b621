"""The local Redis Cluster the cluster tests run on: it starts, serves, fails over, reshards."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from redis.cluster import RedisCluster as SyncCluster
from redis.crc import key_slot

from tests.cluster import LocalCluster, local_cluster


def _client(cluster: LocalCluster) -> SyncCluster:
    node = next(node for node in cluster.nodes if node.alive)
    return SyncCluster(host="127.0.0.1", port=node.port, socket_timeout=5)


async def test_a_local_cluster_serves_fails_over_and_moves_slots(tmp_path: Path) -> None:
    async with local_cluster(tmp_path / "cluster") as cluster:
        assert cluster.url.startswith("redis+cluster://127.0.0.1:")
        assert len(cluster.url.split(",")) == 6
        owners = cluster.slot_owners()
        assert len(owners) == 16384
        assert len({node.port for node in owners.values()}) == 3  # three primaries

        client = _client(cluster)
        for n in range(50):
            client.set(f"{{k{n}}}:v", n)
        # moving a slot with its keys, as `redis-cli --cluster reshard` does
        key = "{k7}:v"
        source = cluster.primary_for(key)
        target = next(n for n in set(owners.values()) if n is not source)
        cluster.move_slots([key_slot(key.encode())], target)
        assert cluster.primary_for(key) is target
        with target.client() as direct:
            assert direct.get(key) == b"7"
        # redis-cli itself moves slots too
        cluster.reshard(target, source, 20)
        assert sum(1 for node in cluster.slot_owners().values() if node is source) > 5461
        client.close()

        # a primary killed: its replica takes over, and nothing it had acknowledged is lost
        # once the replica has it (WAIT 1)
        key = "{k3}:v"
        primary = cluster.primary_for(key)
        replica = cluster.replica_of(primary)
        with primary.client() as direct:
            direct.set(key, "kept")
            assert direct.execute_command("WAIT", 1, 2000) == 1
        cluster.kill(primary)
        cluster.wait_promoted(replica)
        assert cluster.primary_for(key) is replica
        client = _client(cluster)
        assert client.get(key) == b"kept"
        assert client.get("{k8}:v") == b"8"
        client.close()
    for node in cluster.nodes:  # stopped: nothing listens on its port any more
        assert not node.alive
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", node.port), 1):
            pass
