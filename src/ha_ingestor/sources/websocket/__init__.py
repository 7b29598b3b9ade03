"""A small WebSocket (RFC 6455) client: a sans-io codec and an asyncio connection."""

from ha_ingestor.sources.websocket.codec import HandshakeError, ProtocolError, WebSocketError
from ha_ingestor.sources.websocket.connection import WebSocketConnection

__all__ = ["HandshakeError", "ProtocolError", "WebSocketConnection", "WebSocketError"]
