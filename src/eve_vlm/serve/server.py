"""Running the HTTP server: in the foreground (`eve serve`) or in a background thread (tests, benches)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..loading import load_for_inference
from .app import ServerSettings, create_app

logger = logging.getLogger(__name__)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class BackgroundServer:
    """A uvicorn server running in a daemon thread (tests and benchmarks)."""

    server: Any
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_background_server(
    app: Any, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0
) -> BackgroundServer:
    """Serve `app` on `host:port` (0 = a free port) in a thread; returns once it accepts connections."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="eve-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start on {host}:{port}")
        time.sleep(0.02)
    return BackgroundServer(server, thread, host, port)


def check_port_free(host: str, port: int) -> None:
    """Fail in one line (OSError) when `host:port` cannot be bound, before the model is loaded."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


GENERIC_FOLDERS = ("final", "latest", "best", "model", "checkpoint", "last")


def default_model_name(model_path: str | Path) -> str:
    """The id `/v1/models` reports: the model folder's name, or its parent's for a generic folder
    (`runs/quickstart/final` -> `quickstart`), since `final` names no model."""
    path = Path(model_path).resolve()
    name = path.name
    generic = name.lower() in GENERIC_FOLDERS or name.lower().startswith(("checkpoint-", "step-", "step_"))
    return path.parent.name if generic and path.parent.name else name


def serve(
    model_path: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServerSettings | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
) -> None:
    """Load the checkpoint and serve it until interrupted (the `eve serve` command)."""
    import uvicorn

    model, processor = load_for_inference(model_path, device, dtype)
    settings = settings or ServerSettings()
    if settings.model_name == "eve":
        settings.model_name = default_model_name(model_path)
    if host not in LOCAL_HOSTS and settings.limits.allow_file_images:
        logger.warning(
            "file: image URLs are enabled on a server reachable from %s: clients can read local files", host
        )
    app = create_app(model, processor, settings)
    logger.info(
        "serving %s on http://%s:%d (%s scheduler, batch size up to %d)",
        settings.model_name,
        host,
        port,
        settings.scheduler,
        settings.max_batch_size,
    )
    uvicorn.run(app, host=host, port=port, log_level="info")
