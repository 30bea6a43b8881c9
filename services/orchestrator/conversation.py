"""One chat turn, prepared: find the passages the conversation needs, render the prompt in the model's format,
trim the history (oldest first) so that prompt + max_new_tokens fits the model's context window, and tokenize
the result once, for Generate. Counting and tokenizing use the served model's tokenizer, held here (the
generation service sends it with ModelInfo): a turn asks the generation service for nothing but its answer.

Works on plain records; the Chat servicer converts protobuf at its edge."""

from __future__ import annotations

import enum
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
from loguru import logger

from nightcap.records import BUILDING, DEFAULT_K, MAX_K, Passage, from_message
from nightcap.v1 import retrieval_pb2
from services.common.errors import InvalidArgument, ServiceError
from services.orchestrator.backends import GenerationBackend, RetrievalBackend
from services.orchestrator.grounding import (
    Grounded,
    Grounding,
    asked_about,
    context_of,
    ground,
    passage_key,
    weighted_scores,
)
from services.orchestrator.prompts import PromptFormat, PromptPieces, Turn, prompt_format_for, with_tools_described
from services.orchestrator.tokenizer import NO_TOKENIZER, ServedTokenizer
from services.orchestrator.tools import ToolUse, parsed_arguments


class QueryMode(str, enum.Enum):
    """How the retrieval query is built from the conversation."""

    RECENT = "recent"  # a weighted mix of the recent user turns, the newest weighing most
    CONDENSE = "condense"  # the generation model rewrites the follow-up as a standalone question
    LAST = "last"  # the last message alone (OpenChatKit's behaviour)


# Weights of the newest user turns in the `recent` mix, newest first. Chosen on the eval's dev part (the
# held-out part was not looked at): the follow-up itself must still lead, or "When was he born?" after a
# question about a film director finds the film.
RECENT_WEIGHTS = (1.0, 0.6, 0.3)
CANDIDATES_PER_QUERY = 20  # each turn of the mix contributes its top 20; fewer let good passages fall off
CONDENSE_MAX_NEW_TOKENS = 40
CONDENSE_INSTRUCTION = (
    "Rewrite the last question of this conversation as a question that can be understood without the "
    "conversation: replace words like it, there, he or she with the name they refer to. Reply with the "
    "question only."
)
TOKEN_COUNT_CACHE = 8192  # rendered turns whose token count is remembered (a few long conversations' worth)


@dataclass(frozen=True)
class ModelInfo:
    """What the orchestrator needs to know about the served model; cached until the served model changes."""

    name: str
    version: str
    context_length: int
    prompt_format: str
    chat_template: str = ""
    bos_token: str = ""
    eos_token: str = ""
    stop: tuple[str, ...] = ()
    tokenizer_digest: str = ""  # the tokenizer's identity (its JSON is not kept here: ServedTokenizer holds it)
    split_special_tokens: bool = False

    @property
    def label(self) -> str:
        """``name:version`` (or ``name``), as the generation service reports on each stream."""
        return f"{self.name}:{self.version}" if self.version else self.name

    @property
    def prompt_shape(self) -> tuple:
        """What a prepared prompt depends on: two models that agree on it get the same prompt and token ids."""
        return (
            self.tokenizer_digest,
            self.split_special_tokens,
            self.context_length,
            self.prompt_format,
            self.chat_template,
            self.bos_token,
            self.eos_token,
            self.stop,
        )


@dataclass(frozen=True)
class TurnRequest:
    message: str
    history: list[Turn] = field(default_factory=list)  # earlier turns, oldest first; user turns carry context
    retrieval: bool = False
    k: int | None = None  # passages to give; None: DEFAULT_K
    max_new_tokens: int | None = None  # None: the orchestrator's default
    stop: tuple[str, ...] = ()
    request_id: str = ""
    tool_use: ToolUse | None = None  # the functions the model may call

    @property
    def answers_tool_results(self) -> bool:
        """No new user message: the turn answers the tool results that end the history."""
        return not self.message and bool(self.history) and self.history[-1].role == "tool"


