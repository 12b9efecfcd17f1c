"""`tunelab web`: a chat page in the browser.

No web framework beyond the server's own: the same FastAPI app as `tunelab serve`, plus one static HTML + JS page at
`/` that keeps the conversation in the browser and calls `/v1/chat/completions` with `stream: true` (server-sent
events), so what the page shows is exactly what API clients get.

With --api-key the page itself loads without the key (it holds no secrets) and asks for it once; the browser keeps it
in the tab's session storage and sends it as 'Authorization: Bearer KEY' on every request.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from tunelab.chat.engine import ChatModel
from tunelab.chat.server import create_app

PAGE = Path(__file__).parent / "static" / "index.html"


def create_web_app(chat: ChatModel, defaults, **kwargs) -> FastAPI:
    app = create_app(chat, defaults, open_paths={"/"}, **kwargs)
    page = PAGE.read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    def index():
        return page

    return app
