"""pymacaroons' side of paystile's macaroon interop tests (test-harness/tests/interop.rs).

Reads one JSON request on stdin and prints one JSON answer on stdout. Binary values are hex;
macaroons travel as base64 strings, the way an L402 header carries them.

  {"op": "inspect", "cases": [{"macaroon": "<base64>", "attempts": [Attempt, ...]}, ...]}
      Reads each macaroon and verifies it once per attempt, with a Verifier that checks
      paystile's caveats (see `verifier`).
      Attempt: {"root_key": "<hex>", "service": "weather", "capability": "forecast" | null,
                "now": <unix seconds>}
      -> {"library": ..., "cases": [{"location", "identifier", "caveats", "signature",
          "serialized", "export_error", "attempts": [{"ok", "error", "checked", "unmet"}, ...]},
          ...]}
         `serialized` is pymacaroons' own V2 binary encoding of what it read (hex).

  {"op": "mint", "cases": [{"root_key": "<hex>", "identifier": "<hex>", "location": "...",
                            "caveats": [...]}, ...]}
      A new V2 macaroon per case. A case may name a "macaroon" (base64) instead of a root
      key, identifier and location: its caveats are then added to that macaroon (attenuation).
      -> {"library": ..., "cases": [{"base64": <standard, padded>, "native": <pymacaroons'
          serialize()>, "signature": "<hex>"}, ...]}
"""

import base64
import json
import sys
from decimal import Decimal, InvalidOperation
from importlib.metadata import version

try:
    from pymacaroons import MACAROON_V2, Macaroon, Verifier
    from pymacaroons.serializers.binary_serializer import BinarySerializer
except ImportError as error:
    sys.exit(f"macaroons.py: {error}: run scripts/setup, which installs pymacaroons into .venv")


def satisfied(predicate, attempt):
    """paystile's (and aperture's) reading of its `<service>_…` caveats; `services` is
    satisfied exactly (see `verifier`). Anything else is not satisfied."""
    service = attempt["service"]
    condition, sep, value = predicate.partition("=")
    if not sep:
        return False
    if condition == f"{service}_valid_until":
        return value.isdigit() and attempt["now"] <= int(value)
    if condition == f"{service}_capabilities":
        return attempt["capability"] in [c.strip() for c in value.split(",")]
    if condition == f"{service}_budget_usdc":
        try:
            budget = Decimal(value)
        except InvalidOperation:
            return False
        return budget.is_finite() and budget >= 0 and budget.as_tuple().exponent >= -6
    return False


def verifier(attempt, checked, unmet):
    v = Verifier()
    v.satisfy_exact(f"services={attempt['service']}:0")

    def general(predicate):
        checked.append(predicate)
        ok = satisfied(predicate, attempt)
        if not ok and predicate not in v.predicates:
            unmet.append(predicate)
        return ok

    v.satisfy_general(general)
    return v


def verify(m, attempt):
    checked, unmet = [], []
    try:
        ok = verifier(attempt, checked, unmet).verify(m, bytes.fromhex(attempt["root_key"]))
        error = None
    except Exception as e:  # pymacaroons raises its own and plain exceptions alike.
        ok, error = False, f"{type(e).__name__}: {e}"
    return {"ok": ok, "error": error, "checked": checked, "unmet": unmet}


def inspect(case):
    m = Macaroon.deserialize(case["macaroon"])
    return {
        "version": m.version,
        "location": m.location,
        "identifier": m.identifier_bytes.hex(),
        "caveats": [c.caveat_id_bytes.decode("utf-8") for c in m.caveats],
        "third_party": [c.third_party() for c in m.caveats],
        "signature": m.signature,
        "serialized": BinarySerializer().serialize_raw(m).hex(),
        "export_error": None,
        "attempts": [verify(m, attempt) for attempt in case["attempts"]],
    }


def mint(case):
    if "macaroon" in case:
        m = Macaroon.deserialize(case["macaroon"])
    else:
        m = Macaroon(
            location=case["location"],
            identifier=bytes.fromhex(case["identifier"]),
            key=bytes.fromhex(case["root_key"]),
            version=MACAROON_V2,
        )
    for caveat in case["caveats"]:
        m.add_first_party_caveat(caveat)
    raw = BinarySerializer().serialize_raw(m)
    return {
        "base64": base64.standard_b64encode(raw).decode("ascii"),
        "native": m.serialize(),
        # pymacaroons keeps signatures as hex.
        "signature": m.signature,
    }


def main():
    request = json.load(sys.stdin)
    op = {"inspect": inspect, "mint": mint}[request["op"]]
    answer = {
        "library": f"pymacaroons {version('pymacaroons')}",
        "cases": [op(case) for case in request["cases"]],
    }
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    main()