@dataclass
class PreparedTurn:
    prompt: str
    prompt_token_ids: list[int]  # the prompt, in the served model's tokens: what Generate receives
    max_new_tokens: int
    stop: list[str]  # the request's stop sequences plus those the model and the prompt format need
    sources: list[Passage]  # passages given with this turn (not those the kept history already holds)
    retrieved_ids: list[str]  # every passage the search returned, best first
    retrieval_query: str
    history_messages_dropped: int
    model: str
    notice: str
    query_ms: float = 0.0  # time spent building the query (the rewrite's generation call, for condense)
    history_passages: int = 0  # passages given in earlier turns that the prompt still holds
    reply: str = ""  # the answer, when it is given without the model (no passage scored above --min-score)
    index_build: retrieval_pb2.IndexBuild | None = None  # the retrieval index is still being built
    numbered: bool = False  # the prompt numbers the sources, so the answer's [n] markers cite them
    served: ModelInfo | None = None  # the model the prompt was prepared for
    tool_use: ToolUse | None = None
    grammar: str = ""  # the Lark grammar the answer must belong to (tool calls); "" when free

    @property
    def parses_calls(self) -> bool:
        return self.tool_use is not None and self.tool_use.calls_allowed

    @property
    def context_used(self) -> bool:
        return bool(self.sources) or self.history_passages > 0


@dataclass(frozen=True)
class Retrieved:
    passages: list[Passage]  # best first
    notice: str = ""  # why there are none
    build: retrieval_pb2.IndexBuild | None = None  # the index is still being built
    searched: bool = False  # the search ran (it may have found nothing); False: retrieval is off or failed


@dataclass
class FittedPrompt:
    prompt: str
    token_ids: list[int]
    history_messages_dropped: int
    passages: list[Passage]
    history_passages: int  # passages that earlier turns in the prompt carry


class TokenCounter:
    """Token counts of prompt pieces, counted once per distinct text and tokenizer (``model``: its digest): a
    conversation's earlier turns are not counted again in its next turns, nor while its history is trimmed."""

    def __init__(self, capacity: int = TOKEN_COUNT_CACHE) -> None:
        self._known: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()
        self.calls = 0  # counts made (not remembered), for tests and logs

    def count(self, model: str, text: str, count: Callable[[str], int]) -> int:
        if not text:
            return 0
        key = (model, text)
        with self._lock:
            if key in self._known:
                self._known.move_to_end(key)
                return self._known[key]
        tokens = count(text)
        with self._lock:
            self.calls += 1
            self._known[key] = tokens
            while len(self._known) > self._capacity:
                self._known.popitem(last=False)
        return tokens

    def forget_model(self, model: str) -> None:
        with self._lock:
            for key in [key for key in self._known if key[0] == model]:
                del self._known[key]


def fit_prompt(
    prompt_format: PromptFormat,
    history: list[Turn],
    message: Turn,
    ranked: list[Passage],
    k: int,
    max_new_tokens: int,
    context_length: int,
    count: Callable[[str], int],
    tokenize: Callable[[str], list[int]],
    repeat: bool = False,
) -> FittedPrompt:
    """Drops history oldest first (a leading system message stays), then the least relevant new passages,
    until the prompt leaves room for ``max_new_tokens``; InvalidArgument when even the message alone does
    not fit. OpenChatKit never trimmed and overflowed the window.

    The new turn gets the first ``k`` of ``ranked`` that the kept history does not already hold (``repeat``: the
    first ``k``, held or not: a passage an earlier turn gave is shown again beside the question). Each piece
    of the prompt (a turn, with its passages) is counted once through ``count`` and the pieces summed; only
    the chosen prompt is tokenized whole, and if the sum was short of it (tokens merging across a piece
    boundary) trimming goes on from the exact count."""
    budget = context_length - max_new_tokens
    system = history[:1] if history and history[0].role == "system" else []
    rest = history[len(system) :]
    dropped_passages = 0
    while True:
        given = {passage_key(p) for turn in rest for p in turn.context}
        fresh = [p for p in ranked if repeat or passage_key(context_of(p)) not in given][:k]
        passages = fresh[: len(fresh) - dropped_passages] if dropped_passages else fresh
        turns = [*system, *rest, replace(message, context=tuple(context_of(p) for p in passages))]
        pieces = prompt_format.pieces(turns)
        estimate = _sum_of_pieces(pieces, count) if pieces is not None else None
        token_ids: list[int] | None = None
        if estimate is None or estimate <= budget:
            prompt = pieces.text if pieces is not None else prompt_format.render(turns)  # the same text
            token_ids = tokenize(prompt)
            if len(token_ids) <= budget:
                dropped = len(history) - len(system) - len(rest)
                return FittedPrompt(prompt, token_ids, dropped, passages, sum(len(t.context) for t in rest))
        tokens = len(token_ids) if token_ids is not None else estimate
        if rest:
            rest = rest[1:]
            while rest and rest[0].role != "user":  # a conversation restarts at a user turn
                rest = rest[1:]
        elif passages:
            dropped_passages += 1
        else:
            raise InvalidArgument(
                f"the message needs a {tokens}-token prompt; with max_new_tokens={max_new_tokens} that exceeds"
                f" the model's context window of {context_length} tokens: shorten the message or lower"
                " max_new_tokens"
            )


