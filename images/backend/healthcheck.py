"""Container healthcheck: the app answers /health with 200.

A bare socket, not urllib: the engine runs this every few seconds in every backend, and
urllib's imports (ssl, email) cost more CPU than the check itself."""

import socket
import sys

try:
    with socket.create_connection(("127.0.0.1", 8000), timeout=3) as connection:
        connection.settimeout(3)
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: healthcheck\r\nConnection: close\r\n\r\n")
        status_line = connection.makefile("rb").readline(256)
except OSError:
    sys.exit(1)
sys.exit(0 if status_line.split()[1:2] == [b"200"] else 1)
