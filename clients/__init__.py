"""The nightcap Python client library and the chatctl CLI (which imports nothing from services/)."""

from clients.client import (
    ChatClient,
    ChatEvent,
    ChatFinished,
    ChatStarted,
    IndexBuild,
    IndexClient,
    Message,
    NightcapError,
    Reply,
    SamplingParams,
    Source,
    StackStatus,
    TextDelta,
    Tool,
    ToolCall,
    ToolCallDelta,
    check_health,
)
from clients.documents import Document, DocumentReadError, read_documents
from nightcap.credentials import Credentials

__all__ = [
    "ChatClient",
    "ChatEvent",
    "ChatFinished",
    "ChatStarted",
    "Credentials",
    "Document",
    "DocumentReadError",
    "IndexBuild",
    "IndexClient",
    "Message",
    "NightcapError",
    "Reply",
    "SamplingParams",
    "Source",
    "StackStatus",
    "TextDelta",
    "Tool",
    "ToolCall",
    "ToolCallDelta",
    "check_health",
    "read_documents",
]
