#!/usr/bin/env bash
# vmbond performance report: one markdown table comparing vmbond's NBD server
# (encrypted and plain) with qemu-nbd (raw and QEMU LUKS) and nbdkit, all
# measured in the same run on the same backing data, plus the cipher alone and
# the demo guest's boot time. Run by `make bench` (which first installs the
# tools, builds bin/vmbond and the guest). It reports and always exits 0; the
# targets at the end say PASS or FAIL.
#
#   BENCH_QUICK=1   ~2 minute smoke run (1 round, 256 MiB, short runs)
#   BENCH_ROUNDS, BENCH_SIZE_MIB, BENCH_RUNTIME, BENCH_BOOTS override the plan.
#
# The report goes to stdout, progress to stderr; BENCH_OUT=FILE also writes
# the report there.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
VMBOND=$ROOT/bin/vmbond
GUEST_IMG=$ROOT/build/guest/disk.img

if [ "${BENCH_QUICK:-0}" = 1 ]; then
	ROUNDS=1 SIZE_MIB=256 RUNTIME=2 RAMP=0 BOOTS=1
	QB_SEQ_COUNT=128 QB_RAND_COUNT=4000 GO_BENCHTIME=200ms GO_COUNT=1 SSL_SECONDS=1
else
	ROUNDS=3 SIZE_MIB=1024 RUNTIME=5 RAMP=1 BOOTS=5
	QB_SEQ_COUNT=512 QB_RAND_COUNT=40000 GO_BENCHTIME=1s GO_COUNT=3 SSL_SECONDS=3
fi
ROUNDS=${BENCH_ROUNDS:-$ROUNDS}
SIZE_MIB=${BENCH_SIZE_MIB:-$SIZE_MIB}
RUNTIME=${BENCH_RUNTIME:-$RUNTIME}
BOOTS=${BENCH_BOOTS:-$BOOTS}
IODEPTH=8
# qemu-img bench has no random mode: it advances by a fixed step, wrapping
# modulo the image size. A step of a large prime number of 4 KiB blocks
# scatters requests over the whole image, so that row is "strided".
QB_STRIDE=$((4096 * 100003))

log() { printf 'bench: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in fio qemu-nbd qemu-img qemu-system-x86_64 nbdkit openssl go; do
	command -v "$tool" >/dev/null || die "$tool not found (run scripts/deps.sh)"
done
[ -x "$VMBOND" ] || die "$VMBOND missing (run make build)"
[ -f "$GUEST_IMG" ] || die "$GUEST_IMG missing (run make guest)"

# --- temp dir, processes, cleanup ------------------------------------------
TMP=$(mktemp -d "${TMPDIR:-/tmp}/vmbond-bench.XXXXXX")
declare -A PID=()   # server name -> pid of the running server
cleanup() {
	local n
	for n in "${!PID[@]}"; do
		kill "${PID[$n]}" 2>/dev/null || true
	done
	for n in "${!PID[@]}"; do
		wait "${PID[$n]}" 2>/dev/null || true
	done
	rm -rf "$TMP"
}
trap cleanup EXIT
# Make Ctrl-C and kill run the EXIT trap too.
trap 'exit 130' INT
trap 'exit 143' TERM

sock() { echo "$TMP/$1.sock"; }
uri() { echo "nbd+unix:///?socket=$(sock "$1")"; }

# Secrets: the vmbond key file is the LUKS passphrase (64 hex digits); QEMU
# reads its LUKS passphrase from a file too, so nothing secret is in argv.
hex32() { od -An -tx1 -N32 /dev/urandom | tr -d ' \n'; }
hex32 >"$TMP/guest-enc.key"
printf '%s' "$(hex32)" >"$TMP/qemu-luks.pass"

# The five servers. The three plaintext servers share one raw file, so they
# serve byte-identical data from the same (warm) page cache. qemu-nbd's
# --cache=writeback is its default, spelled out: host page cache, no O_DIRECT,
# like vmbond and nbdkit's file plugin (cache=default). -t keeps qemu-nbd
# serving after the first client disconnects.
SERVERS=(venc vplain qnbd qluks nbdkit)
declare -A LABEL=([venc]="vmbond encrypted" [vplain]="vmbond plain" [qnbd]="qemu-nbd raw"
	[qluks]="qemu-nbd LUKS" [nbdkit]="nbdkit file")
server_cmd() {   # name [image] -> sets CMD to the server's command line
	local s=$1 img=${2:-}
	case $s in
	venc)   img=${img:-$TMP/vmbond-luks.img}   # its key file is IMAGE.key
		CMD=("$VMBOND" disk serve "$img" --key-file "${img%.img}.key" --socket "$(sock "$s")") ;;
	vplain) CMD=("$VMBOND" disk serve "${img:-$TMP/raw.img}" --plain --socket "$(sock "$s")") ;;
	qnbd)   CMD=(qemu-nbd -t -f raw --cache=writeback -k "$(sock "$s")" "${img:-$TMP/raw.img}") ;;
	qluks)  CMD=(qemu-nbd -t --cache=writeback -k "$(sock "$s")"
		--object "secret,id=s0,file=$TMP/qemu-luks.pass"
		--image-opts "driver=luks,file.filename=$TMP/qemu-luks.img,key-secret=s0") ;;
	nbdkit) CMD=(nbdkit -f -U "$(sock "$s")" file "${img:-$TMP/raw.img}") ;;
	esac
}

