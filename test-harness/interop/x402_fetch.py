"""Pays for a call with the x402 Python package, as an agent on it does: a requests Session
wrapped with the package's x402 adapter, which answers a 402 by signing a payment it
accepts and sending the request again with it.

  x402_fetch.py --key <0x-hex private key> [--allow <network>:<token address>]... URL

`--allow` adds a token the payer accepts beyond the package's defaults (USDC on the chains
it knows), as an agent's owner would list a sandbox's token. Prints one JSON line: the
answer's status, its paystile and x402 headers (PAYMENT-RESPONSE decoded) and its body.
"""

import argparse
import base64
import json
import sys

import requests
from eth_account import Account
from x402 import x402ClientSync
from x402.http.clients import wrapRequestsWithPayment
from x402.mechanisms.evm.exact import register_exact_evm_client


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--key", required=True)
    parser.add_argument("--allow", action="append", default=[])
    parser.add_argument("url")
    args = parser.parse_args()

    account = Account.from_key(args.key)
    client = x402ClientSync()
    allowed = [dict(zip(("network", "asset"), a.rsplit(":", 1))) for a in args.allow]
    client.set_spend_controls({"allowed_assets": allowed})
    register_exact_evm_client(client, account)
    session = wrapRequestsWithPayment(requests.Session(), client)
    response = session.get(args.url, timeout=30)

    headers = {k.lower(): v for k, v in response.headers.items()}
    answer = {
        "payer": account.address,
        "status": response.status_code,
        "chargeId": headers.get("x-charge-id"),
        "amountUsdc": headers.get("x-amount-usdc"),
        "body": response.text,
    }
    for name in ("payment-response", "x-payment-response"):
        if name in headers:
            answer[name] = json.loads(base64.b64decode(headers[name]))
    json.dump(answer, sys.stdout)
    print()


main()
