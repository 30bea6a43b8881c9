"""An outside client: Node.js with @grpc/grpc-js, its stubs built only from protos/ (tests/node/)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import wait_for

NODE_DIR = Path(__file__).parent / "node"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed: the Node.js client cannot run")


def run_node(script: Path, address: str, scenario: str) -> dict:
    done = subprocess.run(
        [NODE, str(script), address, scenario], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(done.stdout)


def test_a_node_chat_without_a_deadline_streams_start_text_end(node_client, orchestrator_address):
    result = run_node(node_client, orchestrator_address, "no-deadline")
    assert result["code"] == "OK", result
    assert result["events"][0] == "start" and result["events"][-1] == "end"
    assert "delta" in result["events"]


def test_a_node_chat_cancelled_mid_stream_ends_cancelled(node_client, orchestrator_address, log_lines):
    result = run_node(node_client, orchestrator_address, "cancel")
    assert result["code"] == "CANCELLED", result
    assert result["events"][:2] == ["start", "delta"] and "end" not in result["events"]
    assert wait_for(lambda: any("CANCELLED by its client" in line for line in log_lines))


def test_a_lone_surrogate_from_javascript_is_invalid_argument_naming_the_field(node_client, orchestrator_address):
    result = run_node(node_client, orchestrator_address, "lone-surrogate")
    assert result["code"] == "INVALID_ARGUMENT", result
    assert "field message is not valid UTF-8" in result["details"]
