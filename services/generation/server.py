"""The Generation gRPC servicer: validate, translate to engine calls, stream back. Nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from nightcap.v1 import admin_pb2, admin_pb2_grpc, common_pb2, generation_pb2, generation_pb2_grpc
from services.common.errors import DeadlineExceeded, InvalidArgument, Unavailable
from services.common.security import ServerSecurity
from services.common.server import AsyncRunningServer, ServerLimits, ServiceBinding, start_aio_server
from services.generation.engine import params
from services.generation.engine.constraints import ConstraintCompiler
from services.generation.engine.engine import ContinuousBatchingEngine
from services.generation.engine.request import Finished, Request, RequestStatus, TokenChunk
from services.generation.engine.sampling import TokenLogprob
from services.generation.host import ModelHost, ServedModel
from services.generation.loading import LoadedModel

_FINISH_REASONS = {
    RequestStatus.FINISHED_LENGTH: common_pb2.FINISH_REASON_LENGTH,
    RequestStatus.FINISHED_EOS: common_pb2.FINISH_REASON_EOS,
    RequestStatus.FINISHED_STOP_SEQUENCE: common_pb2.FINISH_REASON_STOP_SEQUENCE,
    RequestStatus.FINISHED_CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
}


@dataclass(frozen=True)
class SerializedTokenizer:
    """A model's tokenizer as ModelInfo sends it: ``tokenizers`` JSON and its sha256."""

    json: bytes = b""
    digest: str = ""


