package e2e

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/vmbond/vmbond/internal/bond"
	"github.com/vmbond/vmbond/internal/client"
	"github.com/vmbond/vmbond/internal/disk"
	"github.com/vmbond/vmbond/internal/xts"
)

var markerRE = regexp.MustCompile(`vmbond-guest: readback (vmbond-guest-marker:[0-9a-f]{32})`)

// TestBondedVMEndToEnd boots the real guest from its encrypted disk through
// server and agent, has it write a random marker to its disk, proves the
// marker is absent from the image on the host's storage, and reads it back
// with the tenant's key.
func TestBondedVMEndToEnd(t *testing.T) {
	g := buildGuest(t)
	c := newCluster(t, "host1")
	alice := c.tenant("alice")
	ctx := context.Background()

	vk, err := alice.Create(ctx, client.CreateOptions{Name: "web", Image: copyFile(t, g.Disk), AdminAllowed: []string{"status", "pause"}})
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	if vk.Host != "host1" {
		t.Fatalf("placed on %q", vk.Host)
	}
	if err := alice.Verify(ctx, "web"); err != nil {
		t.Fatalf("verify: %v", err)
	}
	r, err := alice.Command(ctx, "web", "start")
	if err != nil {
		t.Fatalf("start: %v", err)
	}
	if r.State != "running" {
		t.Fatalf("after start, state %q", r.State)
	}
	out := waitConsole(t, alice, "web", "vmbond-guest: poweroff", 120*time.Second)
	m := markerRE.FindStringSubmatch(out)
	if m == nil || !strings.Contains(out, "vmbond-guest: disk test ok") {
		t.Fatalf("guest did not write and read back its marker:\n%s", out)
	}
	marker := []byte(m[1])

	// The guest powered off; the agent notices and the VM is stopped.
	deadline := time.Now().Add(30 * time.Second)
	for {
		r, err := alice.Command(ctx, "web", "status")
		if err != nil {
			t.Fatal(err)
		}
		if r.State == "stopped" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("VM still %q after guest poweroff", r.State)
		}
		time.Sleep(200 * time.Millisecond)
	}

	img := filepath.Join(c.agents["host1"].DataDir, "vms", vk.ID, "disk.img")
	raw, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(raw, marker) {
		t.Fatal("the guest's marker is in plaintext in the image on storage")
	}
	if bytes.Contains(raw, []byte("vmbond-guest: booted")) || bytes.Contains(raw, []byte("SYSLINUX")) {
		t.Fatal("the image on storage contains recognisable plaintext of the guest")
	}
	d, err := disk.Open(img, vk.DiskKey)
	if err != nil {
		t.Fatalf("open image with the tenant's key: %v", err)
	}
	defer d.Close()
	sector := make([]byte, xts.SectorSize)
	if _, err := d.ReadAt(sector, g.DataSector*xts.SectorSize); err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(sector, marker) {
		t.Fatalf("decrypted data sector holds %q, want %q", bytes.TrimRight(sector[:64], "\x00"), marker)
	}

	// A standard tool, given the tenant's exported LUKS key file, turns the
	// image back into the plaintext the guest wrote.
	requireTool(t, "qemu-img")
	keys, err := bond.Derive(vk.DiskKey, vk.Tenant, vk.ID)
	if err != nil {
		t.Fatal(err)
	}
	keyFile := filepath.Join(t.TempDir(), "web.key")
	os.WriteFile(keyFile, keys.LUKSPassphrase(), 0o600)
	plain := filepath.Join(t.TempDir(), "web.raw")
	if out, err := exec.Command("qemu-img", "convert", "--object", "secret,id=s0,file="+keyFile,
		"--image-opts", "driver=luks,file.filename="+img+",key-secret=s0", "-O", "raw", plain).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert: %v\n%s", err, out)
	}
	pb, err := os.ReadFile(plain)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(pb[g.DataSector*xts.SectorSize:], marker) {
		t.Fatal("qemu-img's decryption of the image lacks the guest's marker")
	}
}

// TestLifecycle operates a running guest through the tenant's commands and
// an admin's policy-allowed ones.
func TestLifecycle(t *testing.T) {
	g := buildGuest(t)
	c := newCluster(t, "host1")
	alice := c.tenant("alice")
	ctx := context.Background()
	vk, err := alice.Create(ctx, client.CreateOptions{Name: "web", Image: copyFile(t, g.DiskStay), AdminAllowed: []string{"status", "pause", "resume"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := alice.Command(ctx, "web", "start"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { alice.Command(context.Background(), "web", "stop") })
	if _, err := alice.Command(ctx, "web", "start"); err == nil || !strings.Contains(err.Error(), "already running") {
		t.Fatalf("second start: %v", err)
	}
	waitConsole(t, alice, "web", "heartbeat 1", 120*time.Second)
	steps := []struct {
		op, want string
		admin    bool
	}{
		{"status", "running", false},
		{"pause", "paused", false},
		{"status", "paused", true},
		{"resume", "running", false},
		{"pause", "paused", true},
		{"resume", "running", true},
		{"reset", "running", false},
		{"stop", "stopped", false},
		{"status", "stopped", false},
	}
	for _, s := range steps {
		var state string
		if s.admin {
			r, err := c.admin.Admin(ctx, vk.ID, s.op)
			if err != nil {
				t.Fatalf("admin %s: %v", s.op, err)
			}
			state = r.State
		} else {
			r, err := alice.Command(ctx, "web", s.op)
			if err != nil {
				t.Fatalf("%s: %v", s.op, err)
			}
			state = r.State
		}
		if state != s.want {
			t.Fatalf("after %s (admin=%v): state %q, want %q", s.op, s.admin, state, s.want)
		}
	}
	for _, op := range []string{"pause", "resume", "reset", "shutdown"} {
		if _, err := alice.Command(ctx, "web", op); err == nil || !strings.Contains(err.Error(), "not running") {
			t.Fatalf("%s on a stopped VM: %v", op, err)
		}
	}
	if r, err := alice.Command(ctx, "web", "delete"); err != nil || r.State != "deleted" {
		t.Fatalf("delete: %v", err)
	}
	if vms, _ := alice.List(ctx); len(vms) != 1 || vms[0].State != "deleted" {
		t.Fatalf("server inventory after delete: %+v", vms)
	}
}