def _sum_of_pieces(pieces: PromptPieces, count: Callable[[str], int]) -> int:
    return count(pieces.head) + sum(count(piece) for piece in pieces.turns) + count(pieces.tail)


class ChatOrchestrator:
    def __init__(
        self,
        generation: GenerationBackend,
        retrieval: RetrievalBackend | None,
        default_max_new_tokens: int = 256,
        backend_timeout: float = 10.0,
        query_mode: QueryMode = QueryMode.RECENT,
        grounding: Grounding | None = None,
    ) -> None:
        self.generation = generation
        self.retrieval = retrieval
        self.default_max_new_tokens = default_max_new_tokens
        self.backend_timeout = backend_timeout
        self.query_mode = QueryMode(query_mode)
        self.grounding = grounding or Grounding()
        self.tokens = TokenCounter()
        self._model: tuple[ModelInfo, ServedTokenizer] | None = None
        self._tokenizer: ServedTokenizer | None = None  # kept when the model info is asked again
        self._model_lock = threading.Lock()
        self.model_info_calls = 0
        self.tokenizer_builds = 0

    # -- the served model and its tokenizer, cached ----------------------------------------------------

    def model_info(self) -> ModelInfo:
        """The served model's info, asked of the generation service only when not cached."""
        return self.served()[0]

    def served(self) -> tuple[ModelInfo, ServedTokenizer]:
        """The served model's info and tokenizer; the tokenizer is built once per digest: asked again (another
        model serves), the generation service sends it only when the digest differs from the one held."""
        with self._model_lock:
            if self._model is not None:
                return self._model
            held = self._tokenizer
        response = self.generation.model_info(self.backend_timeout, held.digest if held else NO_TOKENIZER)
        info = from_message(ModelInfo, response)
        tokenizer = held
        if held is None or held.digest != info.tokenizer_digest:
            tokenizer = ServedTokenizer(response.tokenizer_json, info.tokenizer_digest, info.split_special_tokens)
        with self._model_lock:
            self.model_info_calls += 1
            replaced, self._tokenizer = self._tokenizer, tokenizer
            if tokenizer is not held:
                self.tokenizer_builds += 1
            self._model = (info, tokenizer)
        if replaced is not None and replaced.digest != tokenizer.digest:
            logger.info("the served model {} tokenizes differently: tokenizer {} built", info.label, tokenizer.digest)
            self.tokens.forget_model(replaced.digest)
        return info, tokenizer

    def served_by(self, model: str) -> bool:
        """A Generate stream said which model served it: a different one than cached means a new model was
        switched in, so its info (context length, template, tokenizer) is asked for again next time. True then."""
        with self._model_lock:
            cached = self._model[0] if self._model is not None else None
            if not model or cached is None or cached.label == model:
                return False
            self._model = None
        logger.info("the generation service now serves {} (was {}): model info refreshed", model, cached.label)
        return True

    def forget_model(self) -> None:
        with self._model_lock:
            self._model = None

    def prepared_for_served(self, turn: PreparedTurn) -> bool:
        """Whether ``turn``'s prompt and token ids are what the model served now would be given (asks for its
        info when not cached): False after a switch to a model with another tokenizer or prompt format."""
        return turn.served is None or turn.served.prompt_shape == self.model_info().prompt_shape

    # -- one turn ------------------------------------------------------------------------------------

    def prepare(self, request: TurnRequest) -> PreparedTurn:
        """The turn's query, its retrieval, the passages it is grounded on, and the prompt fitted around them."""
        validate_turn(request)
        k = request.k if request.k is not None else DEFAULT_K
        if request.retrieval and not 1 <= k <= MAX_K:
            raise InvalidArgument(f"retrieval_k must be between 1 and {MAX_K}, got {k}")
        info, tokenizer = self.served()
        max_new_tokens = request.max_new_tokens if request.max_new_tokens is not None else self.default_max_new_tokens
        if max_new_tokens < 1:
            raise InvalidArgument(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if max_new_tokens >= info.context_length:
            raise InvalidArgument(
                f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context window of"
                f" {info.context_length} tokens: ask for fewer"
            )
        grounding = self.grounding
        prompt_format = prompt_format_for(
            info.prompt_format, info.chat_template, info.bos_token, info.eos_token, grounding.style, request.tool_use
        )
        count = lambda text: self.tokens.count(tokenizer.digest, text, tokenizer.count)  # noqa: E731
        query, query_ms, ranked, notice, build, grounded = "", 0.0, [], "", None, Grounded([])
        history, message = request.history, Turn("user", request.message)
        if request.answers_tool_results:
            # the passages went with the user turn that asked, and the client sends them back with it
            history, message = history[:-1], history[-1]
        if request.tool_use is not None and not prompt_format.describes_tools:
            history = with_tools_described(history, request.tool_use)
        if request.retrieval and not request.answers_tool_results:
            started = time.perf_counter()
            query, searches = self._query(request, prompt_format, tokenizer)
            query_ms = (time.perf_counter() - started) * 1000
            held = sum(len(turn.context) for turn in request.history)
            title = asked_about(request.message) if grounding.titles else ""
            found = self._retrieve(searches, k if grounding.repeat_earlier else min(k + held, MAX_K), title)
            ranked, build = found.passages, found.build
            grounded = ground(
                grounding,
                request.message,
                request.history,
                ranked,
                k,
                found.searched,
                count,
                self._sentence_scores(searches),
                _building(build),
            )
            notice = grounded.notice or found.notice
        fitted = fit_prompt(
            prompt_format,
            history,
            message,
            grounded.passages,
            k,
            max_new_tokens,
            info.context_length,
            count,
            tokenizer.encode,
            repeat=grounding.repeat_earlier or grounding.cut,
        )
        stop = list(request.stop)
        stop.extend(s for s in [*info.stop, *prompt_format.stop] if s not in stop)
        if grounded.passages and not fitted.passages and not fitted.history_passages:
            notice = "the retrieved passages did not fit in the context window; answered without context"
        if not notice:
            notice = _building(build)
        return PreparedTurn(
            prompt=fitted.prompt,
            prompt_token_ids=fitted.token_ids,
            max_new_tokens=max_new_tokens,
            stop=stop,
            sources=fitted.passages,
            retrieved_ids=[p.id for p in ranked],
            retrieval_query=query,
            history_messages_dropped=fitted.history_messages_dropped,
            model=info.label,
            notice=notice,
            query_ms=query_ms,
            history_passages=fitted.history_passages,
            # a required call is answered by the model whatever the passages hold
            reply="" if request.tool_use is not None and request.tool_use.forces_call else grounded.reply,
            index_build=build,
            numbered=grounding.numbered,
            served=info,
            tool_use=request.tool_use,
            grammar=request.tool_use.grammar() if request.tool_use is not None else "",
        )

    def _sentence_scores(self, searches: list[tuple[str, float]]) -> Callable[[list[str]], np.ndarray | None]:
        """Scores sentences as the search mix scores passages, by the retrieval service's embedder; None when
        the embedder cannot be reached (the passages are then given whole)."""

        def score(sentences: list[str]) -> np.ndarray | None:
            try:
                vectors = self.retrieval.embed([query for query, _ in searches] + sentences, self.backend_timeout)
            except InvalidArgument:
                raise
            except ServiceError as error:
                logger.warning("sentence scoring failed, giving whole passages: {}", error)
                return None
            queries, found = vectors[: len(searches)], vectors[len(searches) :]
            return weighted_scores(queries, [weight for _, weight in searches], found)

        return score

    # -- the retrieval query -------------------------------------------------------------------------

    def _query(
        self, request: TurnRequest, prompt_format: PromptFormat, tokenizer: ServedTokenizer
    ) -> tuple[str, list[tuple[str, float]]]:
        """(the query as shown to the user, the weighted searches that make it)."""
        earlier = [turn.content for turn in request.history if turn.role == "user"]
        if self.query_mode is QueryMode.LAST or not earlier:
            return request.message, [(request.message, 1.0)]
        if self.query_mode is QueryMode.CONDENSE:
            question = self._condense(request, prompt_format, tokenizer)
            return question, [(question, 1.0)]
        turns = [request.message, *reversed(earlier)][: len(RECENT_WEIGHTS)]
        searches = list(zip(turns, RECENT_WEIGHTS, strict=False))
        return " + ".join(f"{weight:g} × {text}" for text, weight in searches), searches

    def _condense(self, request: TurnRequest, prompt_format: PromptFormat, tokenizer: ServedTokenizer) -> str:
        """The follow-up rewritten by the generation model as a standalone question (the "condense question"
        step of common RAG chains); the message itself when the rewrite fails or comes back empty."""
        lines = []
        for turn in request.history[-4:]:
            if turn.role in ("user", "assistant"):
                lines.append(f"{turn.role.capitalize()}: {turn.content.strip()}")
        lines.append(f"User: {request.message.strip()}")
        prompt = prompt_format.render(
            [Turn("user", f"{CONDENSE_INSTRUCTION}\n\n" + "\n".join(lines) + "\n\nStandalone question:")]
        )
        try:
            text = self.generation.complete(
                tokenizer.encode(prompt),
                CONDENSE_MAX_NEW_TOKENS,
                ["\n", *prompt_format.stop],
                self.backend_timeout,
                request.request_id,
            )
        except InvalidArgument:
            raise
        except ServiceError as error:
            logger.warning("the question rewrite failed, searching for the message alone: {}", error)
            return request.message
        question = text.strip().strip('"').strip()
        return question or request.message

    def _retrieve(self, searches: list[tuple[str, float]], k: int, title: str = "") -> Retrieved:
        """Passages for the weighted searches, best first, or none and a notice why: a chat answers even when
        retrieval is down. Also the index build, when the index is still being filled. ``title``: a document
        title the new message asks about, looked up by its search (the first); what that finds stays first.

        Several searches are fused by weighted score: sum of weight x cosine similarity. As similarity is
        linear in the query vector, that ranks passages as one search for the weighted sum of the query
        vectors would; a passage missing from one search's candidates is scored there as its last candidate."""
        if self.retrieval is None:
            return Retrieved([], "retrieval is not configured on this orchestrator; answered without context")
        depth = k if len(searches) == 1 else max(k, CANDIDATES_PER_QUERY)
        try:
            found = [
                self.retrieval.search(
                    query, min(depth, MAX_K), self.backend_timeout, title if i == 0 else "", len(searches) > 1
                )
                for i, (query, _) in enumerate(searches)
            ]
        except InvalidArgument:
            raise
        except ServiceError as error:
            logger.warning("retrieval failed, answering without context: {}", error)
            return Retrieved([], f"retrieval unavailable ({error}); answered without context")
        build = found[-1].build
        results = [search.passages for search in found]
        if len(results) == 1:
            ranked = results[0]
        else:
            passages = {p.id: p for found in reversed(results) for p in found}  # the first search's copy wins
            scores = dict.fromkeys(passages, 0.0)
            for (_, weight), found in zip(searches, results, strict=True):
                by_id = {p.id: p.score for p in found}
                floor = found[-1].score if found else 0.0
                for passage_id in scores:
                    scores[passage_id] += weight * by_id.get(passage_id, floor)
            # the title lookup's passages first, in the order its search gave them; the rest by fused score
            titled = [p.id for p in results[0] if p.titled]
            rest = sorted((i for i in scores if i not in titled), key=scores.__getitem__, reverse=True)
            order = [*titled, *rest][:k]
            ranked = [replace(passages[i], score=scores[i] / sum(w for _, w in searches)) for i in order]
        if not ranked:
            return Retrieved([], "retrieval found no passages; answered without context", build, searched=True)
        return Retrieved(ranked, "", build, searched=True)


def validate_turn(request: TurnRequest) -> None:
    if not request.message.strip() and not request.answers_tool_results:
        raise InvalidArgument("the message is empty: type something to ask")
    calls = set()
    for index, turn in enumerate(request.history):
        if turn.role not in ("system", "user", "assistant", "tool"):
            raise InvalidArgument(
                f"history[{index}] has no role: use ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL"
            )
        if turn.tool_calls and turn.role != "assistant":
            raise InvalidArgument(f"history[{index}].tool_calls: only an assistant message makes tool calls")
        for number, call in enumerate(turn.tool_calls):
            if not call.id or not call.name:
                raise InvalidArgument(f"history[{index}].tool_calls[{number}] needs an id and a name")
            parsed_arguments(call.arguments, f"history[{index}].tool_calls[{number}].arguments")
            calls.add(call.id)
        if turn.role == "tool":
            if turn.tool_call_id not in calls:
                raise InvalidArgument(
                    f"history[{index}].tool_call_id {turn.tool_call_id!r} answers no earlier assistant tool call"
                )
        elif not turn.content.strip() and not turn.tool_calls:
            raise InvalidArgument(f"history[{index}] ({turn.role}) is empty")


def _building(build: retrieval_pb2.IndexBuild | None) -> str:
    """How much of the index a search sees while its build runs; "" when none runs."""
    if build is None or build.state != BUILDING:
        return ""
    done, total = build.documents_done, build.documents_total
    return f"the index is still being built: {done:,} of {total:,} documents are searched so far"
