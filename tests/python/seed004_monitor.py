# The Python client of seed 004 (MatCraft's campaign WebSocket), as its
# documentation shows it. Only the host, the token and the campaign id
# differ: they come from the environment.
import asyncio
import os

import websockets
import json

HOST = os.environ["HERALD_WS_HOST"]


async def monitor_campaign(campaign_id, api_key):
    uri = f"ws://{HOST}/api/v1/ws/campaigns/{campaign_id}?token={api_key}"
    async with websockets.connect(uri) as ws:
        async for message in ws:
            data = json.loads(message)
            if data["type"] == "iteration_complete":
                print(f"Iter {data['data']['iteration']}: HV={data['data']['hypervolume']:.4f}")
            elif data["type"] == "campaign_complete":
                print("Campaign finished!")
                break


asyncio.run(monitor_campaign(os.environ["HERALD_CAMPAIGN_ID"], os.environ["HERALD_TOKEN"]))
