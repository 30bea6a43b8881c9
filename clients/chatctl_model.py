"""`chatctl model ...`: the registry versions a generation server can load, publishing one live, rolling back.

These talk to the generation service's ModelAdmin (the generation port, 50051 under `make up`), not to the
orchestrator. To publish to several replicas, run `chatctl model publish` once per --address.
"""

from __future__ import annotations

import time

import typer

from clients.admin import DEFAULT_GENERATION_ADDRESS, LoadStep, ModelAdminClient
from clients.client import NightcapError

model_app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
AdminAddressOption = typer.Option(
    DEFAULT_GENERATION_ADDRESS, "--address", envvar="NIGHTCAP_GENERATION_ADDRESS", help="generation service host:port"
)
InPlaceOption = typer.Option(
    False, "--in-place", help="drain and free the served copy before loading (one copy in memory; requests wait)"
)


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _fail(error: NightcapError) -> typer.Exit:
    typer.echo(f"error: {error}", err=True)
    return typer.Exit(1)


@model_app.command("list")
def model_list(
    name: str = typer.Argument("", help="one model's versions (default: every model)"),
    address: str = AdminAddressOption,
) -> None:
    """Registry versions, newest first (* marks the one serving), then the promotion history."""
    with ModelAdminClient(address) as admin:
        try:
            versions, history = admin.versions(name)
        except NightcapError as error:
            raise _fail(error) from None
    for version in versions:
        gate = version.gate_decision or "-"
        numbers = ""
        if "candidate_eval_perplexity" in version.gate:
            numbers = (
                f"  ppl {version.gate['candidate_eval_perplexity']:.3f}"
                f" (baseline {version.gate.get('baseline_eval_perplexity', float('nan')):.3f})"
            )
        print(
            f"{'*' if version.active else ' '} {version.model:<32} {_when(version.created)}  {version.dtype or '-':<9}"
            f"  gate {gate}{numbers}  from {version.source}"
        )
    if history:
        print("promotions:")
        for record in history:
            forced = "  (forced)" if record.forced else ""
            print(f"  {_when(record.at)}  {record.action:<8} {record.previous} -> {record.model}{forced}")


def _follow(steps) -> None:
    last: LoadStep | None = None
    for step in steps:
        print(f"[{step.fraction:>4.0%}] {step.stage:<9} {step.message}", flush=True)
        last = step
    if last is not None:
        print(f"{last.model} serves new requests (was {last.previous}; switch after {last.swap_seconds:.1f}s)")


@model_app.command("publish")
def model_publish(
    model: str = typer.Argument(..., help="NAME (its newest version) or NAME:VERSION"),
    address: str = AdminAddressOption,
    in_place: bool = InPlaceOption,
) -> None:
    """Load a registry version into the running server and switch new requests to it (no request fails)."""
    with ModelAdminClient(address) as admin:
        try:
            _follow(admin.publish(model, in_place=in_place))
        except NightcapError as error:
            raise _fail(error) from None


@model_app.command("rollback")
def model_rollback(address: str = AdminAddressOption, in_place: bool = InPlaceOption) -> None:
    """Switch back to the version promoted before the one serving now."""
    with ModelAdminClient(address) as admin:
        try:
            _follow(admin.rollback(in_place=in_place))
        except NightcapError as error:
            raise _fail(error) from None


@model_app.command("status")
def model_status(address: str = AdminAddressOption) -> None:
    """The version serving new requests, what it replaced, and any load or drain in progress."""
    with ModelAdminClient(address) as admin:
        try:
            active = admin.active()
        except NightcapError as error:
            raise _fail(error) from None
    print(f"serving   {active.model}  since {_when(active.since)}")
    if active.previous:
        print(f"previous  {active.previous}")
    if active.loading:
        print(f"loading   {active.loading}")
    if active.draining:
        print(f"draining  {active.draining} request(s) finishing on the previous version")
