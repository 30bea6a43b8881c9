"""The ModelAdmin gRPC servicer: list registry versions, load one live, roll back, say which is active.

Thin like the Generation servicer: the model host does the work; errors become statuses in the shared
interceptor (a second load while one runs, a version failing its sha256, nothing to roll back to:
FAILED_PRECONDITION; an unknown model or version: NOT_FOUND). Its methods run on the server's event loop;
listing the registry and waiting for the model run on threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from nightcap.v1 import admin_pb2, admin_pb2_grpc
from services.common.errors import FailedPrecondition, InvalidArgument, ServiceError
from services.common.registry import RegistryError, RegistryVersion
from services.generation.host import ModelHost, SwapJob, SwapProgress


class ModelAdminServicer(admin_pb2_grpc.ModelAdminServicer):
    def __init__(self, host: ModelHost) -> None:
        self.host = host

    async def ListVersions(self, request: admin_pb2.ListVersionsRequest, context: grpc.aio.ServicerContext):
        return await asyncio.to_thread(self._list_versions, request, context.time_remaining())

    def _list_versions(
        self, request: admin_pb2.ListVersionsRequest, wait: float | None
    ) -> admin_pb2.ListVersionsResponse:
        registry = self.host.registry
        if registry is None:
            raise FailedPrecondition("this server was started without a model registry")
        names = [request.name] if request.name else registry.names()
        active = self.host.current(wait).label
        versions = []
        for name in names:
            for version in reversed(registry.versions(name)):
                try:
                    found = registry.load_version(registry.root / name / version)
                except RegistryError:
                    continue  # a damaged version is not loadable, so it is not listed
                versions.append(_version_info(found, active))
        promotions = [
            admin_pb2.Promotion(
                at=p.at, action=p.action, model=p.model, previous=p.previous, source=p.source, forced=p.forced
            )
            for p in registry.promotions()
        ]
        return admin_pb2.ListVersionsResponse(versions=versions, promotions=promotions)

    async def LoadVersion(self, request: admin_pb2.LoadVersionRequest, context: grpc.aio.ServicerContext):
        if not request.model:
            raise InvalidArgument("set model to a registry name or name:version")
        # start_swap only checks the registry and starts the load's thread: on the loop, so that a second load
        # is refused at once rather than behind submits that wait out an in-place swap on the loop's workers
        job = self.host.start_swap(request.model, request.mode == admin_pb2.SWAP_MODE_IN_PLACE)
        async for progress in _stream(job):
            yield progress

    async def Rollback(self, request: admin_pb2.RollbackRequest, context: grpc.aio.ServicerContext):
        job = self.host.start_rollback(request.mode == admin_pb2.SWAP_MODE_IN_PLACE)  # as in LoadVersion
        async for progress in _stream(job):
            yield progress

    async def ActiveVersion(self, request: admin_pb2.ActiveVersionRequest, context: grpc.aio.ServicerContext):
        active = await asyncio.to_thread(self.host.current, context.time_remaining())
        return admin_pb2.ActiveVersionResponse(
            model=active.label,
            previous=self.host.previous,
            since=active.since,
            loading=self.host.loading,
            draining=self.host.draining_requests,
        )


@dataclass(frozen=True)
class _End:
    """The end of a swap's progress: its error, if it failed."""

    error: ServiceError | None = None


async def _stream(job: SwapJob) -> AsyncIterator[admin_pb2.LoadProgress]:
    """The job's progress as messages. A load takes minutes, so its events are read on a thread of its own
    (not one of the loop's few workers) and handed to the loop; a client that hangs up does not stop the
    load (it runs on its thread)."""
    loop = asyncio.get_running_loop()
    progress: asyncio.Queue[SwapProgress | _End] = asyncio.Queue()

    def hand_over(item: SwapProgress | _End) -> None:
        with contextlib.suppress(RuntimeError):  # the server stopped and closed its loop
            loop.call_soon_threadsafe(progress.put_nowait, item)

    def read() -> None:
        try:
            for event in job.events():
                hand_over(event)
        except ServiceError as error:
            hand_over(_End(error))
        else:
            hand_over(_End())

    threading.Thread(target=read, name=f"swap-progress-{job.model}", daemon=True).start()
    while not isinstance(item := await progress.get(), _End):
        yield admin_pb2.LoadProgress(
            stage=item.stage,
            message=item.message,
            fraction=item.fraction,
            model=item.model,
            previous=item.previous,
            swap_seconds=item.swap_seconds,
        )
    if item.error is not None:
        raise item.error


def _version_info(found: RegistryVersion, active: str) -> admin_pb2.VersionInfo:
    meta = found.metadata
    numbers = {k: float(v) for k, v in meta.gate.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return admin_pb2.VersionInfo(
        name=meta.name,
        version=meta.version,
        source=meta.source,
        created=meta.created,
        prompt_format=meta.prompt_format,
        dtype=meta.dtype,
        parent=meta.parent,
        gate=numbers,
        gate_decision=str(meta.gate.get("decision", "")),
        active=meta.spec == active,
    )
