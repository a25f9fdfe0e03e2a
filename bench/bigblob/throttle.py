"""A loopback TCP proxy that caps each connection's download rate.

Stands in for a registry behind object storage, where every TCP stream is
capped (tens to a few hundred MB/s) however many streams run. Bytes from
the upstream to the client are paced per connection (``rate`` bytes/s,
measured from the connection's first byte); the other direction passes
unpaced. One thread per direction per connection.
"""

from __future__ import annotations

import socket
import threading
import time


class Throttle:
    def __init__(self, upstream: str, rate: float, bind: str = "127.0.0.1") -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.rate = rate
        self.connections = 0
        self.bind = bind  # the Hub's CDN is another host: 127.0.0.2 stands in for it
        self.listener = socket.create_server((bind, 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def host(self) -> str:
        return f"{self.bind}:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            up = socket.create_connection(self.upstream)
            threading.Thread(target=self._pipe, args=(client, up, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, client, self.rate),
                             daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, rate: float | None) -> None:
        sent = 0
        t0 = 0.0
        try:
            while True:
                data = src.recv(256 << 10)
                if not data:
                    break
                if rate and not sent:
                    t0 = time.monotonic()
                dst.sendall(data)
                sent += len(data)
                if rate:
                    ahead = sent / rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()
