"""The embedded broker: kombu's filesystem transport, with each message written atomically.

kombu's filesystem ``Channel._put`` creates the message file under its final
name and only then writes the body.  A consumer polling the folder can move
and read the file in between, gets an empty payload and dies with
``JSONDecodeError`` ("Unrecoverable error"; kombu issue #1551, still open).
Seen in our CI: a demo worker died and a request was never answered.

Here the body goes to ``<name>.part`` first, which no consumer takes (they
only take ``*.<queue>.msg``), and is then renamed into place: a rename within
one folder is atomic, so a consumer sees the whole message or none of it.
Selected by ``broker_transport`` when no broker is configured (tasks.settings).
"""

from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

__all__ = ["Channel", "Transport"]


class Channel(filesystem.Channel):
    # kombu names the argument `message` in its base class and `payload` here.
    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Put ``payload`` onto ``queue``: written aside, then renamed into place."""
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"  # kombu's naming
        final = os.path.join(self.data_folder_out, name)
        partial = final + ".part"
        try:
            with open(partial, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    Channel = Channel
