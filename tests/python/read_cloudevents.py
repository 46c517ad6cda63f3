"""Reads a stream's messages back with the Python CloudEvents SDK, as another team would.

Usage: python3 read_cloudevents.py NATS_URL STREAM COUNT

Prints one JSON object per message: the attributes the SDK read (percent-decoded once,
as the binding says) and the data. The SDK has no NATS binding of its own; its binary
content mode reader (`ce-` headers, percent-encoded values) is the NATS binding's too.
Exit 3 when the SDK or nats-py is missing, so that the caller can skip.
"""

import asyncio
import json
import sys

try:
    import nats
    from cloudevents.core.bindings.http import HTTPMessage, from_binary_event
except ImportError as missing:  # pragma: no cover - reported to the caller
    print(f"missing Python package: {missing}", file=sys.stderr)
    sys.exit(3)


async def main(url: str, stream: str, count: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    for seq in range(1, count + 1):
        msg = await js.get_msg(stream, seq)
        headers = dict(msg.headers or {})
        event = from_binary_event(HTTPMessage(headers=headers, body=msg.data))
        print(
            json.dumps(
                {
                    "id": event.get_id(),
                    "type": event.get_type(),
                    "source": event.get_source(),
                    "subject": event.get_subject(),
                    "datacontenttype": event.get_datacontenttype(),
                    "eventversion": event.get_extension("eventversion"),
                    "raw_source": headers.get("ce-source"),
                    "raw_datacontenttype": headers.get("ce-datacontenttype"),
                    "data": event.get_data(),
                },
                ensure_ascii=False,
            )
        )
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
