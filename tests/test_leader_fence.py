"""The PostgreSQL image's leader fence (images/postgres/leader-fence.sh), run for real against
a stand-in etcdctl on PATH that answers from a state file the test rewrites: which member
holds the leader lock, on which lease, how long since that lease was renewed. The members'
"ports" are local sockets: one that listens answers, a closed one does not.

What it must decide: end a lock only when it has been silent for FAILOVER_DETECT_SECONDS and
its holder answers on no port; leave a lock whose holder still answers (a stalled Patroni
beside a running server) to Patroni's TTL, saying so once per silence."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from tests.local_server import LocalServer

FENCE = pathlib.Path(__file__).resolve().parents[1] / "images" / "postgres" / "leader-fence.sh"
DETECT_SECONDS = 2
GRANTED_TTL = 20
PREFIX = "/service/transvidio"
LEFT = "has not renewed its lock for {seconds}s but still answers: left to its TTL"
ENDED = "answers on no port: ending its lease"

# etcdctl as the fence calls it: `--endpoints=… --command-timeout=1s <command…>`.
FAKE_ETCDCTL = f"""#!{sys.executable}
import json, os, sys
state = json.load(open(os.environ["FAKE_ETCD_STATE"]))
args = [a for a in sys.argv[1:] if not a.startswith("--endpoints=") and not a.startswith("--command-timeout=")]
if args[:2] == ["get", "{PREFIX}/leader"]:
    if not state.get("leader"):
        sys.exit(0)
    print('"Key" : "{PREFIX}/leader"')
    print('"Value" : "%s"' % state["leader"])
    print('"Lease" : %d' % state["lease"])
elif args[:2] == ["lease", "timetolive"]:
    known = state.get("lease") is not None and int(args[2], 16) == state["lease"]
    print('"GrantedTTL" : {GRANTED_TTL}')
    print('"TTL" : %d' % ({GRANTED_TTL} - state["silent"] if known else -1))
elif args[:1] == ["get"] and args[1].startswith("{PREFIX}/members/"):
    port = state["ports"][args[1].rsplit("/", 1)[1]]
    print(json.dumps({{"conn_url": "postgres://127.0.0.1:%d/postgres" % port,
                      "api_url": "http://127.0.0.1:%d/patroni" % port}}))
elif args[:2] == ["lease", "revoke"]:
    with open(os.environ["FAKE_ETCD_REVOKED"], "a") as revoked:
        revoked.write(args[2] + "\\n")
else:
    sys.exit("fake etcdctl: unexpected " + repr(args))
"""


class Answering(LocalServer):
    """Accepts and closes every connection, as a running server's port does for the fence."""

    def serve(self, connection: socket.socket) -> None:
        connection.close()


def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Fence:
    """leader-fence.sh running as `postgres-replica-1`, and the etcd it sees."""

    def __init__(self, tmp_path: pathlib.Path, answering: LocalServer) -> None:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        etcdctl = bin_dir / "etcdctl"
        etcdctl.write_text(FAKE_ETCDCTL)
        etcdctl.chmod(0o755)
        self.state_file, self.revoked_file = tmp_path / "etcd.json", tmp_path / "revoked"
        self.revoked_file.touch()
        self.ports = {"postgres-primary": answering.port, "postgres-replica-2": closed_port()}
        self.set(leader=None)
        self.log = tmp_path / "fence.log"
        env = {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "FAKE_ETCD_STATE": str(self.state_file),
            "FAKE_ETCD_REVOKED": str(self.revoked_file),
            "FAILOVER_DETECT_SECONDS": str(DETECT_SECONDS),
            "FENCE_CHECK_SECONDS": "0.05",
            "PG_NODE": "postgres-replica-1",
        }
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                ["bash", str(FENCE), "http://127.0.0.1:2379", PREFIX], env=env, stderr=log, start_new_session=True
            )

    def set(self, leader: str | None, lease: int | None = None, silent: int = 0) -> None:
        state = {"leader": leader, "lease": lease, "silent": silent, "ports": self.ports}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.state_file)  # never half a file for the fence to read

    def lines(self, text: str) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if text in line]

    def wait_until(self, condition: Callable[[], list[str]], what: str, timeout: float = 10) -> list[str]:
        """condition()'s first non-empty answer, polled; fails with the fence's log after `timeout`."""
        deadline = time.monotonic() + timeout
        while not (found := condition()):
            said = self.log.read_text()
            assert time.monotonic() < deadline, f"{what} not within {timeout}s:\n{said}"
            time.sleep(0.05)
        return found

    def wait_lines(self, text: str, count: int, timeout: float = 10) -> list[str]:
        return self.wait_until(
            lambda: found if len(found := self.lines(text)) >= count else [],
            f"{count} line(s) with {text!r}",
            timeout,
        )

    def revoked(self) -> list[str]:
        return self.revoked_file.read_text().split()

    def stop(self) -> None:
        with_children = -self.process.pid
        os.kill(with_children, signal.SIGTERM)
        self.process.wait(timeout=5)


