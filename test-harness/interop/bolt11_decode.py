"""Decodes BOLT11 invoices with the PyPI `bolt11` package (lnbits; derived from Rusty
Russell's lightning-payencode, independent of the Rust lightning-invoice crate the sandbox
signs with), for paystile's interop tests (test-harness/tests/interop.rs).

Reads {"invoices": [{"bolt11": "lnbcrt…", "payees": ["<hex node id>", ...]}, ...]} on stdin
and prints {"library": ..., "invoices": [Decoded | {"error": "..."}, ...]}, where Decoded
holds the fields below and, for each of `payees`, whether the invoice's signature verifies
under that public key (an explicit ECDSA check, beside the recovery `decode` does).
"""

import json
import sys
from importlib.metadata import version

try:
    from bolt11 import decode
except ImportError as error:
    sys.exit(f"bolt11_decode.py: {error}: run scripts/setup, which installs bolt11 into .venv")


def signed_by(invoice, payee):
    try:
        return invoice.signature.verify(payee)
    except Exception:  # `verify` raises ValueError on a bad signature.
        return False


def decoded(entry):
    try:
        # strict: also require the min_final_cltv_expiry field.
        invoice = decode(entry["bolt11"], strict=True)
    except Exception as error:  # bolt11 raises its own and plain exceptions alike.
        return {"error": f"{type(error).__name__}: {error}"}
    return {
        "currency": invoice.currency,
        "amount_msat": None if invoice.amount_msat is None else int(invoice.amount_msat),
        "date": invoice.date,
        "payment_hash": invoice.payment_hash,
        "payment_secret": invoice.payment_secret,
        "description": invoice.description,
        "description_hash": invoice.description_hash,
        # The `n` field, else the key `decode` recovered from the signature.
        "payee": invoice.payee,
        "expiry": invoice.expiry,
        "min_final_cltv_expiry": invoice.min_final_cltv_expiry,
        "tags": sorted({tag.char.value for tag in invoice.tags}),
        "features": invoice.features.readable if invoice.features else None,
        "signed_by": [signed_by(invoice, payee) for payee in entry["payees"]],
    }


def main():
    request = json.load(sys.stdin)
    answer = {
        "library": f"bolt11 {version('bolt11')}",
        "invoices": [decoded(entry) for entry in request["invoices"]],
    }
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    main()
