"""OpenAI-compatible HTTP serving with dynamic batching, and the web demo."""

from .app import ServerSettings, create_app
from .batcher import Batcher, Event, GenRequest, QueueFullError, Ticket
from .inputs import RequestError, ServerLimits, build_request

__all__ = [
    "Batcher",
    "Event",
    "GenRequest",
    "QueueFullError",
    "RequestError",
    "ServerLimits",
    "ServerSettings",
    "Ticket",
    "build_request",
    "create_app",
]