@pytest.fixture
def fence(tmp_path: pathlib.Path) -> Iterator[Fence]:
    if shutil.which("jq") is None:
        message = "leader-fence.sh reads member keys with jq: apt-get install jq"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    answering = Answering()
    running = Fence(tmp_path, answering)
    try:
        yield running
    finally:
        running.stop()
        answering.close()


def test_a_silent_leader_that_still_answers_is_left_to_its_ttl_and_said_so_once(fence: Fence) -> None:
    fence.set("postgres-primary", lease=0x1F, silent=DETECT_SECONDS + 1)
    fence.wait_lines("postgres-primary " + LEFT.format(seconds=DETECT_SECONDS + 1), 1)
    time.sleep(1)  # about 20 more checks
    assert len(fence.lines("left to its TTL")) == 1, fence.log.read_text()
    assert fence.revoked() == []


def test_a_silent_leader_that_answers_on_no_port_has_its_lease_ended(fence: Fence) -> None:
    fence.set("postgres-replica-2", lease=0x2A, silent=DETECT_SECONDS)
    fence.wait_lines(ENDED, 1)
    revoked = fence.wait_until(fence.revoked, "a lease revoked", timeout=5)
    assert set(revoked) == {"2a"}  # etcdctl takes the lease id in hex


def test_a_lock_renewed_in_time_is_left_alone(fence: Fence) -> None:
    # The holder answers on no port: only its lease's age keeps the fence from ending it.
    fence.set("postgres-replica-2", lease=0x2A, silent=DETECT_SECONDS - 1)
    time.sleep(DETECT_SECONDS + 1)
    assert fence.revoked() == [] and fence.lines("leader-fence") == [], fence.log.read_text()


def test_a_fence_that_held_the_lock_itself_still_reports_the_next_silent_leader(fence: Fence) -> None:
    """The suite's switchover order once made a fence log its first silence, then hold the
    lock itself, then meet a new leader's silence: it must say so again."""
    fence.set("postgres-primary", lease=0x1F, silent=DETECT_SECONDS + 1)
    fence.wait_lines("left to its TTL", 1)
    fence.set("postgres-replica-1", lease=0x30)  # this node's own lock: nothing to watch
    time.sleep(DETECT_SECONDS)
    fence.ports["postgres-replica-2"] = fence.ports["postgres-primary"]  # the new leader answers too
    fence.set("postgres-replica-2", lease=0x31, silent=DETECT_SECONDS + 1)
    said = fence.wait_lines("left to its TTL", 2, timeout=DETECT_SECONDS + 5)
    assert "postgres-replica-2 " in said[1]
    assert fence.revoked() == []


def test_the_fence_is_off_at_zero_seconds(tmp_path: pathlib.Path) -> None:
    env = {**os.environ, "FAILOVER_DETECT_SECONDS": "0", "PG_NODE": "postgres-replica-1"}
    done = subprocess.run(["bash", str(FENCE), "http://127.0.0.1:2379", PREFIX], env=env, timeout=5, check=False)
    assert done.returncode == 0
