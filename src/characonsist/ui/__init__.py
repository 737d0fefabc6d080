"""``characonsist ui``: a local web app for making a story (``pip install 'characonsist[ui]'``).

One page (plain HTML, CSS and JavaScript shipped in ``ui/static``: no build step, nothing fetched from the
internet), a small Starlette app (``server.py``) and one worker thread that owns the model (``worker.py``). The
work is the application layer's (``characonsist.app``), shared with ``characonsist generate``; docs/UI.md.
"""

from __future__ import annotations

import errno
import socket
import sys

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def missing_extra() -> str | None:
    """Why the UI cannot start in this install, or None."""
    for module in ("starlette", "uvicorn"):
        try:
            __import__(module)
        except ImportError:
            return f"the web UI needs {module}: pip install 'characonsist[ui]'"
    return None


def allowed_hosts(host: str) -> list[str] | None:
    """The Host headers the server answers: its loopback names (None, no check, when it serves a network)."""
    return ["127.0.0.1", "localhost", "::1", "[::1]"] if host in LOOPBACK else None


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (port 0: any free port); OSError becomes one line naming the address."""
    from ..app.folder import FolderError

    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise FolderError(f"--port {port}: must be a port number between 0 and 65535 (0 picks a free one)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except socket.gaierror as e:   # an OSError too, but about the name
        sock.close()
        raise FolderError(f"--host {host}: not an address of this machine ({e.strerror or e}); give an IP address "
                          "such as 127.0.0.1 (this machine only) or 0.0.0.0 (every network)") from None
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            advice = "is in use; choose another port (--port 0 picks a free one)"
        elif e.errno == errno.EADDRNOTAVAIL:
            advice = "is not an address of this machine; give one of its addresses, such as 127.0.0.1"
        elif e.errno == errno.EACCES:
            advice = "permission denied (ports below 1024 need administrator rights); choose a port above 1023"
        else:
            advice = f"{e.strerror or e}; choose another address or port"
        raise FolderError(f"--host {host} --port {port}: {advice}") from None
    sock.listen(64)
    sock.set_inheritable(True)
    return sock


def serve(model: str = "toy", out: str = "characonsist-ui", host: str = "127.0.0.1", port: int = 8765,
          say=print, loading=None) -> int:
    """Start the UI and serve until interrupted (InputError / FolderError before anything starts)."""
    import uvicorn

    from .server import create_app
    from .worker import Worker, Workspace

    sock = bind(host, port)                # a bad address or a port in use: one line before the model is looked at
    try:
        workspace = Workspace(out, model, loading)
        worker = Worker(workspace, model)  # InputError for a model that cannot be found (or bad loading options)
        workspace.open()
    except BaseException:
        sock.close()
        raise
    try:
        worker.start()
        app = create_app(worker, allowed_hosts(host))
        address = sock.getsockname()
        shown = f"[{address[0]}]" if ":" in address[0] else address[0]
        how = " ".join(workspace.loading.flags())
        say(f"characonsist ui: http://{shown}:{address[1]}/  (model {model}{' ' + how if how else ''}, stories in "
            f"{workspace.root}; Ctrl-C stops)")
        if host not in LOOPBACK:
            print(f"characonsist: warning: --host {host} makes the UI reachable from other machines; it has no login: "
                  "anyone who reaches it can run the model and read the stories in its folder", file=sys.stderr)
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except KeyboardInterrupt:   # Ctrl-C is how a server stops: not an error
            pass
        say("characonsist ui: stopped")
    finally:
        worker.stop()
        workspace.close()
        sock.close()
    return 0
