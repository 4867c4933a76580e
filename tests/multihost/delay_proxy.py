"""A transparent TCP proxy on a worker host, which delays every byte when told to.

This machine's kernel has no ``sch_netem`` (``tc qdisc ... netem`` answers
"Specified qdisc kind is unknown"; only ``pfifo``, ``tbf`` and ``htb`` are
built in), so a host's link delay is made here instead: an nftables ``nat
output`` rule in the host's namespace redirects the host's TCP connections
to this proxy, which reads each connection's real destination
(``SO_ORIGINAL_DST``), connects there itself (its own sockets carry a
firewall mark the rule skips) and forwards each chunk the host sends, in
order, the delay after it arrived (what the host receives is not held, as
with netem on the host's interface: the round trip grows by the delay).  The delay is read from a file (a
number of milliseconds; 0 at start), so a scenario changes it without
resetting any connection.  Every worker host runs one from the start, so
its connections never need to move.  Packet loss is real: an nftables rule
drops a random share of the packets on the host's interface
(:meth:`tests.multihost.topology.Topology.lossy`).

Run on the host: ``python -m tests.multihost.delay_proxy PORT DELAY_FILE``.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
from pathlib import Path

__all__ = ["MARK", "main"]

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
MARK = 0x1D


class Delay:
    """The delay in the control file, read again at most every 0.1 s."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.value = 0.0
        self.read_at = 0.0

    def seconds(self, now: float) -> float:
        if now - self.read_at > 0.1:
            self.read_at = now
            try:
                self.value = float(self.path.read_text().strip() or 0) / 1000
            except (OSError, ValueError):
                self.value = 0.0
        return self.value


class _NoDelay(Delay):
    def __init__(self) -> None:
        super().__init__(Path("/nonexistent"))

    def seconds(self, now: float) -> float:
        return 0.0


NO_DELAY = _NoDelay()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: Delay) -> None:
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            due, data = await chunks.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                writer.close()
                return
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(send())
    try:
        while True:
            data = await reader.read(65536)
            now = loop.time()
            chunks.put_nowait((now + delay.seconds(now), data))
            if not data:
                break
        await sender
    except (ConnectionError, OSError):
        sender.cancel()
        writer.close()


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: Delay) -> None:
    raw = writer.get_extra_info("socket").getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack("!2xH4s8x", raw)
    upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    upstream.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)  # not redirected again
    upstream.setblocking(False)
    try:
        await asyncio.wait_for(
            asyncio.get_running_loop().sock_connect(upstream, (socket.inet_ntoa(packed), port)), 5.0
        )
        up_reader, up_writer = await asyncio.open_connection(sock=upstream)
    except (TimeoutError, OSError):
        upstream.close()
        writer.close()
        return
    # Like netem on the host's interface: what the host sends waits, what it receives does not.
    await asyncio.gather(_pipe(reader, up_writer, delay), _pipe(up_reader, writer, NO_DELAY))


async def serve(port: int, delay_file: Path) -> None:
    delay = Delay(delay_file)
    server = await asyncio.start_server(lambda r, w: _handle(r, w, delay), "127.0.0.1", port)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


def main() -> int:
    asyncio.run(serve(int(sys.argv[1]), Path(sys.argv[2])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
