"""`meshnode join --web PORT`: serve the browser client page next to a running node.

Routes (aiohttp, bound to 127.0.0.1 by default):
  GET /                                  the built client (web/dist/index.html) and its assets
  GET /config.json                       strategy, relay URLs, appId, room, ICE servers, the node's
                                         identity; never the password (`passwordRequired` says
                                         whether the page must ask for one)
  GET /.well-known/codec/index.json      the map pointer list (legion-mesh §4.4)
  GET /.well-known/codec/maps/<id>.json  the node's tokenizer map (exact bytes; sha256 = cap.mapHash)

The client is bundled by `scripts/build-client.sh` into web/dist (or $MESHNODE_WEB_DIST).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from aiohttp import web

from meshnode.errors import ConfigError
from meshnode.generation.modelinfo import map_index
from meshnode.settings import Settings
from meshnode.transport.ice import parse_ice_url
from signaling.registry import DEFAULT_RELAYS

logger = logging.getLogger(__name__)

DEFAULT_DIST = Path(__file__).resolve().parents[2] / "web" / "dist"
BUILD_HINT = "scripts/build-client.sh (after `cd web && npm ci`)"
BROWSER_STRATEGIES = ("mqtt", "nostr", "torrent")

_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; worker-src 'self' blob:; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self' ws: wss:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def dist_dir(override: str | Path | None = None) -> Path:
    """Where the built client lives: `override`, $MESHNODE_WEB_DIST, or <repo>/web/dist."""
    if override is not None:
        return Path(override)
    env = os.environ.get("MESHNODE_WEB_DIST")
    return Path(env) if env else DEFAULT_DIST


def check_dist(path: Path) -> None:
    if not (path / "index.html").is_file() or not (path / "app.js").is_file():
        raise ConfigError(f"the browser client is not built ({path} has no index.html/app.js): run {BUILD_HINT}")


def browser_ice_servers(servers: list[str]) -> list[dict[str, Any]]:
    """Settings ICE URLs (`turn:user:pass@host:port` carries credentials) → RTCIceServer dicts."""
    return [parse_ice_url(url) for url in servers]


def relay_urls(settings: Settings) -> list[str]:
    """The relays the node uses: configured ones, else the strategy's defaults."""
    if settings.room.relays:
        return list(settings.room.relays)
    return list(DEFAULT_RELAYS.get(settings.room.strategy, []))


def client_config(node: Any, settings: Settings) -> dict[str, Any]:
    """What the page needs to join the node's room (no secrets)."""
    room = node.room
    service = node.service
    return {
        "strategy": settings.room.strategy,
        "relayUrls": relay_urls(settings),
        "appId": settings.room.app_id,
        "roomId": settings.room.room,
        "passwordRequired": bool(settings.room.password),
        "iceServers": browser_ice_servers(list(settings.webrtc.ice_servers)),
        "browserSupported": settings.room.strategy in BROWSER_STRATEGIES,
        "node": {
            "peerId": room.self_id if room is not None else None,
            "nick": service.config.nick if service is not None else None,
            "modelId": node.model_id,
            "mapId": node.codec_map.map_id if node.codec_map is not None else None,
        },
    }


class WebApp:
    """The aiohttp application serving the client for one node."""

    def __init__(self, node: Any, settings: Settings, dist: Path) -> None:
        self.node = node
        self.settings = settings
        self.dist = dist.resolve()

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._headers])
        app.router.add_get("/", self.index)
        app.router.add_get("/index.html", self.index)
        app.router.add_get("/config.json", self.config)
        app.router.add_get("/.well-known/codec/index.json", self.map_index)
        app.router.add_get(r"/.well-known/codec/maps/{map_id:.+}.json", self.map_document)
        app.router.add_static("/", self.dist, follow_symlinks=False, show_index=False)
        return app

    @web.middleware
    async def _headers(self, request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        for key, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response

    async def index(self, request: web.Request) -> web.StreamResponse:
        path = self.dist / "index.html"
        if not path.is_file():
            return web.Response(status=503, text=f"The browser client is not built: run {BUILD_HINT}.\n")
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    async def config(self, request: web.Request) -> web.Response:
        return web.json_response(client_config(self.node, self.settings), headers={"Cache-Control": "no-store"})

    async def _map(self) -> tuple[str, bytes, str]:
        """(map id, exact bytes, pin) of the node's backend (built once, off the event loop)."""
        codec_map = await self.node.backend.codec_map()
        return codec_map.map_id, codec_map.data, codec_map.map_hash

    async def map_index(self, request: web.Request) -> web.Response:
        map_id, _, pin = await self._map()
        body = map_index(map_id, pin)
        return web.json_response(body, headers={"Access-Control-Allow-Origin": "*", "Cache-Control": "max-age=60"})

    async def map_document(self, request: web.Request) -> web.Response:
        map_id, data, pin = await self._map()
        if request.match_info["map_id"] != map_id:
            return web.json_response({"error": f"no map {request.match_info['map_id']!r}; this node serves {map_id!r}"},
                                     status=404, headers={"Access-Control-Allow-Origin": "*"})
        return web.Response(body=data, content_type="application/json", headers={
            "Access-Control-Allow-Origin": "*", "Cache-Control": "max-age=60", "Codec-Tokenizer-Map": pin})


async def start_web(node: Any, settings: Settings, port: int, *, host: str = "127.0.0.1",
                    dist: str | Path | None = None) -> web.AppRunner:
    """Serve the client page for `node` on host:port (port 0 picks a free one); returns the runner.

    Raises ConfigError when the client has not been built.
    """
    path = dist_dir(dist)
    check_dist(path)
    if settings.room.strategy not in BROWSER_STRATEGIES:
        logger.warning("strategy %r has no browser implementation; the page can only join rooms on %s",
                       settings.room.strategy, ", ".join(BROWSER_STRATEGIES))
    runner = web.AppRunner(WebApp(node, settings, path).make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot serve the web client on {host}:{port}: {exc.strerror or exc}") from exc
    bound = runner.addresses[0]
    url_host = f"[{bound[0]}]" if ":" in str(bound[0]) else bound[0]
    logger.info("web client at http://%s:%d/", url_host, bound[1])
    return runner


def bound_url(runner: web.AppRunner) -> str:
    """http://host:port of a started runner (for tests and logs)."""
    host, port = runner.addresses[0][:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


__all__ = ["bound_url", "browser_ice_servers", "check_dist", "client_config", "start_web"]
