"""The x402 Python package's facilitator, as a seller's hosted facilitator runs it: the
package's x402FacilitatorSync with its exact EVM scheme and FacilitatorWeb3Signer (web3.py),
behind the facilitator HTTP API (GET /supported, POST /verify, POST /settle with
{x402Version, paymentPayload, paymentRequirements}). For the ledger's `facilitator`
settlement tests (test-harness/tests/x402.rs): it settles on the node at --rpc-url.

  x402_facilitator.py --key <0x-hex settler key> --rpc-url URL --network eip155:<chain id>

Listens on a free loopback port and prints "listening on http://127.0.0.1:<port>" once ready.
"""

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from x402 import x402FacilitatorSync
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.exact import register_exact_evm_facilitator
from x402.schemas.helpers import parse_payment_payload, parse_payment_requirements


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--key", required=True)
    parser.add_argument("--rpc-url", required=True)
    parser.add_argument("--network", required=True)
    args = parser.parse_args()

    facilitator = x402FacilitatorSync()
    signer = FacilitatorWeb3Signer(private_key=args.key, rpc_url=args.rpc_url)
    register_exact_evm_facilitator(facilitator, signer, networks=args.network)

    class Handler(BaseHTTPRequestHandler):
        def answer(self, status, model):
            body = model.model_dump_json(by_alias=True, exclude_none=True).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path != "/supported":
                self.send_error(404)
                return
            self.answer(200, facilitator.get_supported())

        def do_POST(self):
            if self.path not in ("/verify", "/settle"):
                self.send_error(404)
                return
            try:
                request = json.loads(self.rfile.read(int(self.headers["content-length"])))
                payload = parse_payment_payload(request["paymentPayload"])
                requirements = parse_payment_requirements(
                    payload.x402_version, request["paymentRequirements"]
                )
            except Exception as error:  # a request we cannot read: the API's 400
                self.send_error(400, str(error))
                return
            if self.path == "/verify":
                self.answer(200, facilitator.verify(payload, requirements))
            else:
                self.answer(200, facilitator.settle(payload, requirements))

        def log_message(self, *_):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


main()
