"""The servers' listening port, checked before the model loads: a port already taken is one line naming it,
not a traceback minutes later."""

from __future__ import annotations

import argparse
import errno
import socket

from riffusion.errors import InputError


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0 (any free one) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {value}")
    return value


def listen_error(host: str, port: int, error: OSError) -> InputError:
    """The one line that says why (host, port) cannot be listened on."""
    if error.errno == errno.EADDRINUSE:
        return InputError(f"port {port} on {host} is already in use (another server?); stop it or choose another "
                          "with --port")
    if isinstance(error, socket.gaierror):
        return InputError(f"--host {host}: not an address to listen on ({error.strerror})")
    return InputError(f"cannot listen on {host} port {port}: {error.strerror or error}")


def check_free(host: str, port: int) -> None:
    """InputError unless (host, port) can be listened on now (bound and released again, as a server that
    binds later with SO_REUSEADDR sees it)."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
            probe.listen()
    except OSError as error:
        raise listen_error(host, port, error) from None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (for tests and the cluster scripts)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
