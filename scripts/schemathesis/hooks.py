"""Schemathesis hooks for the contract run of scripts/test.sh.

JSON Schema cannot state a rule that compares two values, nor one that depends on what the
server stores. docs/openapi.json states these rules in words (and `x-start-before-end`);
this hook applies them to each generated request before it is sent (in every phase: the
coverage phase does not go through the generation hooks), so that a request generated as
valid is valid here too:

- a batch's times lie between 1970 and 9999 (UTC), which the `Timestamp` description
  states and `format: date-time` cannot: a time outside is moved to 2026-11-11;
- a window (`claim_window`, a fixed `validity`) starts before it ends: an end not after its
  start is moved to one day after the start;
- a PATCH moves the window end after the stored start and adds stock within
  `batches.max_stock` (1,000,000,000). The run PATCHes batches it created (the stateful
  phase follows their ids), so it creates them such that any PATCH it sends fits: a batch
  starts no later than 2026-11-11 (a later start is moved there, its end kept after it)
  and holds at most 500,000,000 coupons; a PATCH's end before 2026-11-12 is moved to
  2100-01-01 and its `add_stock` is at most 1,000,000.

- a batch's `timezone` names a zone of the IANA database (the schema cannot list them): a
  string is replaced by "Asia/Shanghai";
- a batch's `budget` pays for its stock and for every `add_stock` a PATCH of this run may
  send (at most 2 of MAX_ADD): a well-formed budget becomes (stock + 2 * MAX_ADD) * face
  value, and is dropped when that passes `batches.max_budget` (10^12) or the discount has
  no bounded face value (a percent discount without `max_off`).

- a batch's `ack` is one the backend can honour: this run's gateway is embedded (no
  replicas), so "replica" and "replica_aof" become "leader" (the replica modes are tested
  against real replicas by tests/replication.rs and tests/conformance.rs batch_ack);

- a batch's `codes`, when well-formed, are dropped: a batch with codes takes no `add_stock`,
  which a PATCH of this run may send to any batch it created (code batches are tested by
  tests/conformance.rs code_pools and tests/persist.rs; imports into this run's batches,
  which have no codes, answer 409 as documented);

- a streamed grant upload (`text/csv`, `application/x-ndjson`) generated as a non-string
  (a type violation) is sent as an empty body: text on the wire cannot carry the type,
  and the text of a number may be a valid upload.

Only values that are well-formed are touched (a request generated as invalid stays
invalid for its own reason). Every other rule is in the schema itself; the rules here are
tested against the server by tests/conformance.rs (bad_input) and tests/consistency.rs.
"""

from datetime import datetime, timedelta, timezone

import schemathesis

# NDJSON (the streamed grant upload) goes on the wire as the text it is.
schemathesis.serializer.alias("application/x-ndjson", "text/plain")
TEXT_UPLOADS = ("text/csv", "application/x-ndjson")  # grants and code imports

EXAMPLE_WINDOW_END = datetime(2026, 11, 12, tzinfo=timezone.utc)
LATE_END = "2100-01-01T00:00:00Z"
MAX_ADD = 1_000_000
MAX_CREATE = 500_000_000
LATEST_START = datetime(2026, 11, 11, tzinfo=timezone.utc)
LATEST_START_TEXT = "2026-11-11T00:00:00Z"
MAX_BUDGET = 1_000_000_000_000
A_ZONE = "Asia/Shanghai"


def _int(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == int(v)


def _face(discount):
    """The face value of a well-formed discount (None: unbounded or malformed)."""
    if not isinstance(discount, dict):
        return None
    kind = discount.get("kind")
    v = discount.get("max_off") if kind == "percent" else discount.get("amount")
    return int(v) if _int(v) and v > 0 else None


IN_RANGE = "2026-11-11T00:00:00Z"
OUT_OF_RANGE = "out of range"


def _time(value):
    """The instant of a well-formed RFC 3339 time, OUT_OF_RANGE, or None (malformed)."""
    if not isinstance(value, str):
        return None
    try:
        t = datetime.fromisoformat(value.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        return None
    if t.tzinfo is None:
        return None
    try:
        utc = t.astimezone(timezone.utc)
    except OverflowError:
        return OUT_OF_RANGE
    return utc if 1970 <= utc.year <= 9998 else OUT_OF_RANGE


def _in_range(obj, key):
    if isinstance(obj, dict) and _time(obj.get(key)) is OUT_OF_RANGE:
        obj[key] = IN_RANGE


def _order(window):
    """Moves a well-formed end that is not after its start to a day after it."""
    if not isinstance(window, dict):
        return
    _in_range(window, "start")
    _in_range(window, "end")
    start, end = _time(window.get("start")), _time(window.get("end"))
    if start is not None and end is not None and end <= start:
        window["end"] = (start.astimezone(timezone.utc) + timedelta(days=1)).strftime(
            "%Y-%m-%dT%H:%M:%S.%fZ"
        )


@schemathesis.hook
def before_call(ctx, case, kwargs):
    body = case.body
    if case.media_type in TEXT_UPLOADS and not isinstance(body, (str, bytes)):
        # A streamed grant upload is text on the wire: a body generated as another JSON type
        # arrives as its text, which may well be a valid upload (the number 1.68e+249 is a
        # valid CSV user id). It goes as an empty body instead: invalid by the schema's own
        # rule (minLength), as it was meant to be invalid.
        case.body = ""
        return
    if not isinstance(body, dict):
        return
    method, path = case.method.upper(), case.operation.path
    if method == "POST" and path == "/v1/batches":
        window = body.get("claim_window")
        if isinstance(window, dict):
            _in_range(window, "start")
            start = _time(window.get("start"))
            if start not in (None, OUT_OF_RANGE) and start > LATEST_START:
                window["start"] = LATEST_START_TEXT
        _order(window)
        stock = body.get("stock")
        if isinstance(stock, (int, float)) and not isinstance(stock, bool) and stock > MAX_CREATE:
            body["stock"] = MAX_CREATE
        validity = body.get("validity")
        if isinstance(validity, dict) and "days_after_claim" not in validity:
            _order(validity)
        if isinstance(body.get("timezone"), str):
            body["timezone"] = A_ZONE
        if body.get("ack") in ("replica", "replica_aof"):
            body["ack"] = "leader"
        codes = body.get("codes")
        if isinstance(codes, dict) and codes.get("source") in ("generated", "imported"):
            del body["codes"]
        budget, stock, face = body.get("budget"), body.get("stock"), _face(body.get("discount"))
        if _int(budget) and budget >= 1 and _int(stock) and stock >= 1:
            need = None if face is None else (int(stock) + 2 * MAX_ADD) * face
            if need is None or need > MAX_BUDGET:
                del body["budget"]
            else:
                body["budget"] = max(int(budget), need)
    elif method == "PATCH" and path == "/v1/batches/{id}":
        window = body.get("claim_window")
        if isinstance(window, dict):
            end = _time(window.get("end"))
            if end is OUT_OF_RANGE or (end is not None and end <= EXAMPLE_WINDOW_END):
                window["end"] = LATE_END
        end = _time(body.get("claim_window_end"))
        if end is OUT_OF_RANGE or (end is not None and end <= EXAMPLE_WINDOW_END):
            body["claim_window_end"] = LATE_END
        add = body.get("add_stock")
        if isinstance(add, (int, float)) and not isinstance(add, bool) and add > MAX_ADD:
            body["add_stock"] = MAX_ADD
