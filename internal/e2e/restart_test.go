package e2e

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmbond/vmbond/internal/client"
	"github.com/vmbond/vmbond/internal/disk"
	"github.com/vmbond/vmbond/internal/xts"
)

var (
	heartbeatRE     = regexp.MustCompile(`vmbond-guest: heartbeat (\d+)`)
	heartbeatDiskRE = regexp.MustCompile(`^vmbond-guest-heartbeat:(\d+)\n\x00*$`)
)

// lastHeartbeat is the highest heartbeat number on a console, or 0.
func lastHeartbeat(console string) int {
	n := 0
	for _, m := range heartbeatRE.FindAllStringSubmatch(console, -1) {
		if k, err := strconv.Atoi(m[1]); err == nil {
			n = max(n, k)
		}
	}
	return n
}

// qemuPIDs finds the QEMU processes the agent started for a VM (by their
// -name vmbond-<id>).
func qemuPIDs(t testing.TB, vmID string) []int {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if isQEMUFor(pid, vmID) {
			pids = append(pids, pid)
		}
	}
	return pids
}

func isQEMUFor(pid int, vmID string) bool {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cmdline"))
	if err != nil {
		return false
	}
	args := strings.Split(string(b), "\x00")
	if len(args) == 0 || !strings.Contains(filepath.Base(args[0]), "qemu-system") {
		return false
	}
	for i := 0; i+1 < len(args); i++ {
		if args[i] == "-name" && args[i+1] == "vmbond-"+vmID {
			return true
		}
	}
	return false
}

// alive reports whether pid is a live (not zombie) process.
func alive(pid int) bool {
	if syscall.Kill(pid, 0) != nil {
		return false
	}
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return false
	}
	// pid (comm) S ...: the state follows the last ')'.
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && i+2 < len(s) {
		return s[i+2] != 'Z' && s[i+2] != 'X'
	}
	return true
}

