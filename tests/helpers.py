"""Builders shared by the tests: a converted tiny ReaLS VAE directory, TCP proxies to cut or hold S3 with."""
from __future__ import annotations

import socket
import threading
import time

import torch

TINY_TEACHER = {"name": "tiny-dinov2", "input_size": 28}


def make_vae_dir(path, seed: int = 0, resolution: int = 32) -> str:
    """A converted tiny ReaLS VAE dir: 4 x resolution/4 x resolution/4 latents, heads onto tiny-dinov2's 32-d tokens."""
    from reals.align import AlignNet
    from reals.vae import ReaLSVAE, build_vae

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = ReaLSVAE(build_vae("tiny"), AlignNet(4, 32, hidden_dim=16, num_layers=1),
                       torch.tensor([0.1, 0.0, -0.1, 0.2]), torch.tensor([1.0, 2.0, 0.5, 1.5]))
    vae.save_pretrained(path, {"teacher": TINY_TEACHER, "resolution": resolution, "run": f"test-{seed}"})
    return str(path)




class HoldingProxy:
    """A TCP relay on loopback to ``127.0.0.1:target_port`` that turns into a black hole, then delivers late.

    From the first request containing ``hold_on`` on, every byte any client sends is held: nothing is refused
    and nothing answered. ``release()`` delivers what was held, in order, even for clients that gave up
    meanwhile (their requests still reach the target), and relays normally from then on.
    """

    def __init__(self, target_port: int, hold_on: bytes):
        self.target_port, self.hold_on = target_port, hold_on
        self.held_at: float | None = None
        self.released = False
        self.delivered_late = 0
        self._held: list = []  # (upstream socket, bytes, or None for "the client closed")
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def release(self) -> None:
        with self._lock:
            self.released = True
            for upstream, data in self._held:
                try:
                    if data is None:
                        upstream.shutdown(socket.SHUT_WR)
                    else:
                        upstream.sendall(data)
                        self.delivered_late += 1
                except OSError:
                    pass
            self._held = []

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=30)
            except OSError:
                continue
            upstream.settimeout(None)
            threading.Thread(target=self._send, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._answer, args=(upstream, client), daemon=True).start()

    def _holding(self) -> bool:
        return self.held_at is not None and not self.released

    def _send(self, client, upstream) -> None:
        try:
            while data := client.recv(65536):
                with self._lock:
                    if self.held_at is None and self.hold_on in data:
                        self.held_at = time.time()
                    if self._holding():
                        self._held.append((upstream, data))
                        continue
                upstream.sendall(data)
        except OSError:
            pass
        with self._lock:
            if self._holding():
                self._held.append((upstream, None))
                return
        try:
            upstream.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    @staticmethod
    def _answer(upstream, client) -> None:
        try:
            while data := upstream.recv(65536):
                client.sendall(data)
        except OSError:
            pass
        for s in (client, upstream):
            s.close()


def random_sit(input_size: int, std: float, seed: int = 0):
    """A SiT-T/2 (4 channels, 6 classes) in eval mode with N(0, std) weights, so its outputs are far from zero."""
    from reals.sit import SiT_models

    torch.manual_seed(seed)
    model = SiT_models["SiT-T/2"](input_size=input_size, in_channels=4, num_classes=6).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model

class TCPProxy:
    """A TCP relay on loopback to ``127.0.0.1:target_port`` that a test cuts and restores (an S3 outage).

    ``cut()`` closes the listening socket and every open connection, so clients see refused and reset
    connections; ``restore()`` listens on the same port again. ``cut_on`` cuts the link the first time a
    request containing those bytes arrives, before forwarding it. ``requests`` logs ``(time, request
    line)`` of every request forwarded to the target.
    """

    def __init__(self, target_port: int, cut_on: bytes | None = None):
        self.target_port, self.cut_on = target_port, cut_on
        self.requests: list[tuple[float, str]] = []
        self.cut_at: float | None = None
        self._lock = threading.Lock()
        self._conns: list = []
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.restore()

    def restore(self) -> None:
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", self.port))
        self._server.listen(64)
        threading.Thread(target=self._accept, args=(self._server,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            if self.cut_at is None:
                self.cut_at = time.time()
            conns, self._conns = self._conns, []
        for s in [self._server, *conns]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _accept(self, server) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=30)
            upstream.settimeout(None)
        except OSError:
            client.close()
            return
        with self._lock:
            if self.cut_at is not None and self._server.fileno() == -1:
                client.close()
                upstream.close()
                return
            self._conns += [client, upstream]
        threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
        self._pump(upstream, client, False)

    def _pump(self, src, dst, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_client:
                    if self.cut_on is not None and self.cut_at is None and self.cut_on in data:
                        self.cut()
                        return
                    line = data.split(b"\r\n", 1)[0].decode("latin-1")
                    if line.split(" ", 1)[0] in ("GET", "PUT", "POST", "DELETE", "HEAD"):
                        self.requests.append((time.time(), line))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass


def run_when_served(run_deployment, name: str, serve, timeout: float = 1800, **kwargs):
    """``run_deployment`` once ``serve`` (a `reals serve` process) has registered the deployment."""
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + 600
    while True:
        try:
            return run_deployment(name, timeout=timeout, **kwargs)
        except ObjectNotFound:
            assert serve.poll() is None, "reals serve exited"
            if time.monotonic() > deadline:
                raise
            time.sleep(2)
