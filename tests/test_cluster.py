"""Hosts made of network namespaces on a bridge (deploy/netns/): names and addresses, no route out, a partition
and its heal, packet loss, the delaying relay (pointed at, or transparent behind a REDIRECT rule), a generation
replica cut off and back, 32 chats over two replicas with one partitioned mid-stream, tensor-parallel ranks on two
hosts (partitioned, restarted), and a teardown that leaves nothing (namespaces, links, iptables rules,
processes); and the keepalive settings that make a partition visible.

Two hosts per cluster, each cluster named with a prefix unique to this run (``nct<pid>``); clusters an earlier,
killed run left are removed first. Skipped, with the reason, where namespaces cannot be made (not root, no
``ip``/``iptables``, no CAP_NET_ADMIN)."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from deploy import netns
from deploy.netns import Cluster, ClusterError, bench, tensor
from deploy.netns import cli as netns_cli
from services.common.channels import KEEPALIVE_TIME_MS, KEEPALIVE_TIMEOUT_MS

REPO = Path(__file__).resolve().parents[1]
TEST_PREFIX = re.compile(r"^nct(\d+)[a-z]?-h\d+$")


def _prefix(suffix: str = "") -> str:
    return f"nct{os.getpid() % 1_000_000}{suffix}"


@pytest.fixture(scope="module")
def can_make_namespaces() -> None:
    reason = netns.probe()
    if reason is not None:
        pytest.skip(reason)
    # what an earlier run killed before its teardown left: its pytest process is gone
    for name in netns.namespaces():
        match = TEST_PREFIX.match(name)
        if match and not psutil.pid_exists(int(match.group(1))):
            Cluster(name.rsplit("-", 1)[0], 1).down(grace=1)


@pytest.fixture(scope="module")
def cluster(can_make_namespaces, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    made = Cluster(_prefix(), 2, state_dir=tmp_path_factory.mktemp("cluster"))
    try:
        yield made.up()
    finally:
        made.down(grace=2)


@pytest.fixture
def echo_server(cluster: Cluster) -> Iterator[int]:
    """A TCP echo server in h2 (a socket of this process, made inside h2) on h2's address: its port."""
    listener = cluster.socket("h2", socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((cluster.host("h2").address, 0))
    listener.listen()

    def echo(connection: socket.socket) -> None:
        with connection:
            while data := connection.recv(4096):
                connection.sendall(data)

    def accept() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(connection,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1]
    listener.shutdown(socket.SHUT_RDWR)
    listener.close()


def _round_trip(cluster: Cluster, host: str, target: str, port: int, timeout: float = 2.0) -> float:
    with cluster.connect(host, target, port, timeout) as connection:
        began = time.monotonic()
        connection.sendall(b"ping")
        assert connection.recv(16) == b"ping"
        return time.monotonic() - began


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _reaches(cluster: Cluster, host: str, target: str, port: int) -> bool:
    try:
        _round_trip(cluster, host, target, port, timeout=1.0)
        return True
    except OSError:
        return False


def test_a_server_takes_the_clients_keepalive_pings_without_a_goaway():
    """A channel with the project's options pings every KEEPALIVE_TIME_MS, also while idle; a server with the
    project's options answers them and keeps the connection (at gRPC's defaults it would GOAWAY too_many_pings
    after two of them, and the channel would drop to IDLE). Needs no namespaces."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.common.channels import channel_options
    from services.common.server import start_server

    server = start_server([], "127.0.0.1:0")
    states: list[grpc.ChannelConnectivity] = []
    channel = grpc.insecure_channel(server.address, channel_options(server.address))
    try:
        channel.subscribe(states.append, try_to_connect=True)
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        time.sleep(4 * KEEPALIVE_TIME_MS / 1000)  # four pings without a call
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        assert states[-1] == grpc.ChannelConnectivity.READY
        assert states.count(grpc.ChannelConnectivity.READY) == 1, states  # never dropped and reconnected
    finally:
        channel.close()
        server.stop(grace=0)


def test_not_root_or_missing_tools_is_refused_with_the_reason(monkeypatch, tmp_path):
    import typer

    monkeypatch.setattr(netns.machine.os, "geteuid", lambda: 1000)
    assert "needs root" in netns.unavailable_reason()
    with pytest.raises(ClusterError, match="needs root"):
        Cluster(_prefix("r"), 2, state_dir=tmp_path).up()
    monkeypatch.setattr(netns.machine.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.machine.shutil, "which", lambda tool: None if tool == "iptables" else f"/usr/sbin/{tool}")
    assert "`iptables` (Debian: iptables)" in netns.unavailable_reason()
    with pytest.raises(typer.Exit) as exited:  # the CLI's `up` (called directly: its callback resets loguru)
        netns_cli.up(hosts=2, prefix=_prefix("r"), state_dir=tmp_path)
    assert exited.value.exit_code == 1
    with pytest.raises(ClusterError, match="prefix"):
        Cluster("Not-A-Prefix", 2)
    with pytest.raises(ClusterError, match="private"):
        Cluster(_prefix("r"), 2, subnet="8.8.8.0/24")


def test_hosts_reach_each_other_by_name_and_nothing_routes_out(cluster: Cluster):
    h1, h2 = cluster.hosts
    assert cluster.lookup("h2") == cluster.lookup(h2.namespace) == h2.address
    for source in ("h1", "h2"):
        for target in ("h1", "h2", h1.address, h2.address):
            assert cluster.ping(source, target) < 2.0
        # inside a host the names resolve as /etc/hosts would (ip netns exec mounts /etc/netns/<ns>/hosts)
        resolved = cluster.exec(source, ["getent", "hosts", "h2"]).stdout.split()
        assert resolved[0] == h2.address
        assert cluster.exec(source, ["getent", "hosts", socket.gethostname()]).stdout.split()[0] == (
            cluster.host(source).address
        )
        routes = json.loads(cluster.exec(source, ["ip", "-j", "route", "show"]).stdout)
        assert [route["dst"] for route in routes] == [cluster.subnet], routes  # no default route
        udp = cluster.socket(source, socket.AF_INET, socket.SOCK_DGRAM)
        with udp, pytest.raises(OSError) as raised:
            udp.connect(("192.0.2.1", 53))  # the machine's own gateway, and anything else outside
        assert raised.value.errno == errno.ENETUNREACH
        loopback = json.loads(cluster.exec(source, ["ip", "-j", "link", "show", "lo"]).stdout)[0]
        assert "UP" in loopback["flags"]


def test_up_again_changes_nothing(cluster: Cluster):
    def snapshot() -> tuple:
        ours = sorted(name for name in netns.links() if name.startswith(f"{cluster.prefix}-"))
        return ours, netns.iptables_rules(cluster.rule_tag), sorted(netns.namespaces())

    before = snapshot()
    cluster.up()
    assert snapshot() == before
    assert len(before[1]) == 1 and len(before[0]) == 3  # the bridge's FORWARD rule; the bridge and two veths


def test_a_partition_cuts_a_server_off_and_heal_brings_it_back(cluster: Cluster, echo_server: int):
    assert _round_trip(cluster, "h1", "h2", echo_server) < 1.0
    for method in ("link", "iptables"):
        cluster.partition("h2", method=method)
        try:
            with pytest.raises(OSError):  # a timeout or "no route to host": either way, no connection
                cluster.connect("h1", "h2", echo_server, timeout=1.5)
        finally:
            cluster.heal("h2")
        assert _wait(lambda: _reaches(cluster, "h1", "h2", echo_server), timeout=10), f"not healed ({method})"


def test_a_partition_from_one_peer_leaves_the_others(cluster: Cluster, echo_server: int):
    cluster.partition("h2", peers=["h1"])
    try:
        with pytest.raises(OSError):
            cluster.connect("h1", "h2", echo_server, timeout=1.0)
        assert _reaches(cluster, "h2", "h2", echo_server)  # h2 itself still reaches its own address
    finally:
        cluster.heal("h2")
    assert _wait(lambda: _reaches(cluster, "h1", "h2", echo_server), timeout=10)


def test_loss_drops_that_share_of_the_packets_arriving_at_a_host(cluster: Cluster):
    receiver = cluster.socket("h2", socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind((cluster.host("h2").address, 0))
    receiver.settimeout(0.5)
    sender = cluster.socket("h1", socket.AF_INET, socket.SOCK_DGRAM)
    target = receiver.getsockname()

    def delivered(count: int) -> int:
        for n in range(count):
            sender.sendto(b"%d" % n, target)
            time.sleep(0.001)  # well under the socket's buffer, whatever the scheduling
        received = 0
        try:
            while True:
                receiver.recv(64)
                received += 1
        except TimeoutError:
            return received

    try:
        cluster.loss("h2", 100)
        assert "--probability 1" in cluster.exec("h2", ["iptables", "-S", netns.LOSS_CHAIN]).stdout
        assert delivered(50) == 0
        cluster.loss("h2", 50)
        assert 0 < delivered(200) < 200  # each of 200 lost with p = 1/2: all or none is 2**-199 likely
        cluster.loss("h2", 0)
        assert "statistic" not in cluster.exec("h2", ["iptables", "-S", netns.LOSS_CHAIN]).stdout
        assert delivered(50) == 50
    finally:
        cluster.loss("h2", 0)
        sender.close()
        receiver.close()


def test_the_relay_adds_at_least_its_delay_each_way(cluster: Cluster, echo_server: int):
    direct = _round_trip(cluster, "h1", "h2", echo_server)
    port = 7100
    relay = cluster.relay("h1", port, f"h2:{echo_server}", delay=0.15, delay_back=0.1)
    assert relay.poll() is None
    for _ in range(3):
        assert _round_trip(cluster, "h1", "h1", port) >= 0.25  # no upper bound: the machine may be busy
    assert direct < 0.25


def test_latency_delays_a_hosts_connections_to_a_peer_transparently_and_clearing_it_leaves_no_rule(
    cluster: Cluster, echo_server: int
):
    """h1 connects to h2's own address, as gloo's ranks do, and a nat REDIRECT rule in h1 hands the connection to
    a relay there: each round trip takes at least the delay there and back. Cleared: no rule, no relay, no delay
    (teardown: test_down_leaves_no_namespace_link_rule_or_process_even_of_a_crashed_run)."""
    relay = cluster.latency("h1", 0.15, peers=["h2"], delay_back=0.1)
    try:
        assert "REDIRECT" in cluster.exec("h1", ["iptables", "-t", "nat", "-S"]).stdout
        for _ in range(3):
            assert _round_trip(cluster, "h1", "h2", echo_server) >= 0.25  # no upper bound: the machine may be busy
        assert _round_trip(cluster, "h2", "h2", echo_server) < 0.25  # h2's own connections pass no relay
    finally:
        cluster.clear_latency("h1")
    assert relay.wait(10) is not None
    assert "REDIRECT" not in cluster.exec("h1", ["iptables", "-t", "nat", "-S"]).stdout
    assert _round_trip(cluster, "h1", "h2", echo_server) < 0.25


REPLICA_CLIENT = """
import sys, time, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from services.common.channels import channel_options
address = sys.argv[1]
# the project's own options: their keepalive is what makes the channel see the loss (without it a connection whose
# peer vanished stays READY and every call ends in DEADLINE_EXCEEDED until TCP gives up, minutes later)
stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(address, channel_options(address)))
while True:
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError as error:
        status = error.code().name
    print(f"{time.monotonic():.3f} {status}", flush=True)
    time.sleep(0.2)
