"""Kombu's Redis transport, made to survive what it finds on the queue.

Stock kombu stops the worker on a queue item that is not JSON, lacks its properties, or
carries a body that does not decode; the worker then crash-loops on the same item. Here an
item that is no message at all is logged and dropped (it has no task and no id to record
it under), and a message whose envelope is damaged is repaired far enough to reach its
task, whose own reading records it as rejected.
"""

from __future__ import annotations

import functools
import json
import logging
import uuid
from queue import Empty
from typing import Any

from kombu.serialization import loads as kombu_loads
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import Message as VirtualMessage
from kombu.utils import json as kombu_json
from redis.exceptions import RedisError

log = logging.getLogger("webhooks.transport")

TRANSPORT = "worker.transport:Transport"


class TolerantMessage(VirtualMessage):
    def __init__(self, payload: Any, channel: Any = None, **kwargs: Any) -> None:
        try:
            super().__init__(payload, channel=channel, **kwargs)
        except (KeyError, TypeError, ValueError) as exc:
            log.error("broker message with a damaged envelope (%s: %s); passing it on as is",
                      type(exc).__name__, exc)
            super().__init__(_repaired(payload), channel=channel, **kwargs)


def _repaired(payload: Any) -> dict[str, Any]:
    """An envelope kombu accepts, with the body left undecoded for the task to judge."""
    if not isinstance(payload, dict):
        payload = {"body": str(payload)}
    properties = payload.get("properties")
    properties = dict(properties) if isinstance(properties, dict) else {}
    properties.setdefault("delivery_tag", str(uuid.uuid4()))
    properties["body_encoding"] = None
    properties.setdefault("delivery_info", {"exchange": "", "routing_key": "celery"})
    headers = payload.get("headers")
    body = payload.get("body")
    return {**payload, "properties": properties,
            "headers": headers if isinstance(headers, dict) else {},
            "body": body if isinstance(body, str | bytes) else str(body)}


class TolerantQoS(kombu_redis.QoS):
    def restore_unacked(self, client: Any = None) -> None:
        """Hand this channel's unacknowledged messages back to the queue, if the broker lets us.

        Kombu does this while closing a channel whose connection just failed, and then finds
        no connection to do it with (AttributeError on its released client); the worker
        would stop there. Left in the `unacked` hash instead, the messages come back through
        the rescue (or the visibility timeout), and nothing is lost either way.
        """
        try:
            super().restore_unacked(client)
        except (AttributeError, RedisError, OSError) as exc:
            delivered: dict[str, Any] = self._delivered if self._delivered is not None else {}
            log.warning("could not hand %d unacknowledged messages back to the queue (%s: %s); "
                        "the rescue brings them back", len(delivered), type(exc).__name__, exc)
            delivered.clear()


    def ack(self, delivery_tag: str) -> None:
        """Acknowledge; a message of a channel closed by a broker reconnect is left alone.

        Its ack can only fail (kombu finds the channel's client released, AttributeError,
        which would stop the worker). The message was handed back to the queue at close or
        stays in the `unacked` hash for the rescue; its events are committed already, so
        taking it again inserts nothing twice.
        """
        try:
            super().ack(delivery_tag)
        except AttributeError as exc:
            log.info("ack of %s skipped: its channel closed with a broker reconnect (%s)",
                     delivery_tag, exc)


class Channel(kombu_redis.Channel):
    Message = TolerantMessage
    QoS = TolerantQoS

    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)  # type: ignore[misc]
        except ValueError as exc:  # kombu's loads() on an item that is not JSON
            log.error("dropped a queue item that is not a message (not JSON): %s", exc)
            return True

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        try:
            return super()._get(queue)
        except ValueError as exc:
            log.error("dropped a queue item that is not a message (not JSON): %s", exc)
            raise Empty() from exc


class Transport(kombu_redis.Transport):
    Channel = Channel


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_strict_json = functools.partial(json.loads, parse_constant=_refuse_constant)


def decode_body(raw: bytes, content_type: str | None, content_encoding: str | None) -> Any:
    """A message body decoded as Celery would, except that NaN and Infinity (which no JSON
    receiver can take) are refused rather than sent on as null."""
    kind = content_type or "application/json"
    if kind == "application/json":  # Celery's producers write it as UTF-8, whatever they say
        return kombu_json.loads(raw.decode("utf-8"), _loads=_strict_json)
    return kombu_loads(raw, kind, content_encoding or "utf-8", accept={"application/json"})
