"""Real sFlow v5 from a real exporter: pmacct's ``pmacctd`` with its ``sfprobe`` plugin reads
a capture file (the shared trace by default: Ethernet/IPv4/UDP frames) and exports one flow
sample per packet (``sampling_rate: 1``) to a UDP socket of ours on 127.0.0.1, port 0.

pmacctd reads the file as fast as it can and its plugin sends from a pipe, so datagrams may
be lost on a busy machine: callers count what arrived, they do not expect a number. Nothing
is sent anywhere but the loopback socket bound here.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.trace import shared_dir

#: pmacctd sleeps 2 s before reading a capture file, then exports within a second or so;
#: the receive loop ends this long after the last datagram, or at the overall timeout.
QUIET_S = 2.0
TIMEOUT_S = 60.0
AGENT = "192.0.2.10"


def available() -> bool:
    return shutil.which("pmacctd") is not None


def sfprobe_export(capture: Path | None = None) -> list[bytes]:
    """The sFlow datagrams pmacctd's sfprobe exports for ``capture``, in arrival order."""
    capture = capture or shared_dir() / "data" / "netflow_v5_simpleweb.pcap"
    pmacctd = shutil.which("pmacctd")
    assert pmacctd is not None, "pmacctd (Debian package pmacct) is not installed"
    with (
        tempfile.TemporaryDirectory(prefix="s8sflow-") as tmp,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock,
    ):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = Path(tmp) / "pmacctd.conf"
        config.write_text(
            "\n".join(
                [
                    "daemonize: false",
                    f"pcap_savefile: {capture}",
                    "pcap_savefile_wait: false",
                    "plugins: sfprobe[sf]",
                    f"sfprobe_receiver[sf]: 127.0.0.1:{port}",
                    f"sfprobe_agentip[sf]: {AGENT}",
                    "sampling_rate[sf]: 1",
                    "",
                ]
            )
        )
        proc = subprocess.Popen(
            [pmacctd, "-f", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        out: list[bytes] = []
        deadline = time.monotonic() + TIMEOUT_S
        last = time.monotonic() + 5.0  # its 2 s sleep and start-up first
        try:
            while time.monotonic() < min(deadline, last + QUIET_S):
                sock.settimeout(0.2)
                try:
                    out.append(sock.recv(65535))
                except TimeoutError:
                    continue
                last = time.monotonic()
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return out
