"""A TCP proxy on 127.0.0.1 in front of a real service (moto's S3 server) that can be told to misbehave:
`pass` forwards, `silent` accepts connections and never answers (and stops answering on open ones), `refuse`
closes its port (connections are refused)."""

from __future__ import annotations

import socket
import threading


class FaultProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port, self.mode = upstream_port, "pass"
        self._listener = self._listen(0)
        self.port = self._listener.getsockname()[1]
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set(self, mode: str) -> None:
        if mode == "refuse" and self._listener is not None:
            self._listener.close()
            self._listener = None
        elif mode != "refuse" and self._listener is None:
            self._listener = self._listen(self.port)
            threading.Thread(target=self._accept, daemon=True).start()
        self.mode = mode

    def stop(self) -> None:
        self._stopped.set()
        if self._listener is not None:
            self._listener.close()

    @staticmethod
    def _listen(port: int) -> socket.socket:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        return listener

    def _accept(self) -> None:
        listener = self._listener
        while listener is not None and not self._stopped.is_set():
            try:
                client, _ = listener.accept()
            except OSError:  # closed: refusing, or stopped
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        if self.mode != "pass":
            return self._hold(client)
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
        self._pump(client, upstream)

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if self.mode != "pass":  # silent from now on: swallow, never answer
                    continue
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.close()
                except OSError:
                    pass

    def _hold(self, client: socket.socket) -> None:
        try:
            while client.recv(65536) and not self._stopped.is_set():
                pass
        except OSError:
            pass
