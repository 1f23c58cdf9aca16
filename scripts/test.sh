#!/usr/bin/env bash
# Runs every test of vmbond: vet, unit, interoperability, end-to-end (real
# QEMU guests) and attack tests, with the race detector, plus a short run of
# each fuzz target.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
export CI="${CI:-1}"   # tests fail instead of skipping when a tool is missing
bash guest/build.sh build/guest >/dev/null
test -z "$(gofmt -l $(git ls-files '*.go'))" || { gofmt -l $(git ls-files '*.go'); echo "gofmt needed" >&2; exit 1; }
go vet ./...
go test -race -count=1 -timeout 40m ./...
# Each fuzz target for a few seconds on top of its seed corpus.
fuzztime="${FUZZTIME:-5s}"
for pkg in $(go list ./...); do
  for f in $(go test -list '^Fuzz' "$pkg" 2>/dev/null | grep '^Fuzz' || true); do
    go test -run '^$' -fuzz "^${f}\$" -fuzztime "$fuzztime" "$pkg" >/dev/null
    echo "fuzz $f ($pkg): ok"
  done
done
