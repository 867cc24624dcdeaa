# The Python client of seed 000 (Burki's campaign progress WebSocket),
# as its documentation shows it. Only the host, the token and the campaign
# id differ: they come from the environment.
import asyncio
import os

import websockets
import json

HOST = os.environ["HERALD_WS_HOST"]


async def monitor_campaign(campaign_id: int, api_key: str):
    """Monitor campaign progress via WebSocket."""
    uri = f"ws://{HOST}/ws/campaigns/{campaign_id}/progress?token={api_key}"

    async with websockets.connect(uri) as websocket:
        print(f"Connected to campaign {campaign_id}")

        # Start ping task to keep connection alive
        async def ping_task():
            while True:
                await asyncio.sleep(30)
                await websocket.send(json.dumps({"type": "ping"}))

        ping = asyncio.create_task(ping_task())

        try:
            async for message in websocket:
                data = json.loads(message)

                if data["type"] == "connection_ack":
                    print(f"Connection confirmed for campaign {data['campaign_id']}")

                elif data["type"] in ["initial_progress", "progress_update"]:
                    progress = data["data"]["progress"]
                    status = data["data"]["status"]

                    print(f"Status: {status}")
                    print(f"Progress: {progress['completed']}/{progress['total_contacts']} "
                          f"({progress['progress_percentage']:.1f}%)")
                    print(f"Success rate: {progress['success_rate']:.1f}%")
                    print("---")

                    if status == "completed":
                        print("Campaign completed!")
                        break

                elif data["type"] == "pong":
                    pass  # Connection healthy
        finally:
            ping.cancel()


# Run the monitor
asyncio.run(monitor_campaign(int(os.environ["HERALD_CAMPAIGN_ID"]), os.environ["HERALD_TOKEN"]))
