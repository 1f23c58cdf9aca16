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
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
go test -race -count=1 -timeout 40m ./... 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
passed=$(grep -c '^ok ' "$log" || true)
failed=$(grep -c '^FAIL' "$log" || true)
if [ "$status" -ne 0 ]; then
  echo "packages: $passed passed, $failed failed"
  exit "$status"
fi
# Each fuzz target for a few seconds on top of its seed corpus.
fuzztime="${FUZZTIME:-5s}"
fuzzed=0
for pkg in $(go list ./...); do
  for f in $(go test -list '^Fuzz' "$pkg" 2>/dev/null | grep '^Fuzz' || true); do
    go test -run '^$' -fuzz "^${f}\$" -fuzztime "$fuzztime" "$pkg" >/dev/null
    echo "fuzz $f ($pkg): ok"
    fuzzed=$((fuzzed+1))
  done
done
echo "packages: $passed passed, 0 failed ($fuzzed fuzz targets run for $fuzztime each)"
