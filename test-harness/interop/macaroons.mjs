// The npm `macaroon` package's side of paystile's macaroon interop tests
// (test-harness/tests/interop.rs). Same requests and answers as macaroons.py:
//
//   {"op": "inspect", "cases": [{"macaroon": "<base64>", "attempts": [Attempt, ...]}, ...]}
//     Attempt: {"root_key": "<hex>", "service", "capability" | null, "now"}
//     -> {"library", "cases": [{"location", "identifier", "caveats", "signature", "serialized",
//         "export_error", "attempts": [{"ok", "error", "checked", "unmet"}, ...]}, ...]}
//   {"op": "mint", "cases": [{"root_key", "identifier", "location", "caveats"} |
//                            {"macaroon", "caveats"}, ...]}
//     -> {"library", "cases": [{"base64", "native", "signature"}, ...]}
//
// Binary values are hex; `native` is the package's own base64 (URL-safe, unpadded).
//
// macaroon 3.0.4 (the latest on npm) cannot export a macaroon with more than three caveats:
// its ByteBuffer compares against a `_capacity` it never sets, so it doubles its buffer on
// every append, and the 25th append asks for a 6.7 GB Uint8Array (RangeError). Upstream
// fixed it (go-macaroon/js-macaroon#41, PR #40) but never published the fix. `inspect` reports
// the error as `export_error`; a request with `"patch_export": true` first applies the
// upstream fix (the buffer's capacity is its length), which touches nothing but buffer growth.

import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
let macaroon;
let library;
try {
  macaroon = require('macaroon');
  library = `macaroon ${require('macaroon/package.json').version}`;
} catch (error) {
  console.error(
    `macaroons.mjs: cannot load the npm package "macaroon" (${error.message}): ` +
      'run scripts/setup, which runs `npm ci --prefix test-harness/interop`',
  );
  process.exit(3);
}

function patchExport() {
  Object.defineProperty(Object.prototype, '_capacity', {
    configurable: true,
    get() {
      return this._buf instanceof Uint8Array ? this._buf.length : undefined;
    },
  });
}

function exported(m) {
  try {
    return { serialized: hex(m.exportBinary()), export_error: null };
  } catch (error) {
    return { serialized: null, export_error: `${error.name}: ${error.message}` };
  }
}

const hex = (bytes) => Buffer.from(bytes).toString('hex');
const fromHex = (text) => new Uint8Array(Buffer.from(text, 'hex'));
const utf8 = (bytes) => new TextDecoder('utf-8', { fatal: true }).decode(bytes);

// paystile's (and aperture's) reading of its caveats; anything else is not satisfied.
function satisfied(condition, attempt) {
  const { service, capability, now } = attempt;
  const at = condition.indexOf('=');
  if (at < 0) {
    return false;
  }
  const [name, value] = [condition.slice(0, at), condition.slice(at + 1)];
  if (name === 'services') {
    return value.split(',').some((entry) => entry.split(':')[0].trim() === service);
  }
  if (name === `${service}_valid_until`) {
    return /^[0-9]+$/.test(value) && now <= Number(value);
  }
  if (name === `${service}_capabilities`) {
    return value.split(',').map((c) => c.trim()).includes(capability);
  }
  if (name === `${service}_budget_usdc`) {
    return /^[0-9]+(\.[0-9]{1,6})?$/.test(value);
  }
  return false;
}

function verify(m, attempt) {
  const checked = [];
  const unmet = [];
  const check = (condition) => {
    checked.push(condition);
    if (satisfied(condition, attempt)) {
      return null;
    }
    unmet.push(condition);
    return 'not satisfied';
  };
  try {
    m.verify(fromHex(attempt.root_key), check);
    return { ok: true, error: null, checked, unmet };
  } catch (error) {
    return { ok: false, error: String(error.message), checked, unmet };
  }
}

function inspect(c) {
  const m = macaroon.importMacaroon(c.macaroon);
  return {
    version: m._version,
    location: m.location,
    identifier: hex(m.identifier),
    caveats: m.caveats.map((cav) => utf8(cav.identifier)),
    third_party: m.caveats.map((cav) => cav.vid !== undefined),
    signature: hex(m.signature),
    ...exported(m),
    attempts: c.attempts.map((attempt) => verify(m, attempt)),
  };
}

function mint(c) {
  const m =
    c.macaroon !== undefined
      ? macaroon.importMacaroon(c.macaroon)
      : macaroon.newMacaroon({
          identifier: fromHex(c.identifier),
          location: c.location,
          rootKey: fromHex(c.root_key),
          version: 2,
        });
  for (const caveat of c.caveats) {
    m.addFirstPartyCaveat(caveat);
  }
  const raw = m.exportBinary();
  return {
    base64: Buffer.from(raw).toString('base64'),
    native: macaroon.bytesToBase64(raw),
    signature: hex(m.signature),
  };
}

const request = JSON.parse(readFileSync(0, 'utf8'));
const op = { inspect, mint }[request.op];
const patched = request.patch_export === true;
if (patched) {
  patchExport();
}
process.stdout.write(JSON.stringify({ library, patched, cases: request.cases.map(op) }));