start_server() {   # name [image]
	local s=$1 i
	server_cmd "$@"
	rm -f "$(sock "$s")"
	"${CMD[@]}" >>"$TMP/$s.log" 2>&1 &
	PID[$s]=$!
	# Wait for the socket; QEMU's LUKS unlock (PBKDF2, ~2 s) is the slowest.
	for i in $(seq 300); do
		[ -S "$(sock "$s")" ] && return 0
		kill -0 "${PID[$s]}" 2>/dev/null || break
		sleep 0.1
	done
	cat "$TMP/$s.log" >&2
	die "server $s did not start"
}

stop_server() {
	local s=$1
	[ -n "${PID[$s]:-}" ] || return 0
	kill "${PID[$s]}" 2>/dev/null || true
	wait "${PID[$s]}" 2>/dev/null || true
	unset "PID[$s]"
}

# Peak resident memory of a running server, in MiB.
peak_rss() { awk '/^VmHWM:/ {printf "%.1f", $2 / 1024}' "/proc/${PID[$1]}/status"; }

# --- measurements -----------------------------------------------------------
declare -A RES=()   # "test|server" -> space-separated values, one per round
add() { RES[$1|$2]="${RES[$1|$2]:-} $3"; }

# fio --minimal prints terse v3 (the line starting "3;"; the nbd engine also
# prints "connected" to stdout): fields 7/8 = read KiB/s / IOPS, 48/49 = write.
run_fio() {   # server rw bs -> prints MB/s for 1M, IOPS for 4k
	local s=$1 rw=$2 bs=$3 out
	out=$(fio --name=bench --ioengine=nbd --uri="$(uri "$s")" --rw="$rw" --bs="$bs" \
		--iodepth=$IODEPTH --size="${SIZE_MIB}M" --runtime="$RUNTIME" --ramp_time="$RAMP" \
		--time_based --minimal 2>"$TMP/fio.err") || { cat "$TMP/fio.err" >&2; die "fio $rw on $s failed"; }
	awk -F';' -v rw="$rw" -v bs="$bs" '$1 == "3" {
		w = (rw ~ /write/); kib = w ? $48 : $7; iops = w ? $49 : $8
		if (bs == "4k") printf "%.0f", iops; else printf "%.1f", kib * 1024 / 1e6
	}' <<<"$out"
}

