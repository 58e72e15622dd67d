"""A free TCP port on 127.0.0.1. Its own module so that the launcher, which picks the rendezvous
port before any process starts, never imports torch."""

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
