"""A TCP server on a local port for the fast tests, one thread per connection, that can be
shut down with every connection it accepted."""

from __future__ import annotations

import contextlib
import socket
import threading


class LocalServer:
    """Accepts on 127.0.0.1 (`port`) and hands each connection to `serve`, in a thread."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = self.listener.accept()
                self.sockets.append(connection)
                self.connections += 1
                threading.Thread(target=self.serve, args=(connection,), daemon=True).start()

    def serve(self, connection: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        # Shut down first: a bare close() of a socket another thread is reading sends no FIN,
        # and a client waiting on it would never learn that the peer is gone.
        for each in self.sockets:
            with contextlib.suppress(OSError):
                each.shutdown(socket.SHUT_RDWR)
            each.close()
