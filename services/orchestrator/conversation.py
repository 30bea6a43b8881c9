"""One chat turn, prepared: retrieve context, render the prompt in the model's format, and trim the
history (oldest first) so that prompt + max_new_tokens fits the model's context window."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from loguru import logger

from nightcap.v1 import chat_pb2, common_pb2, retrieval_pb2
from services.common.errors import InvalidArgument, ServiceError
from services.orchestrator.backends import GenerationBackend, RetrievalBackend
from services.orchestrator.prompts import ContextPassage, PromptFormat, Turn, prompt_format_for

MAX_K = 100  # the retrieval service's documented maximum
DEFAULT_K = 3
_ROLE_NAMES = {chat_pb2.ROLE_SYSTEM: "system", chat_pb2.ROLE_USER: "user", chat_pb2.ROLE_ASSISTANT: "assistant"}


@dataclass
class PreparedTurn:
    prompt: str
    prompt_tokens: int
    params: common_pb2.SamplingParams  # what goes to Generate: max_new_tokens set, stop sequences merged
    sources: list[retrieval_pb2.Passage]
    history_messages_dropped: int
    model: str
    notice: str

    @property
    def context_used(self) -> bool:
        return bool(self.sources)


@dataclass
class FittedPrompt:
    prompt: str
    tokens: int
    history_messages_dropped: int
    passages_kept: int


def fit_prompt(
    prompt_format: PromptFormat,
    history: list[Turn],
    message: Turn,
    context: list[ContextPassage],
    max_new_tokens: int,
    context_length: int,
    count_tokens: Callable[[str], int],
) -> FittedPrompt:
    """Drops history oldest first (a leading system message stays), then the least relevant passages,
    until the prompt leaves room for ``max_new_tokens``; InvalidArgument when even the message alone
    does not fit. OpenChatKit never trimmed and overflowed the window."""
    budget = context_length - max_new_tokens
    system = history[:1] if history and history[0].role == "system" else []
    rest = history[len(system) :]
    passages = list(context)
    while True:
        prompt = prompt_format.render([*system, *rest, message], passages)
        tokens = count_tokens(prompt)
        if tokens <= budget:
            return FittedPrompt(prompt, tokens, len(history) - len(system) - len(rest), len(passages))
        if rest:
            rest = rest[1:]
            while rest and rest[0].role != "user":  # a conversation restarts at a user turn
                rest = rest[1:]
        elif passages:
            passages.pop()
        else:
            raise InvalidArgument(
                f"the message needs a {tokens}-token prompt; with max_new_tokens={max_new_tokens} that exceeds"
                f" the model's context window of {context_length} tokens: shorten the message or lower"
                " max_new_tokens"
            )


class ChatOrchestrator:
    def __init__(
        self,
        generation: GenerationBackend,
        retrieval: RetrievalBackend | None,
        default_max_new_tokens: int = 256,
        backend_timeout: float = 10.0,
    ) -> None:
        self.generation = generation
        self.retrieval = retrieval
        self.default_max_new_tokens = default_max_new_tokens
        self.backend_timeout = backend_timeout

    def prepare(self, request: chat_pb2.ChatRequest) -> PreparedTurn:
        message, history = validate_messages(request)
        k = request.retrieval_k if request.HasField("retrieval_k") else DEFAULT_K
        if request.retrieval and not 1 <= k <= MAX_K:
            raise InvalidArgument(f"retrieval_k must be between 1 and {MAX_K}, got {k}")
        info = self.generation.model_info(self.backend_timeout)
        params = common_pb2.SamplingParams()
        params.CopyFrom(request.params)
        max_new_tokens = params.max_new_tokens if params.HasField("max_new_tokens") else self.default_max_new_tokens
        if max_new_tokens < 1:
            raise InvalidArgument(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if max_new_tokens >= info.context_length:
            raise InvalidArgument(
                f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context window of"
                f" {info.context_length} tokens: ask for fewer"
            )
        prompt_format = prompt_format_for(info.prompt_format, info.chat_template, info.bos_token, info.eos_token)
        passages, notice = self._retrieve(request.message, k) if request.retrieval else ([], "")
        fitted = fit_prompt(
            prompt_format,
            history,
            message,
            [ContextPassage(p.title, p.text, p.source) for p in passages],
            max_new_tokens,
            info.context_length,
            lambda text: self.generation.count_tokens(text, self.backend_timeout),
        )
        params.max_new_tokens = max_new_tokens
        params.stop.extend(s for s in [*info.stop, *prompt_format.stop] if s not in params.stop)
        if request.retrieval and passages and not fitted.passages_kept:
            notice = "the retrieved passages did not fit in the context window; answered without context"
        return PreparedTurn(
            prompt=fitted.prompt,
            prompt_tokens=fitted.tokens,
            params=params,
            sources=passages[: fitted.passages_kept],
            history_messages_dropped=fitted.history_messages_dropped,
            model=f"{info.name}:{info.version}" if info.version else info.name,
            notice=notice,
        )

    def _retrieve(self, query: str, k: int) -> tuple[list[retrieval_pb2.Passage], str]:
        """Passages for the query, or none and a notice why: a chat answers even when retrieval is down."""
        if self.retrieval is None:
            return [], "retrieval is not configured on this orchestrator; answered without context"
        try:
            passages = self.retrieval.search(query, k, self.backend_timeout)
        except InvalidArgument:
            raise
        except ServiceError as error:
            logger.warning("retrieval failed, answering without context: {}", error)
            return [], f"retrieval unavailable ({error}); answered without context"
        if not passages:
            return [], "retrieval found no passages; answered without context"
        return passages, ""


def validate_messages(request: chat_pb2.ChatRequest) -> tuple[Turn, list[Turn]]:
    if not request.message.strip():
        raise InvalidArgument("the message is empty: type something to ask")
    history = []
    for index, entry in enumerate(request.history):
        if entry.role not in _ROLE_NAMES:
            raise InvalidArgument(f"history[{index}] has no role: use ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT")
        if not entry.content.strip():
            raise InvalidArgument(f"history[{index}] ({_ROLE_NAMES[entry.role]}) is empty")
        history.append(Turn(_ROLE_NAMES[entry.role], entry.content))
    return Turn("user", request.message), history
