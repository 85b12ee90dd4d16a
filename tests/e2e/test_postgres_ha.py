"""PostgreSQL fails over by itself, on the prod stack's own containers (synchronous on).

Patroni holds its leader lock in etcd. Each test finds the current primary itself (an
earlier one may have moved it) and leaves one primary and every replica streaming.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator

import pytest

from components import render
from tests.e2e import chaos, report, traffic
from tests.e2e.apply import wait_healthy
from tests.e2e.conftest import Deployment, deployed

STACK = "prod"
# What leader-fence.sh logs when it ends a silent primary's lock, and when it leaves it.
FENCED = "{primary} has not renewed its lock for {seconds}s and answers on no port: ending its lease"
LEFT = "{primary} has not renewed its lock for {seconds}s but still answers: left to its TTL"


def fence_logged(prod: Deployment, template: str, primary: str, since: float | None = None) -> list[str]:
    """The PostgreSQL nodes that logged `template` about `primary` (any number of seconds)."""
    before, _, after = template.format(primary=primary, seconds="\0").partition("\0")
    return [
        n.hostname
        for n in prod.topology.postgres_nodes
        if any(before in line and after in line for line in chaos.logs(prod, n.hostname, since).splitlines())
    ]


@pytest.fixture(scope="module")
def prod() -> Iterator[Deployment]:
    with deployed(STACK) as deployment:
        yield deployment


def wait_role(prod: Deployment, hostname: str, role: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while (seen := chaos.pg_local_role(prod, hostname)) != role:
        assert time.monotonic() < deadline, f"{hostname} is {seen}, not {role}, after {timeout}s"
        time.sleep(0.5)


def wait_not_primary(prod: Deployment, hostname: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while chaos.pg_local_role(prod, hostname) == "primary":
        assert time.monotonic() < deadline, f"{hostname} still primary after {timeout}s"
        time.sleep(0.2)


def test_a_lost_primary_fails_over_and_no_acknowledged_write_is_lost(prod: Deployment) -> None:
    old = chaos.wait_pg_settled(prod)
    with chaos.PrimaryWatch(prod) as watch, chaos.Writer(prod) as writer:
        chaos.wait_more_writes(writer.acknowledged, 20)
        killed = chaos.lose_for_good(prod, old)
        new = chaos.pg_primary(prod, timeout=90, other_than=old)
        chaos.wait_more_writes(writer.acknowledged, 20)
    failover = writer.first_write_after(killed, on=new)
    report.LINES.append(
        f"prod: postgres primary lost (kill -9, not restarted) -> first acknowledged write {failover:.1f}s"
    )
    # The fence ended the lost primary's lock; without it the failover waits for Patroni's TTL.
    assert fence_logged(prod, FENCED, old)
    # Synchronous quorum commit: every write acknowledged before, during and after is there.
    assert writer.missing_on(new) == set()
    assert watch.most_primaries == 1, watch.seen
    # The old primary comes back as a replica of the new one (rewound), never a second primary.
    with chaos.PrimaryWatch(prod) as watch:
        chaos.bring_back(prod, old)
        wait_healthy(prod.client, prod.name(old), timeout=180)
        wait_role(prod, old, "replica")
        chaos.wait_streaming(prod, len(prod.topology.postgres_replicas))
    assert watch.most_primaries == 1, watch.seen
    assert chaos.pg_primary(prod) == new


def test_a_primary_cut_off_the_network_stops_taking_writes_and_a_replica_takes_over(prod: Deployment) -> None:
    old = chaos.wait_pg_settled(prod)
    with chaos.PrimaryWatch(prod) as watch, chaos.Writer(prod) as writer:
        chaos.wait_more_writes(writer.acknowledged, 20)
        chaos.disconnect(prod, old)
        cut = time.monotonic()
        try:
            # Unable to renew its lock, it demotes itself: no write is taken there any more.
            wait_not_primary(prod, old, timeout=60)
            demoted = time.monotonic() - cut
            new = chaos.pg_primary(prod, timeout=90, other_than=old)
            chaos.wait_more_writes(writer.acknowledged, 20)
        finally:
            chaos.reconnect(prod, old)
        wait_role(prod, old, "replica")
        chaos.wait_streaming(prod, len(prod.topology.postgres_replicas))
    report.LINES.append(
        f"prod: postgres primary cut off: stopped being primary after {demoted:.1f}s, "
        f"first acknowledged write on {new} after {writer.first_write_after(cut, on=new):.1f}s"
    )
    assert watch.most_primaries == 1, watch.seen
    assert writer.missing_on(new) == set()
    assert chaos.pg_primary(prod) == new


def test_a_switchover_moves_the_primary_to_the_named_replica_under_writes(prod: Deployment) -> None:
    old = chaos.wait_pg_settled(prod)
    candidate = next(n.hostname for n in prod.topology.postgres_nodes if n.hostname != old)
    with chaos.Writer(prod) as writer:
        chaos.wait_more_writes(writer.acknowledged, 20)
        started = time.monotonic()
        code, output = prod.exec(
            old,
            ["patronictl", "--config-file", render.PATRONI_RUN_CONF, "switchover", "--candidate", candidate, "--force"],
        )
        assert code == 0, output
        assert chaos.pg_primary(prod, other_than=old) == candidate
        switched = time.monotonic()
        chaos.wait_more_writes(writer.acknowledged, 20)
    failed = [t for t in writer.failed_at if t >= started]
    report.LINES.append(
        f"prod: postgres switchover to {candidate}: {switched - started:.1f}s, {len(failed)} failed writes, "
        f"writes resumed {writer.first_write_after(started, on=candidate):.1f}s after the command"
    )
    # Writes fail only while the switch itself runs.
    assert all(t <= switched + 1 for t in failed), [round(t - started, 1) for t in failed]
    assert writer.missing_on(candidate) == set()
    wait_role(prod, old, "replica")
    chaos.wait_streaming(prod, len(prod.topology.postgres_replicas))


def test_a_primary_whose_patroni_stalls_while_its_server_answers_keeps_its_lock_past_the_fence(
    prod: Deployment,
) -> None:
    # Its server could still take writes: the fence must leave it to Patroni's TTL.
    primary = chaos.wait_pg_settled(prod)
    # By role, not by name: an earlier test's switchover may have left a replica-named node primary.
    replicas = sorted(chaos.pg_replicas(prod))
    detect = prod.topology.settings.postgres.failover_detect_seconds
    chaos.signal_process(prod, primary, "bin/patroni", signal.SIGSTOP)
    stalled = time.time()
    try:
        # Every replica's fence sees the silence and, the server answering, decides to wait.
        chaos.wait_for(
            lambda: sorted(fence_logged(prod, LEFT, primary, stalled)) == replicas, detect + 15, "every fence to wait"
        )
        assert fence_logged(prod, FENCED, primary, stalled) == []
        assert [chaos.pg_local_role(prod, hostname) for hostname in replicas] == ["replica"] * len(replicas)
    finally:
        chaos.signal_process(prod, primary, "bin/patroni", signal.SIGCONT)
    # Resumed within its TTL, it renews its lock and stays primary.
    assert chaos.wait_pg_settled(prod) == primary


def test_a_replica_that_goes_silent_is_given_up_on_without_stalling_any_backend(prod: Deployment) -> None:
    """A replica whose node is lost answers nothing: each backend gives up on a read there
    after 3 s and serves it elsewhere. Seen on a swarm: psycopg's cancel of the query given
    up on blocked each backend's event loop for 8 s (it connects to the silent node to ask
    for the cancel), so the backend answered nothing, nginx's probes dropped it, and requests
    on it were lost. Work given up on is now left to end by itself."""
    replica = chaos.pg_replicas(prod)[0]
    backends = [b.hostname for b in prod.topology.backends]
    path = f"/api/jobs/{uuid.uuid4()}"  # never cached: every GET reads a replica (a miss), then the primary
    gave_up = f"replica {replica} skipped"
    since = time.time()
    with traffic.GetStream(prod, path, expected=404) as stream:
        stream.wait_answers(20)
        chaos.silence(prod, replica)
        try:
            # Each backend gives up twice: on its pooled connection (a query under way: the
            # case psycopg's cancel blocked), and on a new connection 5 s later.
            for backend in backends:
                chaos.wait_for(
                    lambda backend=backend: chaos.logs(prod, backend, since).count(gave_up) >= 2,
                    60,
                    f"{backend} giving up on {replica} twice",
                )
        finally:
            chaos.unsilence(prod, replica)
        stream.wait_answers(20)
    nginx_said = chaos.logs(prod, "nginx", since)
    # Its reloads and errors, not the access lines of the GETs.
    seen = "\n".join(line for line in nginx_said.splitlines() if "upstreams: " in line or "[error]" in line)
    assert stream.failures == [], seen
    # nginx probes every backend each second and drops one that misses 2 probes in a row (2 s
    # each): it never had to.
    assert traffic.upstream_lists(nginx_said) == [], seen
    report.LINES.append(
        f"prod: {replica} silent under {stream.total} GETs through nginx: {len(stream.failures)} failed, "
        f"the slowest answered in {stream.slowest:.1f}s"
    )
    chaos.wait_streaming(prod, len(prod.topology.postgres_nodes) - 1)
