"""The audit log: one structured line per security decision, on the ``kaldrix.audit`` logger.

A line reads ``<event> address=<client> reason="<why>" key=value ...``: values that are
not plain words are JSON-quoted, so a hostile value (an Origin, a subject) can neither
break the line nor forge another one. Tokens are never passed here; callers log the
verifier's reason, which never quotes the token. The same fields travel as
``record.audit`` (a dict) for handlers that want them unflattened.
"""

from __future__ import annotations

import json
import logging
import re

audit_log = logging.getLogger("kaldrix.audit")

MAX_VALUE_LENGTH = 200
_PLAIN = re.compile(r"^[A-Za-z0-9_.:/\[\]@+-]{1,200}$")


def _value(value: object) -> str:
    text = str(value)
    if len(text) > MAX_VALUE_LENGTH:
        text = text[:MAX_VALUE_LENGTH] + "..."
    return text if _PLAIN.match(text) else json.dumps(text)


def audit_line(event: str, address: str, reason: str, **fields: object) -> str:
    """The text of one audit line (None values are left out)."""
    parts = [event, f"address={_value(address)}", f"reason={_value(reason)}"]
    parts.extend(f"{key}={_value(value)}" for key, value in fields.items() if value is not None)
    return " ".join(parts)


def audit(event: str, address: str, reason: str, *, level: int = logging.WARNING, **fields: object) -> None:
    """Log one security event: what happened, to which client address, and why."""
    if not audit_log.isEnabledFor(level):
        return
    record = {"event": event, "address": address, "reason": reason}
    record.update({key: value for key, value in fields.items() if value is not None})
    audit_log.log(level, "%s", audit_line(event, address, reason, **fields), extra={"audit": record})
