"""The x402 Python package's client side of paystile's x402 interop tests
(test-harness/tests/interop.rs): it reads our 402s and pays them, as an agent on it would.

Reads one JSON request on stdin and prints one JSON answer on stdout.

  {"key": "<0x-hex private key>", "url": "<the request's URL>",
   "headers": {<the 402's headers>}, "body": "<the 402's body>" | null,
   "allow": [{"network": "eip155:<chain id>", "asset": "<address>"}, ...]}
      The client handles the 402 (x402HTTPClientSync.handle_402_response, with the exact EVM
      scheme registered for the key's account, for v2 and v1) and signs a payment. Its spend
      controls take the package's default assets (USDC on the chains it knows) and those in
      `allow` (a sandbox's token), as an agent's owner would list them.
      -> {"library": "x402 <version>", "payer": "<address>", "headers": {<headers it adds>}}
"""

import json
import sys
from importlib.metadata import version

from eth_account import Account
from x402 import x402ClientSync
from x402.http import x402HTTPClientSync
from x402.mechanisms.evm.exact import register_exact_evm_client


def main():
    request = json.load(sys.stdin)
    account = Account.from_key(request["key"])
    client = x402ClientSync()
    client.set_spend_controls({"allowed_assets": request.get("allow", [])})
    register_exact_evm_client(client, account)
    body = request.get("body")
    headers, _ = x402HTTPClientSync(client).handle_402_response(
        request["headers"], body.encode() if body is not None else None, request["url"]
    )
    json.dump(
        {"library": f"x402 {version('x402')}", "payer": account.address, "headers": headers},
        sys.stdout,
    )


main()
