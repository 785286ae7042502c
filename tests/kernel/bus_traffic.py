"""Child process of the SIGKILL durability test: start the ecosystem, push requests, print each accepted id.

    python bus_traffic.py PACKAGE STATE_DIR COUNT SEED

Starting the runtime redelivers whatever the previous (killed) run left pending, then prints
"started". Each request (clerk -> ledger.record) is printed on its own line as soon as
`Runtime.submit` returns, i.e. once the bus has accepted it durably: those are the acknowledged
ids the parent holds the bus to. Requests go in bursts of random size before the deliveries get
the event loop, so a kill finds some accepted and not yet handled, some handled and not yet
acked. With COUNT 0 it only recovers, stops cleanly and prints "stopped".
"""

from __future__ import annotations

import asyncio
import importlib
import random
import sys


async def main(package: str, state: str, count: int, seed: int) -> None:
    config = importlib.import_module(f"{package}.ecosystem").CONFIG
    runtime = importlib.import_module(f"{package}.kernel.runtime").Runtime(config, state)
    await runtime.start()
    print("started", flush=True)
    rng = random.Random(seed)
    sent = 0
    while sent < count:
        for _ in range(rng.randint(1, 8)):
            hold = rng.choice((0.0, 0.0, 0.002))
            envelope = await runtime.submit("clerk", "ledger", tool="record", args={"n": sent, "hold_s": hold})
            print(envelope["id"], flush=True)
            sent += 1
        await asyncio.sleep(rng.choice((0, 0, 0.001)))
    await runtime.stop()
    print("stopped", flush=True)


if __name__ == "__main__":
    package, state, count, seed = sys.argv[1:5]
    asyncio.run(main(package, state, int(count), int(seed)))
