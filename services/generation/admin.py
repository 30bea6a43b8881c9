"""The ModelAdmin gRPC servicer: list registry versions, load one live, roll back, say which is active.

Thin like the Generation servicer: the model host does the work; errors become statuses in the shared
interceptor (a second load while one runs, a version failing its sha256, nothing to roll back to:
FAILED_PRECONDITION; an unknown model or version: NOT_FOUND).
"""

from __future__ import annotations

import grpc

from nightcap.v1 import admin_pb2, admin_pb2_grpc
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.registry import RegistryError, RegistryVersion
from services.generation.host import ModelHost, SwapJob


class ModelAdminServicer(admin_pb2_grpc.ModelAdminServicer):
    def __init__(self, host: ModelHost) -> None:
        self.host = host

    def ListVersions(self, request: admin_pb2.ListVersionsRequest, context: grpc.ServicerContext):
        registry = self.host.registry
        if registry is None:
            raise FailedPrecondition("this server was started without a model registry")
        names = [request.name] if request.name else registry.names()
        active = self.host.current(context.time_remaining()).label
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

    def LoadVersion(self, request: admin_pb2.LoadVersionRequest, context: grpc.ServicerContext):
        if not request.model:
            raise InvalidArgument("set model to a registry name or name:version")
        yield from _stream(self.host.start_swap(request.model, request.mode == admin_pb2.SWAP_MODE_IN_PLACE))

    def Rollback(self, request: admin_pb2.RollbackRequest, context: grpc.ServicerContext):
        yield from _stream(self.host.start_rollback(request.mode == admin_pb2.SWAP_MODE_IN_PLACE))

    def ActiveVersion(self, request: admin_pb2.ActiveVersionRequest, context: grpc.ServicerContext):
        active = self.host.current(context.time_remaining())
        return admin_pb2.ActiveVersionResponse(
            model=active.label,
            previous=self.host.previous,
            since=active.since,
            loading=self.host.loading,
            draining=self.host.draining_requests,
        )


def _stream(job: SwapJob):
    """The job's progress as messages; a client that hangs up does not stop the load (it runs on its thread)."""
    for progress in job.events():
        yield admin_pb2.LoadProgress(
            stage=progress.stage,
            message=progress.message,
            fraction=progress.fraction,
            model=progress.model,
            previous=progress.previous,
            swap_seconds=progress.swap_seconds,
        )


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
