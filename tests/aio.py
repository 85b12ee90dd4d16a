"""One coroutine run to completion on a loop of its own."""

from __future__ import annotations

import asyncio
from typing import Any


def run(coroutine: Any) -> Any:
    # Not asyncio.run: it leaves the main thread without a current loop, which the Pulumi
    # mocks of the tests that follow need.
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        loop.close()
