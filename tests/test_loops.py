import asyncio

import pytest
import uvloop


@pytest.mark.asyncio
async def test_each_async_test_runs_on_both_loops(request: pytest.FixtureRequest) -> None:
    loop = asyncio.get_running_loop()
    expected_uvloop = "uvloop" in request.node.name
    assert isinstance(loop, uvloop.Loop) == expected_uvloop
