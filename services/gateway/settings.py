"""What one gateway serves and how: its backends, its limits and the defaults of a request."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nightcap.credentials import Credentials
from services.common.security import TokenTable
from services.gateway.translate import SamplingDefaults

WEB_DIR = Path(__file__).parent / "web"


@dataclass
class GatewaySettings:
    orchestrator: str
    generation: str
    retrieval: str | None = None
    citations: str = "nightcap"  # or "markdown": also append a "Sources:" list to the answer
    retrieval_default: bool = True  # a chat request that does not say retrieves when a retrieval service is set
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 4 * 1024 * 1024
    # the largest file /v1/documents reads: 3 MiB fits the default body as base64 (4/3 larger)
    max_file_bytes: int = 3 * 1024 * 1024
    max_concurrent_requests: int = 256
    request_timeout: float | None = 600.0  # the deadline of the gRPC call behind one request
    max_n: int = 8  # most choices (``n``) one chat or text completion may ask for; each is its own gRPC call
    ping_interval: float = 10.0  # seconds of silence before a ": ping" comment keeps proxies from closing
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    tokens: TokenTable | None = None
    backend_credentials: Credentials = field(default_factory=Credentials)
    web_dir: Path | None = WEB_DIR