"""


def test_a_generation_replica_in_h2_partitioned_and_healed(cluster: Cluster, tiny_model_dir: Path, tmp_path: Path):
    """The tiny model served in h2, watched from h1 over one long-lived channel: SERVING, UNAVAILABLE within a
    bound once h2 is cut off, SERVING again once healed."""
    address = f"{cluster.host('h2').address}:50051"
    replica_log, client_log = tmp_path / "replica.log", tmp_path / "client.log"
    replica = cluster.spawn(
        "h2",
        [sys.executable, "-m", "services.generation", "serve", "--model", str(tiny_model_dir), "--address", address,
         "--metrics-address", "", "--var-dir", str(tmp_path / "var"), "--insecure"],
        log=replica_log,
    )  # fmt: skip
    client = cluster.spawn("h1", [sys.executable, "-c", REPLICA_CLIENT, address], log=client_log)

    def statuses_since(began: float) -> list[str]:
        lines = [line.split() for line in client_log.read_text().splitlines() if re.match(r"^\d+\.\d+ \w+$", line)]
        return [status for at, status in lines if float(at) >= began]

    def seen(status: str, began: float, timeout: float) -> float | None:
        if _wait(lambda: status in statuses_since(began) or replica.poll() is not None, timeout):
            assert replica.poll() is None, f"the replica exited: {replica_log.read_text()[-2000:]}"
            return time.monotonic() - began
        return None

    try:
        assert seen("SERVING", time.monotonic(), 120) is not None, replica_log.read_text()[-2000:]
        cluster.partition("h2")
        try:
            took = seen("UNAVAILABLE", time.monotonic(), 15)
            assert took is not None, statuses_since(0)[-40:]
        finally:
            cluster.heal("h2")
        assert seen("SERVING", time.monotonic(), 15) is not None, statuses_since(0)[-40:]
        assert replica.poll() is None and client.poll() is None
    finally:
        for process in (client, replica):
            process.kill()
            process.wait(10)


@pytest.fixture(scope="module")
def three_hosts(can_make_namespaces, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """h1 for the orchestrator, h2 and h3 for a generation replica each."""
    made = Cluster(_prefix("c"), 3, state_dir=tmp_path_factory.mktemp("three"))
    try:
        yield made.up()
    finally:
        made.down(grace=2)


def test_32_chats_over_two_replicas_survive_one_partitioned_mid_stream(
    three_hosts: Cluster, tiny_model_dir: Path, tmp_path: Path
):
    """32 chats stream from the orchestrator in h1 over replicas in h2 and h3; h3 is cut off from h1 (iptables
    DROP) mid-way. Its chats end in UNAVAILABLE naming it within the keepalive's bound, h2's finish, none hangs;
    every chat started once the loss was seen is answered by h2; healed, h3 serves again."""
    result = bench.replica_partition(three_hosts, str(tiny_model_dir), tmp_path, chats=32, tokens=300)
    lost = f"{three_hosts.host('h3').address}:{bench.GENERATION_PORT}"
    partitioned, in_flight, after = result["partitioned_at"], result["in_flight"], result["after"]
    hung = [chat for chat in in_flight + after if chat["status"] in ("RUNNING", "DEADLINE_EXCEEDED")]
    assert hung == []
    failed = [chat for chat in in_flight if chat["status"] != "OK"]
    assert 0 < len(failed) < 32, [chat["status"] for chat in in_flight]
    assert {chat["status"] for chat in failed} == {"UNAVAILABLE"}, failed
    assert all(f"the generation service at {lost} failed" in chat["details"] for chat in failed), failed
    # keepalive: a ping unanswered for KEEPALIVE_TIMEOUT_MS after at most KEEPALIVE_TIME_MS; slack for a busy CPU
    bound = (KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS) / 1000 + 4
    assert max(chat["ended"] for chat in failed) - partitioned < bound, sorted(c["ended"] - partitioned for c in failed)
    visible = max(chat["ended"] for chat in failed)
    started_after = [chat for chat in after if chat["started"] > visible]
    assert len(started_after) >= 5 and all(chat["status"] == "OK" for chat in started_after), started_after
    assert result["seconds_to_recover"] is not None and result["seconds_to_recover"] < 30, result["served_after_heal"]
    assert lost in result["served_after_heal"]


TP_CLIENT = """
import json, sys, time, grpc
from pathlib import Path
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nightcap.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from services.common.channels import channel_options
address, out, prompts = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
channel = grpc.insecure_channel(address, channel_options(address))
grpc.channel_ready_future(channel).result(timeout=300)
stub = generation_pb2_grpc.GenerationStub(channel)
def generate(prompt, new_tokens):
    params = common_pb2.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, temperature=0.0)
    request = generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=prompt), params=params)
    return stub.Generate(request, timeout=300)
