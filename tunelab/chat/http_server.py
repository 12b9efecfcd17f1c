"""The HTTP plumbing `tunelab serve`, `tunelab web` and `tunelab board` share: the address bound before anything
loads (`listen_sockets`, so a port in use is one line at once), uvicorn run until Ctrl-C with the generation worker
ended first (`serve`), and an app run in a thread for tests and notebooks (`BackgroundServer`)."""

from __future__ import annotations

import threading
import time

from fastapi import FastAPI

from tunelab.errors import TunelabError


class BackgroundServer:
    """Run an app with uvicorn in a thread (tests, notebooks): `with BackgroundServer(app) as url: ...`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.app = app
        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="tunelab-server")

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError(f"the server did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        return f"http://{self.host}:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def listen_sockets(host: str, port: int) -> list:
    """Sockets bound to `host`:`port` (each address the host resolves to, as uvicorn would bind them), for `serve`.
    Bound before the model loads, so a port in use or an address that is not this machine's is one line at once,
    not an error after minutes of loading."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise TunelabError(f"--host {host}: not an address to listen on ({exc.strerror}): use 127.0.0.1 (this "
                           f"machine only) or 0.0.0.0 (every network interface).") from None
    sockets = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's servers do
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        reason = (exc.strerror or str(exc)).lower()
        if exc.errno == errno.EADDRINUSE:
            raise TunelabError(f"--port {port}: {host}:{port} is already in use (another server?): stop it or pick "
                               f"another --port.") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise TunelabError(f"--host {host}: not an address of this machine ({reason}): use 127.0.0.1 (this "
                               f"machine only) or 0.0.0.0 (every network interface).") from None
        if exc.errno == errno.EACCES:
            raise TunelabError(f"--port {port}: not allowed ({reason}; ports below 1024 need root): pick another "
                               f"--port.") from None
        raise TunelabError(f"cannot listen on {host}:{port}: {reason}.") from None
    return sockets


def serve(app: FastAPI, *, host: str, port: int, api_key: str | None = None,
          what: str = "OpenAI-compatible API", sockets: list | None = None) -> None:
    """Run `app` until SIGTERM / Ctrl-C, which first finishes every request in the engine so the server stops at
    once instead of waiting for replies that may take minutes. `sockets`: from `listen_sockets(host, port)`, bound
    before the model was loaded (else bound here). The address is printed once the server listens."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.chat.batcher.stop(timeout=0)  # every open response ends with "the server is shutting down"
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started:
                shown = f"[{host}]" if ":" in host else host
                print(f"{what} on http://{shown}:{port}  (Ctrl-C to stop)", flush=True)

    if sockets is None:
        sockets = listen_sockets(host, port)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: listening on {host}: anyone who can reach this machine can use the model"
              f" (pass --api-key KEY to require a key)", flush=True)
    try:
        Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)).run(
            sockets=sockets)
    finally:
        app.state.chat.close()  # waits for the worker's current step (the signal handler could not)