run_qemu_img_bench() {   # server rw bs -> prints MB/s for 1M, IOPS for 4k
	local s=$1 rw=$2 bs=$3 args=() count secs
	if [ "$bs" = 4k ]; then
		count=$QB_RAND_COUNT; args+=(-s 4K -S "$QB_STRIDE")
	else
		count=$QB_SEQ_COUNT; args+=(-s 1M)
	fi
	[ "$rw" = write ] && args+=(-w)
	# -t none: no client-side cache and no flush per write (writethrough would).
	secs=$(qemu-img bench -f raw -t none -c "$count" -d $IODEPTH "${args[@]}" "$(uri "$s")" 2>&1 |
		awk '/Run completed in/ {print $4}')
	[ -n "$secs" ] || die "qemu-img bench $rw $bs on $s failed"
	awk -v c="$count" -v t="$secs" -v bs="$bs" 'BEGIN {
		if (bs == "4k") printf "%.0f", c / t; else printf "%.1f", c * 1048576 / t / 1e6 }'
}

# Rotate the server order by $1 so no server always runs first or last.
rotated() { local k=$(($1 % ${#SERVERS[@]})); echo "${SERVERS[@]:$k}" "${SERVERS[@]:0:$k}"; }

FIO_TESTS=("fio-seqread read 1M" "fio-seqwrite write 1M" "fio-randread randread 4k" "fio-randwrite randwrite 4k")
QB_TESTS=("qb-seqread read 1M" "qb-seqwrite write 1M" "qb-randread read 4k" "qb-randwrite write 4k")

# --- images: same size, pre-filled through their own server ----------------
log "creating ${SIZE_MIB} MiB images in $TMP"
"$VMBOND" disk create "$TMP/vmbond-luks.img" --size "${SIZE_MIB}M" --key-file "$TMP/vmbond-luks.key" >/dev/null
truncate -s "${SIZE_MIB}M" "$TMP/raw.img"
# QEMU times PBKDF2 to pick the iteration count and now and then fails with
# "Unable to get accurate CPU usage" on a busy machine: retry.
for try in 1 2 3 4 5; do
	qemu-img create -q -f luks --object "secret,id=s0,file=$TMP/qemu-luks.pass" \
		-o key-secret=s0,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64 \
		"$TMP/qemu-luks.img" "${SIZE_MIB}M" && break
	rm -f "$TMP/qemu-luks.img"
	[ "$try" -lt 5 ] || die "qemu-img create -f luks failed"
done
# Fill so reads decrypt real ciphertext, not holes; the raw file is shared by
# three servers and filled once (through qemu-nbd).
for s in venc qnbd qluks; do
	log "filling $s"
	start_server "$s"
	fio --name=fill --ioengine=nbd --uri="$(uri "$s")" --rw=write --bs=1M --iodepth=$IODEPTH \
		--size="${SIZE_MIB}M" --minimal >/dev/null 2>"$TMP/fio.err" || { cat "$TMP/fio.err" >&2; die "fill $s"; }
	stop_server "$s"
done
sync

# --- rounds -----------------------------------------------------------------
# Each round starts fresh server processes (so VmHWM covers just this round's
# fio runs), warms the page cache for every image the same way, then runs
# each test on every server back to back, in a rotated order.
for r in $(seq "$ROUNDS"); do
	log "round $r/$ROUNDS"
	cat "$TMP/raw.img" "$TMP/vmbond-luks.img" "$TMP/qemu-luks.img" >/dev/null
	for s in "${SERVERS[@]}"; do start_server "$s"; done
	t=0
	for spec in "${FIO_TESTS[@]}" "${QB_TESTS[@]}"; do
		read -r name rw bs <<<"$spec"
		for s in $(rotated $((r + t))); do
			sync   # don't let one server's dirty pages be written back on the next one's clock
			if [[ $name == fio-* ]]; then v=$(run_fio "$s" "$rw" "$bs"); else v=$(run_qemu_img_bench "$s" "$rw" "$bs"); fi
			add "$name" "$s" "$v"
			log "  $name ${LABEL[$s]}: $v"
		done
		t=$((t + 1))
		if [ "$name" = fio-randwrite ]; then   # the fio runs are over: record peak RSS
			for s in "${SERVERS[@]}"; do add rss "$s" "$(peak_rss "$s")"; done
		fi
	done
	for s in "${SERVERS[@]}"; do stop_server "$s"; done
done

# --- guest boot -------------------------------------------------------------
# The demo guest boots from an NBD disk, writes a marker and powers off; we
# time QEMU from start to exit. Encrypted copy via vmbond disk convert; the
# plain copy is served by qemu-nbd (the target's baseline) and by vmbond
# --plain (to separate encryption cost from server cost).
log "guest boot: $BOOTS boots per server"
cp --sparse=always "$GUEST_IMG" "$TMP/guest-plain.img"
"$VMBOND" disk convert "$GUEST_IMG" "$TMP/guest-enc.img" --key-file "$TMP/guest-enc.key"
boot_once() {   # server -> prints seconds, or fails
	local s=$1 t0 t1
	t0=$EPOCHREALTIME
	timeout 300 qemu-system-x86_64 -accel tcg -m 256 -nographic -nodefaults -serial stdio \
		-no-reboot -nic none -drive "file=nbd:unix:$(sock "$s"),format=raw,if=virtio" \
		</dev/null >"$TMP/boot-$s.log" 2>&1 || true
	t1=$EPOCHREALTIME
	grep -q 'vmbond-guest: disk test ok' "$TMP/boot-$s.log" && grep -q 'vmbond-guest: poweroff' "$TMP/boot-$s.log" ||
		{ tail -20 "$TMP/boot-$s.log" >&2; log "boot on $s failed"; return 1; }
	awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}'
}
BOOT_SERVERS=(venc qnbd vplain)
start_server venc "$TMP/guest-enc.img"
# vmbond --plain and qemu-nbd take turns on the same plain copy, never at once.
for b in $(seq "$BOOTS"); do
	k=$((b % 3)); order=("${BOOT_SERVERS[@]:$k}" "${BOOT_SERVERS[@]:0:$k}")
	for s in "${order[@]}"; do
		[ "$s" = venc ] || start_server "$s" "$TMP/guest-plain.img"
		if v=$(boot_once "$s"); then add boot "$s" "$v"; log "  boot ${LABEL[$s]}: ${v}s"; fi
		[ "$s" = venc ] || stop_server "$s"
	done
done
stop_server venc

# --- cipher alone -----------------------------------------------------------
log "cipher: go test -bench internal/xts, openssl speed"
gobench=$(go test -run '^$' -bench 'Encrypt/^4KiB$|Decrypt/^4KiB$|XCryptoXTS/^4KiB$' \
	-benchtime "$GO_BENCHTIME" -count "$GO_COUNT" ./internal/xts/)
for b in Encrypt Decrypt XCryptoXTS; do
	for v in $(awk -v b="Benchmark$b/4KiB" '$1 ~ "^" b "(-[0-9]+)?$" {for (i = 1; i < NF; i++) if ($(i+1) == "MB/s") print $i}' <<<"$gobench"); do
		add "go-$b" venc "$v"
	done
done
for dir in encrypt decrypt; do
	flag=(); [ $dir = decrypt ] && flag=(-decrypt)
	v=$(openssl speed "${flag[@]}" -evp aes-256-xts -bytes 4096 -seconds "$SSL_SECONDS" 2>/dev/null |
		awk '$1 == "AES-256-XTS" {sub(/k$/, "", $2); printf "%.1f", $2 / 1000}')
	add "ssl-$dir" qnbd "$v"
done

# --- audit log (issue 4): group-committed durable appends, chain verification --
log "audit: go test -bench internal/audit"
abench=$(go test -run '^$' -bench 'Append/appenders=(64|256)$' -benchtime 200000x -count "$GO_COUNT" ./internal/audit/ 2>/dev/null || true)
abench+=$'\n'$(go test -run '^$' -bench 'Verify$' -benchtime 1x -count "$GO_COUNT" ./internal/audit/ 2>/dev/null || true)
for k in 64 256; do
	for v in $(awk -v b="BenchmarkAppend/appenders=$k" '$1 ~ "^" b "(-[0-9]+)?$" {for (i = 1; i < NF; i++) if ($(i+1) == "entries/s") print $i}' <<<"$abench"); do
		add "audit-append-$k" venc "$v"
	done
done
for v in $(awk '$1 ~ "^BenchmarkVerify(-[0-9]+)?$" {for (i = 1; i < NF; i++) if ($(i+1) == "entries/s") print $i}' <<<"$abench"); do
	add audit-verify venc "$v"
done

# --- report -----------------------------------------------------------------
med() {   # values... -> median, or empty
	[ $# -gt 0 ] || return 0
	printf '%s\n' "$@" | sort -g | awk '{a[NR] = $1} END {
		if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
# shellcheck disable=SC2086 # word splitting of the value list is intended
m() { med ${RES[$1|$2]:-}; }
fmt() { [ -n "$1" ] && awk -v v="$1" -v d="${2:-0}" 'BEGIN {printf "%.*f", d, v}' || echo "—"; }
ratio() { [ -n "$1" ] && [ -n "$2" ] && awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f×", a / b}' || echo "—"; }

declare -A ROWNAME=(
	[fio-seqread]="fio 1 MiB seq read, MB/s" [fio-seqwrite]="fio 1 MiB seq write, MB/s"
	[fio-randread]="fio 4 KiB rand read, IOPS" [fio-randwrite]="fio 4 KiB rand write, IOPS"
	[qb-seqread]="qemu-img bench 1 MiB seq read, MB/s" [qb-seqwrite]="qemu-img bench 1 MiB seq write, MB/s"
	[qb-randread]="qemu-img bench 4 KiB strided read, IOPS" [qb-randwrite]="qemu-img bench 4 KiB strided write, IOPS"
	[rss]="peak RSS during fio (VmHWM), MiB (lower is better)"
	[boot]="guest boot to power-off, s (lower is better)")

report() {
	local row s cells d
	echo "| Measure | vmbond encrypted | vmbond plain | qemu-nbd raw (baseline) | qemu-nbd LUKS | nbdkit file | enc ÷ baseline | plain ÷ baseline | enc ÷ qemu LUKS | enc ÷ nbdkit |"
	echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
	for row in fio-seqread fio-seqwrite fio-randread fio-randwrite qb-seqread qb-seqwrite qb-randread qb-randwrite rss boot; do
		d=0; case $row in rss) d=1 ;; boot) d=2 ;; esac
		cells=""
		for s in "${SERVERS[@]}"; do cells+=" $(fmt "$(m "$row" "$s")" $d) |"; done
		echo "| ${ROWNAME[$row]} |$cells $(ratio "$(m "$row" venc)" "$(m "$row" qnbd)") | $(ratio "$(m "$row" vplain)" "$(m "$row" qnbd)") | $(ratio "$(m "$row" venc)" "$(m "$row" qluks)") | $(ratio "$(m "$row" venc)" "$(m "$row" nbdkit)") |"
	done
	for d in Encrypt Decrypt; do
		local lc=${d,,}
		echo "| cipher AES-256-XTS 4 KiB ${lc}, MB/s (vmbond: internal/xts; baseline: openssl speed; x/crypto/xts $(fmt "$(m go-XCryptoXTS venc)") MB/s) | $(fmt "$(m "go-$d" venc)") | — | $(fmt "$(m "ssl-$lc" qnbd)") (openssl) | — | — | $(ratio "$(m "go-$d" venc)" "$(m "ssl-$lc" qnbd)") | — | — | — |"
	done
	for k in 64 256; do
		echo "| audit log durable appends, $k concurrent appenders, entries/s | $(fmt "$(m "audit-append-$k" venc)") | — | — | — | — | — | — | — | — |"
	done
	echo "| audit log verify, 1,000,000 entries, entries/s | $(fmt "$(m audit-verify venc)") | — | — | — | — | — | — | — | — |"
}

# Targets from the issue. ge/le: value, threshold -> 0 if met.
ge() { awk -v a="$1" -v b="$2" 'BEGIN {exit !(a != "" && a + 0 >= b + 0)}'; }
FAILS=0
target() {   # ok(0/1) text
	if [ "$1" = 0 ]; then echo "- PASS: $2"; else echo "- **FAIL**: $2"; FAILS=$((FAILS + 1)); fi
}
targets() {
	local row a b ok
	for row in fio-seqread fio-seqwrite fio-randread fio-randwrite qb-seqread qb-seqwrite qb-randread qb-randwrite; do
		a=$(m "$row" venc); b=$(m "$row" qnbd)
		ok=1; [ -n "$a" ] && [ -n "$b" ] && ge "$a" "$(awk -v b="$b" 'BEGIN {print 0.9 * b}')" && ok=0
		target $ok "encrypted vmbond ≥ 0.9× plaintext qemu-nbd, ${ROWNAME[$row]}: $(ratio "$a" "$b")"
	done
	for row in fio-seqread fio-seqwrite qb-seqread qb-seqwrite; do
		a=$(m "$row" venc); b=$(m "$row" qluks)
		ok=1; [ -n "$a" ] && [ -n "$b" ] && ge "$a" "$(awk -v b="$b" 'BEGIN {print 3 * b}')" && ok=0
		target $ok "encrypted vmbond ≥ 3× qemu-nbd LUKS, ${ROWNAME[$row]}: $(ratio "$a" "$b")"
	done
	a=$(m boot venc); b=$(m boot qnbd)
	ok=1; [ -n "$a" ] && [ -n "$b" ] && ge "$(awk -v b="$b" 'BEGIN {print 1.05 * b}')" "$a" && ok=0
	target $ok "guest boot on encrypted vmbond within 5% of plaintext qemu-nbd: $(fmt "$a" 2) s vs $(fmt "$b" 2) s ($(ratio "$a" "$b"))"
	for d in Encrypt Decrypt; do
		a=$(m "go-$d" venc)
		ok=1; [ -n "$a" ] && ge "$a" 4000 && ok=0
		target $ok "cipher ≥ 4 GB/s, internal/xts 4 KiB ${d,,}: $(fmt "$a") MB/s"
	done
	a=$(m audit-append-256 venc)
	ok=1; [ -n "$a" ] && ge "$a" 50000 && ok=0
	target $ok "audit appends ≥ 50,000 entries/s (256 appenders, durable, batched): $(fmt "$a")"
	a=$(m audit-verify venc)
	ok=1; [ -n "$a" ] && ge "$a" 500000 && ok=0
	target $ok "audit verify of 1,000,000 entries in under 2 s: $(awk -v v="$a" 'BEGIN {if (v > 0) printf "%.2f s", 1000000 / v; else print "—"}')"
}

{
	echo "### vmbond benchmark, $(date -u '+%Y-%m-%d %H:%M UTC')$([ "${BENCH_QUICK:-0}" = 1 ] && echo ' (BENCH_QUICK smoke run: not representative)')"
	echo
	echo "- machine: $(nproc) CPUs, $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo), $(awk '/^MemTotal/ {printf "%.0f GiB RAM", $2 / 1048576}' /proc/meminfo), Linux $(uname -r)"
	echo "- tools: $(qemu-img --version | head -1), $(fio --version), $(nbdkit --version), $(openssl version | cut -d' ' -f1-2), $(go version | cut -d' ' -f3)"
	echo "- plan: $ROUNDS round(s), median shown; ${SIZE_MIB} MiB images pre-filled; fio nbd engine ${RUNTIME} s (+${RAMP} s ramp), iodepth $IODEPTH, 1 job; qemu-img bench -d $IODEPTH -t none, $QB_SEQ_COUNT × 1 MiB / $QB_RAND_COUNT × 4 KiB (step $QB_STRIDE); page cache warm for all; $BOOTS boots per server"
	echo
	report
	echo
	echo "Targets:"
	echo
	targets
	echo
	if [ "$FAILS" -gt 0 ]; then echo "**$FAILS target(s) FAILED.**"; else echo "All targets met."; fi
} >"$TMP/report.md"

cat "$TMP/report.md"
[ -z "${BENCH_OUT:-}" ] || cp "$TMP/report.md" "$BENCH_OUT"
if grep -q '^- \*\*FAIL' "$TMP/report.md"; then
	log "$(grep -c '^- \*\*FAIL' "$TMP/report.md") TARGET(S) FAILED — see the table above"
fi
exit 0
