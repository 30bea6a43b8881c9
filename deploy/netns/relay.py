"""A delaying TCP relay: latency between hosts without netem."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from loguru import logger

# --------------------------------------------------------------------------------------------- the relay

# Latency without netem: no packaged tool on this Debian delays a TCP stream (socat, haproxy and nginx forward at
# once; tc's netem qdisc is the usual answer and this kernel lacks it), so this relay is hand-written. Each
# direction is a queue of (due time, chunk): a chunk read at t is written at t + delay, in order, so a round
# trip through the relay takes delay + delay_back more, whatever the rate. The connection to the target is made
# at once; a bounded queue holds back a reader that runs ahead of its writer.
RELAY_CHUNK = 64 * 1024
RELAY_QUEUE = 256  # chunks per direction: at most 16 MiB held


async def _delayed_pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(RELAY_QUEUE)

    async def read() -> None:
        try:
            while data := await reader.read(RELAY_CHUNK):
                await queue.put((loop.time() + delay, data))
        except (ConnectionError, OSError):
            pass  # a reset ends the stream like a close
        finally:
            await queue.put((loop.time() + delay, b""))  # end of stream, delayed like the data

    async def write() -> None:
        while True:
            due, data = await queue.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
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


async def _relay_connection(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    target: tuple[str, int],
    delay: float,
    delay_back: float,
) -> None:
    try:
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
    target: tuple[str, int],
    delay: float,
    delay_back: float | None = None,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Serves ``listen`` until cancelled: each connection relayed to ``target``, with ``delay`` s added to each
    byte sent to it and ``delay_back`` (default: ``delay``) to each byte it sends back. ``ready(port)`` once
    listening."""
    back = delay if delay_back is None else delay_back
    server = await asyncio.start_server(
        lambda r, w: _relay_connection(r, w, target, delay, back), listen[0], listen[1], reuse_address=True
    )
    port = server.sockets[0].getsockname()[1]
    logger.info("relay {}:{} -> {}:{}, delay {} s there, {} s back", listen[0], port, *target, delay, back)
    if ready is not None:
        ready(port)
    async with server:
        await server.serve_forever()
