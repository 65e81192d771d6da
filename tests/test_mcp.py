"""The MCP server as an agent meets it: the official SDK's client over stdio, typed tools, a
pending spend visible as a question for the user, errors with stable codes, and the tiny SFT
planned, approved and run to the end."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

import pytest

from tests.helpers import MCP_TOOLS as TOOLS
from tests.helpers import PRICED, QUICK_SFT, REPO


def _session(api_url: str, calls: Any) -> Any:
    """Runs `calls(session)` against `python -m deployments.mcp` over stdio."""
    from mcp import ClientSession, StdioServerParameters, stdio_client

    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "deployments.mcp", "--api-url", api_url],
        cwd=str(REPO),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},  # the SDK passes no environment by default
    )

    async def go() -> Any:
        async with stdio_client(params) as (read, write), ClientSession(read, write, read_timeout_seconds=300) as s:
            await s.initialize()
            return await calls(s)

    return asyncio.run(go())


def test_every_tool_is_listed_with_typed_documented_json():
    async def calls(s):
        return (await s.list_tools()).tools

    tools = {t.name: t for t in _session("http://127.0.0.1:9/api", calls)}
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert tool.description and tool.input_schema["type"] == "object"
        assert tool.output_schema and tool.output_schema["type"] == "object"
    assert "max_usd" in tools["approve_run"].input_schema["properties"]
    assert "USER" in tools["approve_run"].description  # the agent is told whose decision it is


RECIPE = {
    "name": "agent-chain",
    "model": "tiny",
    "budget": {"max_usd": 2, "auto_approve_usd": 1},
    "stages": [
        {**{k: v for k, v in QUICK_SFT.items() if k != "model"}, "name": "warmup"},
        {
            "name": "kto",
            "method": "kto",
            "dataset": str(REPO / "examples/data/kto_rows.jsonl"),
            "training": {"max_steps": 4},
        },
    ],
}


def test_planning_and_validation_need_no_server_and_bad_rows_come_back_with_a_code(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n' * 40)
    bad.write_text(bad.read_text() + '{"messages": [{"role": "robot", "content": "?"}]}\n')

    async def calls(s):
        ok = await s.call_tool(
            "validate_dataset", {"dataset": str(REPO / "examples/data/sft_chat.jsonl"), "method": "sft"}
        )
        broken = await s.call_tool("validate_dataset", {"dataset": str(bad), "method": "sft"})
        plan = await s.call_tool("plan_run", {"spec": {**QUICK_SFT, **PRICED, "name": "agent-plan"}})
        wrong = await s.call_tool("plan_run", {"spec": {**QUICK_SFT, "methd": "sft"}})
        started = await s.call_tool("start_run", {"spec": {**QUICK_SFT, "name": "nowhere"}})
        chain = await s.call_tool("plan_run", {"spec": RECIPE})
        return ok, broken, plan, wrong, started, chain

    ok, broken, plan, wrong, started, chain = _session("http://127.0.0.1:9/api", calls)  # nothing listens there
    assert not ok.is_error and ok.structured_content["ok"] and ok.structured_content["report"]["rows"] == 400
    assert broken.is_error and broken.structured_content["code"] == "dataset_invalid"
    assert "row 41 has role 'robot'" in broken.structured_content["error"]  # 1-based, as an editor shows it
    assert not plan.is_error, plan.content[0].text
    found = plan.structured_content
    assert found["needs_approval"] and found["max_usd"] == 2 and 0 < found["estimated_usd"] < 2
    assert "needs the user's approval" in found["summary"] and found["plan"]["run_name"] == "agent-plan"
    assert wrong.is_error and wrong.structured_content["code"] == "spec_invalid"
    assert started.is_error and started.structured_content["code"] == "no_server"
    assert "prefect server start" in started.structured_content["fix"]
    assert not chain.is_error, chain.content[0].text  # a recipe is planned stage by stage, as flows.recipe does
    stages = chain.structured_content["plan"]["stages"]
    assert [p["method"] for p in stages] == [
        "sft",
        "kto",
    ] and "2 stages, warmup (sft)" in chain.structured_content["summary"]


def test_an_agent_plans_asks_its_user_and_runs_the_tiny_sft_to_the_end(trains, served):
    from tests.helpers import api_url

    spec = {**QUICK_SFT, **PRICED, "name": "agent-run"}

    async def poll(s, flow_run_id: str, until: set[str], timeout_s: float = 300) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            found = (await s.call_tool("run_status", {"flow_run_id": flow_run_id})).structured_content
            status = found["status"]
            if status["state"] in until and (status["state"] != "PAUSED" or status["needs"]):
                return found
            assert not status["final"] and time.monotonic() < deadline, (found, served.read_text()[-4000:])
            await asyncio.sleep(2)

    async def calls(s):
        plan = (await s.call_tool("plan_run", {"spec": spec})).structured_content
        started = await s.call_tool("start_run", {"spec": spec})
        assert not started.is_error, started.content[0].text
        fid = started.structured_content["run"]["flow_run_id"]
        paused = await poll(s, fid, {"PAUSED"})
        too_much = await s.call_tool("approve_run", {"flow_run_id": fid, "approve": True, "max_usd": 100})
        approved = await s.call_tool(
            "approve_run", {"flow_run_id": fid, "approve": True, "reason": "the user said yes"}
        )
        done = await poll(s, fid, {"COMPLETED", "FAILED", "CRASHED"})
        results = (await s.call_tool("run_results", {"flow_run_id": fid})).structured_content
        logs = (await s.call_tool("run_logs", {"flow_run_id": fid, "limit": 400})).structured_content
        return plan, paused, too_much, approved, done, results, logs

    plan, paused, too_much, approved, done, results, logs = _session(api_url(), calls)
    status = paused["status"]
    assert status["summary"].startswith("needs approval: estimated $") and status["needs"]["kind"] == "spend"
    assert status["needs"]["estimated_usd"] == pytest.approx(plan["estimated_usd"], rel=0.5)
    assert paused["local"]["state"] == "paused"  # the run folder says the same
    assert too_much.is_error and too_much.structured_content["code"] == "answer_refused"
    assert not approved.is_error and approved.structured_content["answered"]["kind"] == "spend"
    assert done["status"]["state"] == "COMPLETED", logs["lines"][-30:]
    assert done["local"]["state"] == "finished" and done["local"]["verdict"]
    assert "the user said yes" in results["report_markdown"]
    assert results["report"]["approval"]["by"] == "user" and results["report"]["outputs"]
    assert {"plan-agent-run", "report-agent-run"} <= {a["key"] for a in results["artifacts"]}
