"""A delaying TCP relay: latency between hosts without netem, for clients pointed at it or, transparently, for
connections an iptables REDIRECT rule sends it (each then goes on to where it was going)."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable

from loguru import logger

# --------------------------------------------------------------------------------------------- the relay

# Latency without netem: no packaged tool on this Debian delays a TCP stream (socat, haproxy and nginx forward at
# once; tc's netem qdisc is the usual answer and this kernel lacks it; tc's tbf and the other qdiscs it has shape
# rate, never delay), so this relay is hand-written. Each direction is a queue of (due time, chunk): a chunk read
# at t is written at t + delay, in order, so a round trip through the relay takes delay + delay_back more,
# whatever the rate. The connection to the target is made at once; a bounded queue holds back a reader that
# runs ahead of its writer. Transparent (no target): peers that connect to the addresses they tell each other,
# as gloo's ranks do, cannot be pointed at a relay, so a nat OUTPUT rule in the connecting host REDIRECTs them
# here and the relay reads where each was going from conntrack (SO_ORIGINAL_DST); Faults.latency places both.
RELAY_CHUNK = 64 * 1024
RELAY_QUEUE = 256  # chunks per direction: at most 16 MiB held
# The relay's own connections carry this SO_MARK, so that the REDIRECT rule which sends a host's connections to
# it lets them pass (``-m mark ! --mark``) instead of sending them round again.
RELAY_MARK = 0x6E63
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h: where a connection was going before NAT redirected it


async def _delayed_pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(RELAY_QUEUE)

    async def read() -> None:
        try:
            while data := await reader.read(RELAY_CHUNK):
                await queue.put((time.monotonic() + delay, data))
        except (ConnectionError, OSError):
            pass  # a reset ends the stream like a close
        finally:
            await queue.put((time.monotonic() + delay, b""))  # end of stream, delayed like the data

    async def write() -> None:
        while True:
            due, data = await queue.get()
            # the clock itself, not uvloop's loop.time(): libuv caches that at each loop turn in whole
            # milliseconds, and a stamp taken late in a turn made a 0.25 s round trip 0.2495 s (seen in CI);
            # a timer may also fire a little early, so the wait goes on until the data is due
            while (left := due - time.monotonic()) > 0:
                await asyncio.sleep(left)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    reading = asyncio.ensure_future(read())
    try:
        await write()
    finally:
        reading.cancel()


def original_destination(connection: socket.socket) -> tuple[str, int] | None:
    """Where an accepted connection was going before a REDIRECT rule sent it here (conntrack's record of it:
    a sockaddr_in, port and address in network order); None when no rule redirected it (conntrack keeps no
    record, or one that names the relay itself)."""
    try:
        raw = connection.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return None
    port, address = struct.unpack("!2xH4s8x", raw)
    destination = socket.inet_ntoa(address), port
    return None if destination == connection.getsockname() else destination


async def _open_marked(target: tuple[str, int]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to ``target`` that the REDIRECT rule passes by (SO_MARK needs CAP_NET_ADMIN: root)."""
    address = (await asyncio.get_running_loop().getaddrinfo(*target, type=socket.SOCK_STREAM))[0]
    sock = socket.socket(address[0], socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, RELAY_MARK)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, address[4])
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


async def _relay_connection(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    target: tuple[str, int] | None,
    delay: float,
    delay_back: float,
) -> None:
    transparent = target is None
    target = target or original_destination(client_writer.get_extra_info("socket"))
    if target is None:  # a connection made to the relay itself (a readiness probe): nowhere to send it
        client_writer.close()
        return
    try:
        if transparent:
            target_reader, target_writer = await _open_marked(target)
        else:
            target_reader, target_writer = await asyncio.open_connection(*target)
    except OSError as error:
        logger.warning("relay: cannot reach {}:{}: {}", *target, error)
        client_writer.close()
        return
    try:
        await asyncio.gather(
            _delayed_pipe(client_reader, target_writer, delay), _delayed_pipe(target_reader, client_writer, delay_back)
        )
    except (ConnectionError, OSError):
        pass
    finally:
        for writer in (client_writer, target_writer):
            writer.close()


async def run_relay(
    listen: tuple[str, int],
    target: tuple[str, int] | None,
    delay: float,
    delay_back: float | None = None,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Serves ``listen`` until cancelled: each connection relayed to ``target`` (None: to where it was going
    before a REDIRECT rule sent it here), with ``delay`` s added to each byte sent to it and ``delay_back``
    (default: ``delay``) to each byte it sends back. ``ready(port)`` once listening."""
    back = delay if delay_back is None else delay_back
    server = await asyncio.start_server(
        lambda r, w: _relay_connection(r, w, target, delay, back), listen[0], listen[1], reuse_address=True
    )
    port = server.sockets[0].getsockname()[1]
    where = "{}:{}".format(*target) if target else "each connection's original destination"
    logger.info("relay {}:{} -> {}, delay {} s there, {} s back", listen[0], port, where, delay, back)
    if ready is not None:
        ready(port)
    async with server:
        await server.serve_forever()
