"""The drain benchmark's reference: a bare aiohttp client posting to the upstream at full speed.

`python -m bench.raw_client URL COUNT CONCURRENCY` prints {"requests", "seconds", "rate"} as
JSON. It sends the same body the gateway would, over one keep-alive `ClientSession` with the
same pool size, and does nothing else: the ceiling the drain is measured against.
"""

from __future__ import annotations

import asyncio
import sys
import time

import aiohttp
import orjson
import uvloop

BODY = orjson.dumps(
    {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": "5491140123456",
        "type": "text",
        "text": {"body": "x" * 100},
    }
)


async def main(url: str, count: int, concurrency: int) -> dict[str, float]:
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    headers = {"Authorization": "Bearer bench", "Content-Type": "application/json"}
    remaining = count

    async with aiohttp.ClientSession(connector=connector) as session:

        async def lane(number: int) -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                async with session.post(
                    f"{url}/55500000{number % 10}/messages", data=BODY, headers=headers
                ) as response:
                    await response.read()

        started = time.perf_counter()
        await asyncio.gather(*(lane(i) for i in range(concurrency)))
        seconds = time.perf_counter() - started
    return {"requests": count, "seconds": seconds, "rate": count / seconds}


if __name__ == "__main__":
    result = uvloop.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
