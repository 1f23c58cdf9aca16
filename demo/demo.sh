#!/usr/bin/env bash
# vmbond's main job on one machine: a security officer's CA, a trusted agent,
# an untrusted server, a tenant who boots a real VM from an encrypted disk,
# operates it, sees its disk is ciphertext on the host, and sees a redirected
# command refused. Run through `make demo` (which installs and builds first).
set -euo pipefail
cd "$(dirname "$0")/.."
VMBOND="$PWD/bin/vmbond"
source build/guest/guest.env
W=$(mktemp -d /tmp/vmbond-demo.XXXXXX)
AGENT_PORT=${AGENT_PORT:-17001}; SERVER_PORT=${SERVER_PORT:-17000}; RELAY_PORT=${RELAY_PORT:-17009}
SERVER=http://127.0.0.1:$SERVER_PORT
pids=()
cleanup() {
  "$VMBOND" --home "$W/alice" vm stop web >/dev/null 2>&1 || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo; echo "demo files left in $W"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*" | sed "s#$VMBOND#vmbond#g; s#$W#\$W#g"; "$@"; }
wait_http() { for _ in $(seq 100); do curl -fsS "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "no answer from $1" >&2; return 1; }

step "Security officer: an offline host CA and admin CA"
run "$VMBOND" ca init --ca "$W/ca"

step "Host: the trusted agent creates its identity; the officer certifies it"
run "$VMBOND" agent init --data "$W/agent" --host-id host1 >/dev/null
run "$VMBOND" ca sign-host --ca "$W/ca" --context production "$W/agent/identity.json" --out "$W/host1.cert"
run "$VMBOND" agent install-cert --data "$W/agent" "$W/host1.cert"
run "$VMBOND" agent install-admin-ca --data "$W/agent" "$W/ca/admin-ca.pub"
"$VMBOND" agent --data "$W/agent" --listen 127.0.0.1:$AGENT_PORT 2>"$W/agent.log" & pids+=($!)
"$VMBOND" server --data "$W/server" --listen 127.0.0.1:$SERVER_PORT 2>"$W/server.log" & pids+=($!)
wait_http "$SERVER/v1/health"; wait_http "http://127.0.0.1:$AGENT_PORT/v1/identity"

step "Admins: each makes a key; the officer issues short-lived credentials and a revocation list"
for who in ops carol dave; do
  "$VMBOND" admin keygen "$W/$who-keys" >/dev/null
  run "$VMBOND" ca sign-admin --ca "$W/ca" --name $who --key "$W/$who-keys/admin.pub" --validity 8h --out "$W/$who.cred"
  "$VMBOND" --home "$W/$who" login --server "$SERVER" --token-file "$W/server/admin.token" --host-ca "$W/ca/host-ca.pub" \
    --admin-key "$W/$who-keys/admin.key" --admin-cred "$W/$who.cred" >/dev/null
done
run "$VMBOND" ca revoke --ca "$W/ca" --number 1 --out "$W/revocations-1.json"
mv "$W/ops" "$W/admin"

step "Admin: enrol the host, deliver the revocation list, create tenant alice"
run "$VMBOND" --home "$W/admin" host add http://127.0.0.1:$AGENT_PORT
"$VMBOND" --home "$W/admin" admin push-revocations "$W/revocations-1.json" >/dev/null
TOKEN=$("$VMBOND" --home "$W/admin" tenant create alice)

step "Tenant alice: pin the host CA, create a VM from the demo guest (encrypted here, ciphertext uploaded)"
run "$VMBOND" --home "$W/alice" login --server "$SERVER" --token "$TOKEN" --tenant alice --host-ca "$W/ca/host-ca.pub"
run "$VMBOND" --home "$W/alice" vm create web --image "$GUEST_DISK_STAY" --memory 256 --admin-allow status,pause
run "$VMBOND" --home "$W/alice" vm start web
for _ in $(seq 120); do
  "$VMBOND" --home "$W/alice" vm console web | grep -q "heartbeat 2" && break; sleep 0.5
done
step "Its serial console, fetched sealed under alice's key"
run "$VMBOND" --home "$W/alice" vm console web | grep vmbond-guest | head -8
MARKER=$("$VMBOND" --home "$W/alice" vm console web | sed -n 's/.*readback \(vmbond-guest-marker:[0-9a-f]*\).*/\1/p' | head -1)

step "Operate it: status, pause, resume; the admin may pause (alice's policy) but not stop"
run "$VMBOND" --home "$W/alice" vm status web
run "$VMBOND" --home "$W/alice" vm pause web
run "$VMBOND" --home "$W/alice" vm resume web
VMID=$("$VMBOND" --home "$W/alice" -o json vm list | sed -n 's/.*"id": "\(vm-[0-9a-f]*\)".*/\1/p' | head -1)
run "$VMBOND" --home "$W/admin" admin run pause "$VMID"
run "$VMBOND" --home "$W/alice" vm resume web
run "$VMBOND" --home "$W/admin" admin run stop "$VMID" || echo "(refused by the agent, as alice's policy says)"
run "$VMBOND" --home "$W/alice" vm list

step "On the host's storage the disk is ciphertext: the guest's marker is not there"
IMG=$(ls "$W"/agent/vms/*/disk.img)
echo "guest wrote: $MARKER"
printf 'occurrences in %s: ' "${IMG#$W/}"; grep -c -a "$MARKER" "$IMG" || true
step "...but a standard tool opens it with alice's exported key (LUKS1)"
run "$VMBOND" --home "$W/alice" disk export-key web --out "$W/web.key"
run qemu-img convert --object secret,id=s0,file="$W/web.key" --image-opts "driver=luks,file.filename=$IMG,key-secret=s0" -O raw "$W/web.plain"
printf 'occurrences in the decrypted copy: '; grep -c -a "$MARKER" "$W/web.plain"
rm -f "$W/web.plain"

step "A compromised server redirects alice's commands to another tenant's VM"
TOKEN_BOB=$("$VMBOND" --home "$W/admin" tenant create bob)
"$VMBOND" --home "$W/bob" login --server "$SERVER" --token "$TOKEN_BOB" --tenant bob --host-ca "$W/ca/host-ca.pub" >/dev/null
"$VMBOND" --home "$W/bob" vm create db --size 16M >/dev/null
BOBID=$("$VMBOND" --home "$W/bob" -o json vm list | sed -n 's/.*"id": "\(vm-[0-9a-f]*\)".*/\1/p' | head -1)
go build -o bin/hostile-relay ./demo/hostile-relay
bin/hostile-relay -listen 127.0.0.1:$RELAY_PORT -agent http://127.0.0.1:$AGENT_PORT -from "$VMID" -to "$BOBID" 2>"$W/relay.log" & pids+=($!)
wait_http "http://127.0.0.1:$RELAY_PORT/v1/identity"
"$VMBOND" --home "$W/admin" host add http://127.0.0.1:$RELAY_PORT >/dev/null
set +e
run "$VMBOND" --home "$W/alice" vm stop web
echo "exit status: $?"
set -e
echo "the agent's audit log:"
grep '"decision":"refused"' "$W/agent/audit.log" | grep redirected | tail -1
"$VMBOND" --home "$W/admin" host add http://127.0.0.1:$AGENT_PORT >/dev/null

step "With the honest route back, alice's VM is untouched and still hers"
run "$VMBOND" --home "$W/alice" vm verify web
run "$VMBOND" --home "$W/alice" vm status web
run "$VMBOND" --home "$W/alice" vm stop web

step "An admin's day: bob's VMs allow admins to delete them (say, for cleanup)"
"$VMBOND" --home "$W/bob" vm create tmp1 --size 16M --admin-allow status,delete >/dev/null
for n in 2 3 4; do "$VMBOND" --home "$W/bob" vm create tmp$n --size 16M --admin-allow status,delete >/dev/null; done
ids=$("$VMBOND" --home "$W/bob" -o json vm list | sed -n 's/.*"id": "\(vm-[0-9a-f]*\)".*/\1/p')
n=0; last=""
for id in $ids; do
  [ "$id" = "$BOBID" ] && continue
  n=$((n+1)); last=$id
  set +e; run "$VMBOND" --home "$W/admin" admin run delete "$id"; set -e
done
step "Past the budget (3 deletions per admin per hour on each host) a quorum of other admins must approve"
REQ=$("$VMBOND" --home "$W/admin" -o json admin request delete "$last" | sed -n 's/^  "id": "\([0-9a-f]*\)".*/\1/p')
run "$VMBOND" --home "$W/admin" admin list
set +e; run "$VMBOND" --home "$W/admin" admin approve "$REQ"; set -e
run "$VMBOND" --home "$W/carol" admin approve "$REQ"
run "$VMBOND" --home "$W/dave" admin approve "$REQ"
run "$VMBOND" --home "$W/admin" admin execute "$REQ"

step "Deletes are soft: bob restores his VMs within the retention period"
for name in tmp1 tmp2 tmp3 tmp4; do run "$VMBOND" --home "$W/bob" vm restore $name; done

step "Every decision is in the agent's hash-chained, signed audit log"
run "$VMBOND" --home "$W/bob" vm audit tmp1
run "$VMBOND" --home "$W/admin" audit verify
echo; echo "demo complete"