// TestAgentRestartKeepsGuestRunning restarts the host agent under a running
// guest that writes (O_DIRECT, then a cache flush) a numbered heartbeat
// sector every second: QEMU must outlive the agent, its disk writes must
// wait for the new agent's NBD server instead of failing, and the new agent
// must take over the VM's monitor and disk. No acknowledged write may be
// lost: the image ends up holding the last heartbeat the guest printed.
func TestAgentRestartKeepsGuestRunning(t *testing.T) {
	g := buildGuest(t)
	c := newCluster(t, "host1")
	alice := c.tenant("alice")
	ctx := context.Background()
	vk, err := alice.Create(ctx, client.CreateOptions{Name: "web", Image: copyFile(t, g.DiskStay)})
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	old := c.agents["host1"]
	dir := old.DataDir
	vmDir := filepath.Join(dir, "vms", vk.ID)
	console := func() string {
		b, _ := os.ReadFile(filepath.Join(vmDir, "console.log"))
		return string(b)
	}

	if r, err := alice.Command(ctx, "web", "start"); err != nil || r.State != "running" {
		t.Fatalf("start: %v %+v", err, r)
	}
	pids := qemuPIDs(t, vk.ID)
	if len(pids) != 1 {
		t.Fatalf("found QEMU processes %v for %s, want one", pids, vk.ID)
	}
	pid := pids[0]
	// Whatever happens, leave no QEMU behind: stop it through the agent
	// while one is up (stopVM runs before each agent's own cleanup), then
	// kill it by PID as a last resort.
	t.Cleanup(func() {
		if alive(pid) && isQEMUFor(pid, vk.ID) {
			t.Logf("killing leftover QEMU %d", pid)
			syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	stopVM := func() {
		if !alive(pid) {
			return
		}
		sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if _, err := alice.Command(sctx, "web", "stop"); err != nil {
			return
		}
		for deadline := time.Now().Add(20 * time.Second); alive(pid) && time.Now().Before(deadline); {
			time.Sleep(100 * time.Millisecond)
		}
	}
	t.Cleanup(stopVM)

	waitConsole(t, alice, "web", "vmbond-guest: heartbeat 2", 240*time.Second)

	// Stop the agent: it detaches, QEMU keeps running.
	old.stop()
	if !alive(pid) {
		t.Fatalf("QEMU %d died with the agent", pid)
	}
	atStop := lastHeartbeat(console())
	// The guest's next write (or flush) waits for the disk to come back.
	time.Sleep(6 * time.Second)
	if !alive(pid) {
		t.Fatalf("QEMU %d died while the agent was down:\n%s", pid, console())
	}
	before := lastHeartbeat(console())
	t.Logf("agent stopped at heartbeat %d; %d before the new agent started", atStop, before)
	if before > atStop+1 {
		t.Errorf("heartbeats went on from %d to %d without a disk server", atStop, before)
	}
	if strings.Contains(console(), "FAILED") {
		t.Fatalf("the guest saw a failure while the agent was down:\n%s", console())
	}

	// A new agent process on the same data directory reattaches.
	na := c.startAgent("host1", dir)
	t.Cleanup(stopVM)
	if _, err := c.admin.AddHost(ctx, na.URL); err != nil {
		t.Fatalf("re-add host at %s: %v", na.URL, err)
	}
	if r, err := alice.Command(ctx, "web", "status"); err != nil || r.State != "running" {
		t.Fatalf("status after agent restart: %v %+v", err, r)
	}
	// QEMU reconnects with a backoff of up to 16 s, on TCG, maybe loaded.
	waitConsole(t, alice, "web", "vmbond-guest: heartbeat "+strconv.Itoa(before+3), 180*time.Second)
	if len(qemuPIDs(t, vk.ID)) != 1 || !alive(pid) {
		t.Fatalf("QEMU processes after restart: %v (want %d)", qemuPIDs(t, vk.ID), pid)
	}

	// The new agent drives the VM.
	if r, err := alice.Command(ctx, "web", "pause"); err != nil || r.State != "paused" {
		t.Fatalf("pause through the new agent: %v %+v", err, r)
	}
	paused := lastHeartbeat(console())
	time.Sleep(3 * time.Second)
	if n := lastHeartbeat(console()); n > paused+1 {
		t.Errorf("heartbeats went on from %d to %d while paused", paused, n)
	}
	if r, err := alice.Command(ctx, "web", "status"); err != nil || r.State != "paused" {
		t.Fatalf("status while paused: %v %+v", err, r)
	}
	if r, err := alice.Command(ctx, "web", "resume"); err != nil || r.State != "running" {
		t.Fatalf("resume through the new agent: %v %+v", err, r)
	}
	waitConsole(t, alice, "web", "vmbond-guest: heartbeat "+strconv.Itoa(lastHeartbeat(console())+2), 120*time.Second)
	if r, err := alice.Command(ctx, "web", "stop"); err != nil || r.State != "stopped" {
		t.Fatalf("stop through the new agent: %v %+v", err, r)
	}
	for deadline := time.Now().Add(30 * time.Second); alive(pid); time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("QEMU %d still running after stop", pid)
		}
	}
	out := console()
	if strings.Contains(out, "FAILED") {
		t.Fatalf("the guest saw a failure:\n%s", out)
	}
	last := lastHeartbeat(out)

	// Every heartbeat the guest printed was on the disk first: the image
	// holds the last one (or the next, written but not yet printed at stop).
	d, err := disk.Open(filepath.Join(vmDir, "disk.img"), vk.DiskKey)
	if err != nil {
		t.Fatalf("open image with the tenant's key: %v", err)
	}
	defer d.Close()
	sec := make([]byte, 2*xts.SectorSize)
	if _, err := d.ReadAt(sec, g.DataSector*xts.SectorSize); err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(sec, []byte("vmbond-guest-marker:")) {
		t.Errorf("marker sector holds %q", bytes.TrimRight(sec[:64], "\x00"))
	}
	m := heartbeatDiskRE.FindSubmatch(sec[xts.SectorSize:])
	if m == nil {
		t.Fatalf("heartbeat sector holds %q", bytes.TrimRight(sec[xts.SectorSize:xts.SectorSize+64], "\x00"))
	}
	onDisk, _ := strconv.Atoi(string(m[1]))
	t.Logf("heartbeats: %d at agent stop, %d before restart, %d printed at the end, %d on disk", atStop, before, last, onDisk)
	if onDisk <= before {
		t.Errorf("disk holds heartbeat %d, not newer than %d from before the restart", onDisk, before)
	}
	if onDisk != last && onDisk != last+1 {
		t.Errorf("disk holds heartbeat %d but the guest printed %d last: a write was lost", onDisk, last)
	}
}
