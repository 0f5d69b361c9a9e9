"""A real S3 HTTP endpoint on loopback: moto's server mode, for tests, benchmarks and localnet.

In-process: `start_s3_server()` runs it in a thread. As its own process:
`python -m bistro.localnet.s3server --port N` prints its URL on one line of stdout once it accepts
connections, then serves until killed (SIGTERM or SIGINT).

moto is an optional extra (`pip install 'bistro[s3sim]'`): a real deployment talks to a real S3
API and does not need it; `bistro localnet --storage s3` and `bistro bench storage` do.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import signal
import sys
import threading

S3SIM_HINT = "pip install 'bistro[s3sim]'"


class S3SimUnavailable(RuntimeError):
    """moto, which serves the loopback S3 endpoint, is not installed; the message names the extra."""


def require_moto() -> None:
    """Raise `S3SimUnavailable` (naming the extra to install) unless moto's server can be imported."""
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        raise S3SimUnavailable(f"the loopback S3 server needs moto's server mode: {S3SIM_HINT}")


class S3Server:
    """A running moto server; `.url` is its endpoint."""

    def __init__(self, host: str, port: int) -> None:
        require_moto()
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not one line per request
        self._server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
        self._server.start()
        bound_host, bound_port = self._server.get_host_and_port()
        self.url = f"http://{bound_host}:{bound_port}"

    def stop(self) -> None:
        self._server.stop()


def start_s3_server(host: str = "127.0.0.1", port: int = 0) -> S3Server:
    """Start a moto S3 server on `host:port` (0: any free port) in a thread of this process."""
    return S3Server(host, port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bistro.localnet.s3server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        server = start_s3_server(args.host, args.port)
    except S3SimUnavailable as e:
        print(e, file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(server.url, flush=True)
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
