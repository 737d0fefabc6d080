"""``characonsist ui``: a local web app for making a story (``pip install 'characonsist[ui]'``).

One page (plain HTML, CSS and JavaScript shipped in ``ui/static``: no build step, nothing fetched from the
internet), a small Starlette app (``server.py``), one worker thread that owns the model (``worker.py``),
the workspace of story folders (``workspace.py``) and the form's settings (``form.py``). The
work is the application layer's (``characonsist.app``), shared with ``characonsist generate``; docs/UI.md.
"""

from __future__ import annotations

import concurrent.futures
import errno
import ipaddress
import socket
import sys

from ..app.folder import FolderError
from ..inputs import InputError
from .worker import Worker
from .workspace import Workspace


def missing_extra() -> str | None:
    """Why the UI cannot start in this install, or None."""
    for module in ("starlette", "uvicorn"):
        try:
            __import__(module)
        except ImportError:
            return f"the web UI needs {module}: pip install 'characonsist[ui]'"
    return None


def _host_form(name: str) -> str:
    """A name or address as a ``Host`` header spells it (an IPv6 address in brackets), lower-case."""
    name = name.strip().lower()
    try:
        if ipaddress.ip_address(name.strip("[]")).version == 6:
            return f"[{name.strip('[]')}]"
    except ValueError:
        pass
    return name


def _machine_names(address: str, timeout: float = 2.0) -> set[str]:
    """The names this machine has for ``address``: its reverse lookup, and those of ``localhost`` and the machine's
    own name that resolve to it (for an unspecified address, 0.0.0.0 or ::, every address of those names). Lookups
    that take longer than ``timeout`` are left out (``--allow-host`` adds a name)."""

    unspecified = ipaddress.ip_address(address).is_unspecified

    def lookup() -> set[str]:
        found: set[str] = set()
        if not unspecified:
            try:
                name, aliases, _ = socket.gethostbyaddr(address)
                found |= {name, *aliases}
            except OSError:
                pass
        for name in {"localhost", socket.gethostname()}:
            try:
                infos = socket.getaddrinfo(name, None)
            except OSError:
                continue
            addresses = {info[4][0] for info in infos}
            if unspecified:
                found |= {name, *addresses}
            elif address in addresses:
                found.add(name)
        return found

    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(lookup).result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        return set()
    finally:
        pool.shutdown(wait=False)


def check_allow_host(name) -> str:
    """An ``--allow-host`` value as the Host check takes it (a name, an address or ``*.domain``); InputError else."""

    text = str(name).strip().lower()
    bare = text.strip("[]")
    ipv6 = False
    try:
        ipv6 = ipaddress.ip_address(bare).version == 6
    except ValueError:
        pass
    if not text or text == "*" or "*" in text[1:] or (text.startswith("*") and not text.startswith("*.")) \
            or any(c in text for c in "/ @\\") or (":" in text and not ipv6):
        raise InputError(f"--allow-host {name!r}: give a host name or address without a port, such as "
                         "mybox.local or 192.168.1.20 (or *.example.lan for every name under it); the Host check "
                         "cannot be switched off")
    return _host_form(text)


def allowed_hosts(host: str, bound: str | None = None, extra=()) -> list[str]:
    """The ``Host`` headers the server answers (the check is always on, whatever the address): the address as given
    and as bound, the names this machine has for it (``_machine_names``), and ``extra`` (``--allow-host``)."""
    names = {host, *(extra or ())}
    if bound is not None:
        names.add(bound)
        try:
            names |= _machine_names(bound)
        except ValueError:
            pass
    try:
        address = ipaddress.ip_address((bound or host).strip("[]"))
        if address.is_loopback and address in (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")):
            names.add("localhost")
    except ValueError:
        pass
    return sorted({_host_form(n) for n in names if n})


def reachable_from_others(address: str) -> bool:
    """Whether a socket bound to ``address`` takes connections from other machines (not a loopback address)."""
    try:
        return not ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return True


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (port 0: any free port); OSError becomes one line naming the address."""

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
          say=print, loading=None, allow_hosts=(), flags=None) -> int:
    """Start the UI and serve until interrupted (InputError / FolderError before anything starts). The server
    answers only requests whose ``Host`` is one of ``allowed_hosts`` (the bound address, this machine's names for
    it, and ``allow_hosts``: ``--allow-host``), so a web page cannot reach it through DNS rebinding. ``flags``: the
    command line's names of the fields (``cli.FLAGS``), for the ``characonsist generate`` command each story shows."""
    import uvicorn

    from .server import create_app

    extra = [check_allow_host(name) for name in allow_hosts or ()]
    sock = bind(host, port)                # a bad address or a port in use: one line before the model is looked at
    try:
        workspace = Workspace(out, model, loading, flags)
        worker = Worker(workspace, model)  # InputError for a model that cannot be found (or bad loading options)
        workspace.open()
    except BaseException:
        sock.close()
        raise
    try:
        worker.start()
        address = sock.getsockname()
        hosts = allowed_hosts(host, address[0], extra)
        app = create_app(worker, hosts)
        shown = f"[{address[0]}]" if ":" in address[0] else address[0]
        how = " ".join(workspace.loading.flags(workspace.flags))
        say(f"characonsist ui: http://{shown}:{address[1]}/  (model {model}{' ' + how if how else ''}, stories in "
            f"{workspace.root}; Ctrl-C stops)")
        if reachable_from_others(address[0]):
            print(f"characonsist: warning: --host {host} makes the UI reachable from other machines; it has no login: "
                  "anyone who reaches it can run the model and read the stories in its folder; it answers requests "
                  f"addressed to {', '.join(hosts)} (--allow-host adds a name)", file=sys.stderr)
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
