"""The peer Herald is measured against: a minimal, idiomatic FastAPI + uvicorn
service, the stack the seed products document.

- `GET /ws`: a WebSocket that receives every published frame (the usual
  "connection manager" broadcaster: a set of sockets, `send_text` to each).
- `POST /publish`: broadcasts the request body to every socket.
- `GET /v1/campaign/{uuid}/status` and `/analytics`: the seed 002 reads,
  answered from Herald's own SQLite file (`HERALD_PEER_DB`) with the same
  queries Herald runs (counters from the runs table).

Run by `herald bench`, never by hand: `python fastapi_peer.py PORT`.
"""

import asyncio
import json
import os
import sqlite3
import sys

import uvicorn
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect

app = FastAPI()
sockets: set[WebSocket] = set()
db_path = os.environ.get("HERALD_PEER_DB")


@app.websocket("/ws")
async def ws(socket: WebSocket) -> None:
    await socket.accept()
    sockets.add(socket)
    try:
        while True:
            await socket.receive_text()
    except WebSocketDisconnect:
        pass
    finally:
        sockets.discard(socket)


@app.post("/publish")
async def publish(request: Request) -> dict:
    frame = (await request.body()).decode()
    await asyncio.gather(
        *(s.send_text(frame) for s in list(sockets)), return_exceptions=True
    )
    return {"sent": len(sockets)}


def read_db(query: str, args: tuple) -> list:
    connection = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return connection.execute(query, args).fetchall()
    finally:
        connection.close()


@app.get("/v1/campaign/{uuid}/status")
async def status(uuid: str) -> dict:
    rows = read_db(
        "SELECT c.status, r.total, r.sent, r.failed, r.pending, r.delivered "
        "FROM campaigns c LEFT JOIN runs r ON r.campaign_id = c.id "
        "WHERE c.uuid = ? ORDER BY r.id DESC LIMIT 1",
        (uuid,),
    )
    status, total, sent, failed, pending, delivered = rows[0]
    return {
        "success": True,
        "data": {"status": status, "total": total, "sent": sent, "failed": failed,
                 "pending": pending, "delivered": delivered},
    }


@app.get("/v1/campaign/{uuid}/analytics")
async def analytics(uuid: str) -> dict:
    rows = read_db(
        "SELECT COUNT(*), SUM(total), SUM(sent), SUM(failed), SUM(delivered), "
        "SUM(failed_delivery) FROM runs WHERE campaign_id = "
        "(SELECT id FROM campaigns WHERE uuid = ?)",
        (uuid,),
    )
    runs, total, sent, failed, delivered, failed_delivery = rows[0]
    return {
        "success": True,
        "data": {"runs": runs, "total": total, "sent": sent, "failed": failed,
                 "delivered": delivered, "failed_delivery": failed_delivery,
                 "delivery_rate": (delivered or 0) / max(sent or 0, 1)},
    }


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