def serialize_tokenizer(tokenizer: PreTrainedTokenizerBase) -> SerializedTokenizer:
    """The fast tokenizer's ``tokenizers`` JSON, truncation and padding off (as Tokenize encodes: transformers
    turns off what the file enables unless a call asks for it), so that one tokenizer always has one digest;
    empty for a tokenizer without a ``tokenizers`` backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return SerializedTokenizer()
    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    data = copy.to_str().encode("utf-8")
    return SerializedTokenizer(data, hashlib.sha256(data).hexdigest())


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    """Every call reads the model from the host; a stream stays on the model it started on.

    The methods run on the server's event loop and hold no thread while they wait: what blocks (the host may
    wait out an in-place swap; prompts are tokenized) runs on the loop's few worker threads, and a stream's
    events come from the engine's thread through ``call_soon_threadsafe``."""

    def __init__(
        self, host: ModelHost, default_max_new_tokens: int = 256, compiler: ConstraintCompiler | None = None
    ) -> None:
        self.host = host
        self.default_max_new_tokens = default_max_new_tokens
        self.compiler = compiler or ConstraintCompiler()
        self._tokenizer: tuple[LoadedModel, SerializedTokenizer] | None = None  # the served model's, once asked

    async def Generate(self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        remaining = context.time_remaining()
        constraint = params.constraint_spec(request.params)
        if constraint is not None:
            # the request waits for its own compile here, on the compiler's pool: the engine never waits for one
            served = await asyncio.to_thread(self.host.current, remaining)
            await self.compiler.compile_async(constraint, served.loaded)

        def build(loaded: LoadedModel) -> Request:
            prompt_ids = self._prompt_ids(request, loaded)
            params.check_prompt(len(prompt_ids), loaded.context_length)
            config = params.sampling_config(
                request.params, len(prompt_ids), loaded.context_length, self.default_max_new_tokens, loaded.vocab_size
            )
            if constraint is not None:
                # compiled above for this tokenizer (a cache hit); after a swap, compiled again for the new one
                config = dataclasses.replace(config, constraint=self.compiler.compile(constraint, loaded))
            job = Request(prompt_ids=prompt_ids, config=config, deadline=_deadline(remaining))
            if request.request_id:
                job.request_id = request.request_id
            return job

        served, job = await self._submit(build, remaining)
        wakeup = _Wakeup(asyncio.get_running_loop())
        job.attach(wakeup.notify)
        try:
            started = False  # the model and the cached prompt tokens go out once, on the first message
            while True:
                # a client that reads slower than we generate gets everything pending in one message
                events = job.drain()
                if not events:
                    await wakeup.wait()
                    continue
                # read now, not at submit: the engine sets cached_tokens when it admits the request
                model, cached_tokens = ("", 0) if started else (served.label, job.cached_tokens)
                chunks = [e for e in events if isinstance(e, TokenChunk)]
                if chunks:
                    yield generation_pb2.GenerateResponse(
                        token_ids=[i for c in chunks for i in c.token_ids],
                        text="".join(c.text for c in chunks),
                        logprobs=[_logprob(lp, served.loaded.tokenizer) for c in chunks for lp in c.logprobs],
                        model=model,
                        cached_prompt_tokens=cached_tokens,
                    )
                    started, model, cached_tokens = True, "", 0
                finished = next((e for e in events if isinstance(e, Finished)), None)
                if finished is not None:
                    message = self._finish_message(job, finished, served.engine)
                    message.model = model
                    message.cached_prompt_tokens = cached_tokens
                    yield message
                    return
        finally:
            # the client cancelled, hung up or ran out of time (CancelledError), or the stream ended (a no-op):
            # the engine drops the row before its next step
            job.cancel()

    async def _submit(
        self, build: Callable[[LoadedModel], Request], remaining: float | None
    ) -> tuple[ServedModel, Request]:
        """``host.submit`` on a worker thread. A call cancelled while it waits there cancels its request once
        it is submitted, so a request nobody reads never runs."""
        submitting = asyncio.ensure_future(asyncio.to_thread(self.host.submit, build, remaining))
        try:
            return await asyncio.shield(submitting)
        except asyncio.CancelledError:
            submitting.add_done_callback(_cancel_submitted)
            raise

    def _finish_message(
        self, job: Request, event: Finished, engine: ContinuousBatchingEngine
    ) -> generation_pb2.GenerateResponse:
        if event.status is RequestStatus.FINISHED_ERROR and engine.failure is not None:
            raise Unavailable(f"request {job.request_id} lost its model: {event.error}")
        if event.status is RequestStatus.FINISHED_ERROR:
            raise RuntimeError(f"generation failed for request {job.request_id}: {event.error}")
        if event.status is RequestStatus.FINISHED_CANCELLED and job.deadline and time.monotonic() >= job.deadline:
            raise DeadlineExceeded(f"the request's deadline passed after {event.generated_tokens} generated tokens")
        return generation_pb2.GenerateResponse(
            finish=generation_pb2.Finish(
                reason=_FINISH_REASONS[event.status],
                prompt_tokens=event.prompt_tokens,
                generated_tokens=event.generated_tokens,
                stop_sequence=event.stop_sequence,
                queue_ms=event.queue_ms,
                time_to_first_token_ms=event.time_to_first_token_ms,
                cached_prompt_tokens=job.cached_tokens,
                drafted_tokens=event.drafted_tokens,
                accepted_draft_tokens=event.accepted_draft_tokens,
            )
        )

    async def ModelInfo(self, request: generation_pb2.ModelInfoRequest, context: grpc.aio.ServicerContext):
        loaded = (await asyncio.to_thread(self.host.current, context.time_remaining())).loaded
        tokenizer = loaded.tokenizer
        serialized = await asyncio.to_thread(self._serialized_tokenizer, loaded)
        held = request.tokenizer_held if request.HasField("tokenizer_held") else None
        return generation_pb2.ModelInfoResponse(
            name=loaded.name,
            version=loaded.version,
            architecture=loaded.architecture,
            context_length=loaded.context_length,
            prompt_format=loaded.prompt_format,
            dtype=loaded.dtype,
            device=str(loaded.device),
            chat_template=(tokenizer.chat_template or "") if loaded.prompt_format == "chat_template" else "",
            bos_token=tokenizer.bos_token or "",
            eos_token=tokenizer.eos_token or "",
            stop=loaded.stop_sequences,
            tokenizer_json=serialized.json if held is not None and held != serialized.digest else b"",
            tokenizer_digest=serialized.digest,
            split_special_tokens=bool(getattr(tokenizer, "split_special_tokens", False)),
        )

    def _serialized_tokenizer(self, loaded: LoadedModel) -> SerializedTokenizer:
        """The model's tokenizer serialized once (a swap brings another model: serialized once more)."""
        cached = self._tokenizer
        if cached is not None and cached[0] is loaded:
            return cached[1]
        serialized = serialize_tokenizer(loaded.tokenizer)
        self._tokenizer = (loaded, serialized)
        return serialized

    async def Tokenize(self, request: generation_pb2.TokenizeRequest, context: grpc.aio.ServicerContext):
        remaining = context.time_remaining()

        def count() -> list[int]:
            return _encode(self.host.current(remaining).loaded, request.text, request.add_special_tokens)

        ids = await asyncio.to_thread(count)
        return generation_pb2.TokenizeResponse(token_count=len(ids), token_ids=ids if request.return_ids else [])

    def _prompt_ids(self, request: generation_pb2.GenerateRequest, loaded: LoadedModel) -> list[int]:
        kind = request.WhichOneof("prompt")
        if kind == "text":
            return _encode(loaded, request.text, request.add_special_tokens)
        if kind == "token_ids":
            ids = list(request.token_ids.ids)
            vocab_size = loaded.vocab_size
            bad = [i for i in ids if i >= vocab_size]
            if bad:
                raise InvalidArgument(f"token id(s) {bad[:5]} are outside the model's vocabulary (0..{vocab_size - 1})")
            return ids
        raise InvalidArgument("the request has no prompt: set text or token_ids")


def start_generation_server(
    loaded: LoadedModel,
    engine: ContinuousBatchingEngine,
    address: str,
    default_max_new_tokens: int = 256,
    limits: ServerLimits | None = None,
    security: ServerSecurity | None = None,
    compiler: ConstraintCompiler | None = None,
) -> AsyncRunningServer:
    """nightcap.v1.Generation (and a ModelAdmin without a registry: it cannot swap) for one fixed model."""
    host = ModelHost(loaded, engine, registry=None)
    return serve_model_host(host, address, default_max_new_tokens, limits, security, compiler)


def serve_model_host(
    host: ModelHost,
    address: str,
    default_max_new_tokens: int = 256,
    limits: ServerLimits | None = None,
    security: ServerSecurity | None = None,
    compiler: ConstraintCompiler | None = None,
) -> AsyncRunningServer:
    """nightcap.v1.Generation and nightcap.v1.ModelAdmin, with health and reflection, on ``address``
    (port 0: any free)."""
    from services.generation.admin import ModelAdminServicer

    bindings = [
        ServiceBinding(
            generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
            generation_pb2_grpc.add_GenerationServicer_to_server,
            GenerationServicer(host, default_max_new_tokens, compiler),
        ),
        ServiceBinding(
            admin_pb2.DESCRIPTOR.services_by_name["ModelAdmin"].full_name,
            admin_pb2_grpc.add_ModelAdminServicer_to_server,
            ModelAdminServicer(host),
        ),
    ]
    return start_aio_server(bindings, address, limits, security)


class _Wakeup:
    """Wakes one stream's coroutine from the engine's thread, with at most one ``call_soon_threadsafe`` in
    flight: when the loop falls behind, the events that arrive meanwhile cost it no further wake-ups."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ready = asyncio.Event()
        self._pending = False

    def notify(self) -> None:
        """Called on the engine's thread after the request queued an event. The loop drains only after
        ``_wake`` cleared the flag, so an event whose notify found it set is still drained."""
        if self._pending:
            return
        self._pending = True
        with contextlib.suppress(RuntimeError):  # the server stopped and closed its loop: nobody is reading
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self._pending = False
        self._ready.set()

    async def wait(self) -> None:
        await self._ready.wait()
        self._ready.clear()


def _cancel_submitted(submitting: asyncio.Future) -> None:
    if not submitting.cancelled() and submitting.exception() is None:
        submitting.result()[1].cancel()


def _encode(loaded: LoadedModel, text: str, add_special_tokens: bool) -> list[int]:
    return loaded.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def _deadline(remaining: float | None) -> float | None:
    return None if remaining is None else time.monotonic() + remaining


def _logprob(logprob: TokenLogprob, tokenizer: PreTrainedTokenizerBase) -> generation_pb2.TokenLogprob:
    return generation_pb2.TokenLogprob(
        token_id=logprob.token_id,
        logprob=logprob.logprob,
        top=[
            generation_pb2.TopLogprob(token_id=t, logprob=lp, token=_token_bytes(tokenizer, t)) for t, lp in logprob.top
        ],
        token=_token_bytes(tokenizer, logprob.token_id),
    )


def _token_bytes(tokenizer: PreTrainedTokenizerBase, token_id: int) -> bytes:
    """The token decoded alone; a token that holds part of a UTF-8 character decodes to U+FFFD."""
    return tokenizer.decode([token_id]).encode("utf-8")
