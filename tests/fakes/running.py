"""Running a whole in-process Service in a unit test until something holds."""

from __future__ import annotations

import asyncio
from typing import Any

from service.app import Service


async def run_until(service: Service, cond: Any) -> None:
    """Run ``service`` until ``cond()`` holds (at most 10 s), then stop it gracefully;
    a service that ends on its own first fails the test with its exception."""
    task = asyncio.create_task(service.run())
    try:
        async with asyncio.timeout(10):
            while not cond():
                assert not task.done(), task.exception()
                await asyncio.sleep(0.01)
    finally:
        service.request_stop()
        await asyncio.wait_for(task, 10)
