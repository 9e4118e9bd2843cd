// Compiles paystile's sandbox USDC (contracts/SandboxUsdc.sol) with the pinned solc (npm),
// for the x402 sandbox: the demo and the tests deploy what this prints.
//
//   node solc_build.mjs  ->  {"compiler": "<version>", "bytecode": "0x…"}
//
// Deterministic wherever the repository is: the source is named by its path in the
// repository, and the metadata hash is left out of the bytecode.
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import solc from "solc";

const source = "contracts/SandboxUsdc.sol";
const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const input = {
  language: "Solidity",
  sources: { [source]: { content: readFileSync(join(root, source), "utf8") } },
  settings: {
    optimizer: { enabled: true, runs: 200 },
    metadata: { appendCBOR: false },
    outputSelection: { [source]: { SandboxUsdc: ["evm.bytecode.object"] } },
  },
};
const output = JSON.parse(solc.compile(JSON.stringify(input)));
const errors = (output.errors ?? []).filter((e) => e.severity === "error");
if (errors.length > 0) {
  console.error(errors.map((e) => e.formattedMessage).join("\n"));
  process.exit(1);
}
const bytecode = output.contracts[source].SandboxUsdc.evm.bytecode.object;
console.log(JSON.stringify({ compiler: solc.version(), bytecode: `0x${bytecode}` }));
