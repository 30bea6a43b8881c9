"""What one gateway serves and how: its backends, its limits and the defaults of a request."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nightcap.credentials import Credentials
from services.common.security import TokenTable
from services.gateway.translate import SamplingDefaults

WEB_DIR = Path(__file__).parent / "web"
MAX_FILE_BYTES = 12 * 1024 * 1024  # --max-file-bytes
UPLOAD_ENVELOPE_BYTES = 64 * 1024  # a file's name and the JSON around its base64 content


@dataclass
class GatewaySettings:
    orchestrator: str
    generation: str
    retrieval: str | None = None
    citations: str = "nightcap"  # or "markdown": also append a "Sources:" list to the answer
    retrieval_default: bool = True  # a chat request that does not say retrieves when a retrieval service is set
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 4 * 1024 * 1024
    # the largest file /v1/documents reads; a PDF of a few hundred pages is this size. Its text is sent on to the
    # retrieval service, which takes up to 16 MiB a request
    max_file_bytes: int = MAX_FILE_BYTES
    max_concurrent_requests: int = 256
    request_timeout: float | None = 600.0  # the deadline of the gRPC call behind one request
    max_n: int = 8  # most choices (``n``) one chat or text completion may ask for; each is its own gRPC call
    ping_interval: float = 10.0  # seconds of silence before a ": ping" comment keeps proxies from closing
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    tokens: TokenTable | None = None
    backend_credentials: Credentials = field(default_factory=Credentials)
    web_dir: Path | None = WEB_DIR

    @property
    def upload_body_bytes(self) -> int:
        """The body a POST to /v1/documents may have: one file of ``max_file_bytes`` as base64 (4/3 its size)
        and its JSON around it; other requests keep ``max_body_bytes``."""
        return max(self.max_body_bytes, -(-self.max_file_bytes // 3) * 4 + UPLOAD_ENVELOPE_BYTES)
