"""The model admin client: list registry versions, publish one to a generation server, roll back.

    with ModelAdminClient("127.0.0.1:50051") as admin:
        for step in admin.publish("wiki-chat:2"):
            print(step.stage, step.message)

It talks to the generation service's ``nightcap.v1.ModelAdmin`` (on the generation port, not the
orchestrator's). To publish to several replicas, call ``publish`` on each address in turn: each call returns
once that replica serves the new version, or raises and leaves it on the old one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from clients.client import NightcapError
from nightcap.v1 import admin_pb2, admin_pb2_grpc

DEFAULT_GENERATION_ADDRESS = os.environ.get("NIGHTCAP_GENERATION_ADDRESS", "127.0.0.1:50051")
DEFAULT_ADMIN_TIMEOUT_S = 1800.0  # a load of a multi-GB model on a busy host takes minutes


@dataclass(frozen=True)
class VersionInfo:
    model: str  # name:version
    source: str
    created: float
    dtype: str
    parent: str
    gate: dict[str, float] = field(default_factory=dict)
    gate_decision: str = ""
    active: bool = False


@dataclass(frozen=True)
class PromotionRecord:
    at: float
    action: str
    model: str
    previous: str
    source: str
    forced: bool


@dataclass(frozen=True)
class LoadStep:
    stage: str
    message: str
    fraction: float
    model: str
    previous: str
    swap_seconds: float


@dataclass(frozen=True)
class ActiveModel:
    model: str
    previous: str
    since: float
    loading: str
    draining: int


class ModelAdminClient:
    def __init__(self, address: str = DEFAULT_GENERATION_ADDRESS, timeout: float = DEFAULT_ADMIN_TIMEOUT_S) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel(address)
        self._stub = admin_pb2_grpc.ModelAdminStub(self._channel)

    def __enter__(self) -> ModelAdminClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def versions(self, name: str = "") -> tuple[list[VersionInfo], list[PromotionRecord]]:
        try:
            reply = self._stub.ListVersions(admin_pb2.ListVersionsRequest(name=name), timeout=60.0)
        except grpc.RpcError as error:
            raise self._error(error) from None
        versions = [
            VersionInfo(
                model=f"{v.name}:{v.version}",
                source=v.source,
                created=v.created,
                dtype=v.dtype,
                parent=v.parent,
                gate=dict(v.gate),
                gate_decision=v.gate_decision,
                active=v.active,
            )
            for v in reply.versions
        ]
        history = [PromotionRecord(p.at, p.action, p.model, p.previous, p.source, p.forced) for p in reply.promotions]
        return versions, history

    def publish(self, model: str, in_place: bool = False) -> Iterator[LoadStep]:
        """Loads ``model`` (name or name:version) and switches to it; yields progress, raises on failure."""
        mode = admin_pb2.SWAP_MODE_IN_PLACE if in_place else admin_pb2.SWAP_MODE_BESIDE
        yield from self._progress(self._stub.LoadVersion, admin_pb2.LoadVersionRequest(model=model, mode=mode))

    def rollback(self, in_place: bool = False) -> Iterator[LoadStep]:
        mode = admin_pb2.SWAP_MODE_IN_PLACE if in_place else admin_pb2.SWAP_MODE_BESIDE
        yield from self._progress(self._stub.Rollback, admin_pb2.RollbackRequest(mode=mode))

    def active(self) -> ActiveModel:
        try:
            reply = self._stub.ActiveVersion(admin_pb2.ActiveVersionRequest(), timeout=30.0)
        except grpc.RpcError as error:
            raise self._error(error) from None
        return ActiveModel(reply.model, reply.previous, reply.since, reply.loading, reply.draining)

    def _progress(self, method, request) -> Iterator[LoadStep]:
        try:
            for step in method(request, timeout=self.timeout):
                yield LoadStep(step.stage, step.message, step.fraction, step.model, step.previous, step.swap_seconds)
        except grpc.RpcError as error:
            raise self._error(error) from None

    def _error(self, error: grpc.RpcError) -> NightcapError:
        return NightcapError(error.code(), error.details() or str(error), self.address)
