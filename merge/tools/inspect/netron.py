"""``inspect --netron``: serve a model with Netron on localhost (the optional ``[view]`` extra)."""

from __future__ import annotations

from pathlib import Path

from merge.errors import MergeError


def import_netron():
    try:
        import netron
    except ImportError as exc:
        raise MergeError("--netron needs the netron package, which is not installed: pip install netron") from exc
    return netron


def serve_netron(path: Path, port: int) -> tuple[str, int]:
    """Serve ``path`` with Netron on localhost:``port`` (no browser is opened); returns the address."""
    netron = import_netron()
    try:
        address = netron.start(str(path), address=("localhost", port), browse=False)
    except OSError as exc:
        raise MergeError(f"--port {port}: Netron cannot serve on localhost:{port} ({exc.strerror or exc}); "
                         "choose another --port") from None
    return tuple(address) if address else ("localhost", port)


def wait_for_netron() -> None:
    """Block until Ctrl-C; Netron's own ``wait`` stops its servers then."""
    import_netron().wait()
