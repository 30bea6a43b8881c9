"""The nightcap Python client library and the chatctl CLI (which imports nothing from services/)."""

from clients.client import (
    ChatClient,
    ChatEvent,
    ChatFinished,
    ChatStarted,
    Message,
    NightcapError,
    Reply,
    SamplingParams,
    Source,
    StackStatus,
    TextDelta,
    check_health,
)

__all__ = [
    "ChatClient",
    "ChatEvent",
    "ChatFinished",
    "ChatStarted",
    "Message",
    "NightcapError",
    "Reply",
    "SamplingParams",
    "Source",
    "StackStatus",
    "TextDelta",
    "check_health",
]
