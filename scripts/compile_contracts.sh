#!/usr/bin/env bash
# Regenerates the committed contract artifacts from contracts/*.sol with the pinned solc
# (package.json), so the Python side never needs a compiler at run time.
# Usage: scripts/compile_contracts.sh   (after `npm install` in the repository root)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT

cd "$root"
if [ ! -x node_modules/.bin/solcjs ]; then
    echo "solcjs not found: run \`npm install\` in $root" >&2
    exit 1
fi

# contract name and the package folder its artifact ships in
for entry in \
    "TestToken:libs/otc-cli/src/otc_cli/contracts" \
    "BalanceReader:services/chain-watcher-evm/src/otc_watcher_evm"; do
    contract="${entry%%:*}"
    out_dir="$root/${entry#*:}"
    # Paths are relative so the artifact does not depend on where the repository lives.
    node_modules/.bin/solcjs --bin --abi --optimize --base-path . -o "$build" "contracts/$contract.sol"
    stem="$build/contracts_${contract}_sol_${contract}"
    node -e '
        const fs = require("fs");
        const [abiFile, binFile, outFile] = process.argv.slice(1);
        const artifact = {
            abi: JSON.parse(fs.readFileSync(abiFile, "utf8")),
            bytecode: "0x" + fs.readFileSync(binFile, "utf8").trim(),
        };
        fs.writeFileSync(outFile, JSON.stringify(artifact, null, 2) + "\n");
    ' "$stem.abi" "$stem.bin" "$out_dir/$contract.json"
    echo "wrote $out_dir/$contract.json"
done
