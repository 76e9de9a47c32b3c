"""OpenAI-compatible HTTP serving with continuous (or dynamic) batching, metrics, and the web demo."""

from .app import ServerSettings, create_app
from .batcher import Batcher, Event, GenRequest, QueueFullError, Ticket
from .inputs import RequestError, ServerLimits, build_request
from .scheduler import ContinuousScheduler

__all__ = [
    "Batcher",
    "ContinuousScheduler",
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