result = {"greedy": [[i for r in generate(p, n) for i in r.token_ids] for p, n in prompts]}
stream = generate([1, 2, 3], 900)
next(stream)
(out / "streaming").write_text("")
while not (out / "partitioned").exists():
    time.sleep(0.05)
partitioned = float((out / "partitioned").read_text())
try:
    for _ in stream:
        pass
    result["stream"] = "OK"
except grpc.RpcError as error:
    result["stream"], result["details"] = error.code().name, error.details()
result["ended_after_s"] = time.time() - partitioned
try:
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
    result["health"] = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
except grpc.RpcError as error:
    result["health"] = error.code().name
(out / "result.json").write_text(json.dumps(result))
"""
GREEDY_CASES = [([5, 6, 7, 8], 24), (list(range(30, 70)), 6), ([200, 201, 420], 12)]
TP_TIMEOUT_S = 8


def test_tensor_parallel_ranks_on_two_hosts_match_one_rank_and_a_partition_ends_in_unavailable_until_restarted(
    cluster: Cluster, tiny_model_dir: Path, tmp_path: Path
):
    """Rank 0 serves in h1, rank 1 runs in h2 (started there, not by rank 0), gloo over the bridge: the greedy
    tokens are one process's. h2 cut off mid-stream: the stream ends in UNAVAILABLE and the service stops being
    SERVING within the shard timeout, never a hang; both ranks exit. Healed and both started again on their hosts
    (what a supervisor does), the service is SERVING and generates one process's tokens again."""
    from services.common.registry import ModelRegistry
    from services.generation.engine.request import Request, TokenChunk
    from services.generation.engine.sampling import SamplingConfig
    from services.generation.loading import load_model, start_engine

    engine = start_engine(load_model(str(tiny_model_dir), ModelRegistry(tmp_path / "registry")))
    try:
        expected = []
        for prompt, new_tokens in GREEDY_CASES:
            request = engine.submit(Request(prompt, SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True)))
            expected.append([i for e in request.events(timeout=60) if isinstance(e, TokenChunk) for i in e.token_ids])
    finally:
        engine.shutdown(grace=1)

    h1 = cluster.host("h1").address
    master = {"MASTER_ADDR": h1, "MASTER_PORT": "29511", "GLOO_SOCKET_IFNAME": netns.INNER_LINK}
    env = {**os.environ, "NIGHTCAP_SHARD_MASTER_ADDR": h1, "NIGHTCAP_SHARD_MASTER_PORT": "29511",
           "NIGHTCAP_SHARD_LAUNCH": "external", "GLOO_SOCKET_IFNAME": netns.INNER_LINK}  # fmt: skip
    common = ["--model", str(tiny_model_dir), "--var-dir", str(tmp_path / "var"), "--threads", "1",
              "--shard-timeout", str(TP_TIMEOUT_S)]  # fmt: skip
    rank0 = cluster.spawn(
        "h1",
        [sys.executable, "-m", "services.generation", "serve", *common, "--num-shard", "2", "--address",
         f"{h1}:50052", "--metrics-address", "", "--insecure", "--grace", "2"],
        env=env, log=tmp_path / "rank0.log",
    )  # fmt: skip
    rank1 = cluster.spawn(
        "h2",
        [sys.executable, "-m", "services.generation", "shard", *common],
        env={**os.environ, **master, "RANK": "1", "WORLD_SIZE": "2"}, log=tmp_path / "rank1.log",
    )  # fmt: skip
    client = cluster.spawn(
        "h1", [sys.executable, "-c", TP_CLIENT, f"{h1}:50052", str(tmp_path), json.dumps(GREEDY_CASES)],
        log=tmp_path / "client.log",
    )  # fmt: skip
    logs = lambda: "\n".join((tmp_path / n).read_text()[-1500:] for n in ("rank0.log", "rank1.log", "client.log"))  # noqa: E731
    try:
        bench.wait_file(tmp_path / "streaming", 300, rank0, rank1, client)
        cluster.partition("h2", peers=["h1"])
        try:
            bench.mark(tmp_path, "partitioned")
            client.wait(TP_TIMEOUT_S * 3 + 20)
            rank0.wait(TP_TIMEOUT_S * 3 + 20)  # it stops itself once a collective timed out
        finally:
            cluster.heal("h2")
        rank1.wait(TP_TIMEOUT_S * 3 + 20)  # and rank 1, once its broadcast timed out
    except (subprocess.TimeoutExpired, AssertionError):
        raise AssertionError(f"hung or failed:\n{logs()}") from None
    finally:
        for process in (client, rank0, rank1):
            process.kill()
            process.wait(10)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["greedy"] == expected
    assert "rank 1/2 joined the gloo group" in (tmp_path / "rank1.log").read_text()
    assert result["stream"] == "UNAVAILABLE" and "shard" in result["details"], result
    assert result["ended_after_s"] < TP_TIMEOUT_S + 10, result
    assert result["health"] in ("NOT_SERVING", "UNAVAILABLE", "CANCELLED"), result
    assert rank0.returncode != 0 and rank1.returncode != 0

    prompt, new_tokens = GREEDY_CASES[0]
    ranks = tensor.start_ranks(cluster, str(tiny_model_dir), ["h1", "h2"], tmp_path, tmp_path / "var", 29512,
                               "restarted-", shard_timeout=TP_TIMEOUT_S)  # fmt: skip
    logs = [tensor.rank_log(tmp_path, "restarted-", rank) for rank in (0, 1)]
    address = f"{h1}:{tensor.GENERATION_PORT}"
    try:
        again = tensor.greedy(cluster, "h1", address, tmp_path / "restarted.json", new_tokens, ranks, logs, prompt)
    finally:
        tensor.stop_ranks(ranks)
    assert again["tokens"] == expected[0]


def _processes_in(inodes: set[int]) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if os.stat(f"/proc/{process.pid}/ns/net").st_ino in inodes:
                found.append(process)
        except (OSError, psutil.Error):
            continue
    return found


def test_down_leaves_no_namespace_link_rule_or_process_even_of_a_crashed_run(can_make_namespaces, tmp_path: Path):
    prefix = _prefix("d")
    crashed = Cluster(prefix, 2, state_dir=tmp_path / "crashed").up()
    sleepers = [crashed.spawn(host, ["sleep", "600"]) for host in ("h1", "h2")]
    relay = crashed.relay("h1", 7200, "h2:7201", delay=0.05)
    latency = crashed.latency("h2", 0.05, peers=["h1"])  # a transparent relay and its nat REDIRECT rule
    assert "REDIRECT" in crashed.exec("h2", ["iptables", "-t", "nat", "-S"]).stdout
    crashed.partition("h2", peers=["h1"])
    crashed.loss("h1", 10)
    started = {p.pid for p in [*sleepers, relay, latency]} | crashed.pids()
    inodes = {netns.namespace_inode(h.namespace) for h in crashed.hosts}
    assert len(started) >= 3 and None not in inodes

    # a later run of the same prefix knows nothing of it (another state dir, another host count)
    done = Cluster(prefix, 1, state_dir=tmp_path / "later").down(grace=2)
    assert (done.namespaces, done.links, done.rules) == (2, 3, 1) and done.processes >= 3
    assert done.processes >= len(started)
    assert not [name for name in netns.namespaces() if name.startswith(f"{prefix}-")]
    assert not [name for name in netns.links() if name.startswith(f"{prefix}-")]
    assert prefix not in subprocess.run(["iptables", "-S"], capture_output=True, text=True).stdout
    assert prefix not in subprocess.run(["iptables", "-t", "nat", "-S"], capture_output=True, text=True).stdout
    assert not [p for p in started if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert _processes_in(inodes) == []
    assert not list(Path("/etc/netns").glob(f"{prefix}-*")) if Path("/etc/netns").exists() else True
    for process in [*sleepers, relay, latency]:
        process.wait(5)  # reaped: they were this process's children

    # and once more: nothing to do, no error
    assert str(crashed.down(grace=1)) == "0 process(es), 0 namespace(s), 0 link(s), 0 iptables rule(s)"
