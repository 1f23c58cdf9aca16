package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmbond/vmbond/internal/agent"
	"github.com/vmbond/vmbond/internal/bond"
)

// TestSoftDeleteRestorePurge: delete keeps the VM restorable; purge needs an
// explicit confirmation, destroys key and disk, and the destroyed key cannot
// be registered again.
func TestSoftDeleteRestorePurge(t *testing.T) {
	c := newCluster(t, "host1")
	alice := c.tenant("alice")
	ctx := context.Background()
	vk := blankVM(t, alice, "web", "host1")
	img := filepath.Join(c.agents["host1"].DataDir, "vms", vk.ID, "disk.img")

	r, err := alice.Command(ctx, "web", "delete")
	if err != nil || r.State != "deleted" || !strings.Contains(r.Output, "restorable until") {
		t.Fatalf("delete: %v %+v", err, r)
	}
	until, err := time.Parse(time.RFC3339, strings.TrimPrefix(r.Output, "restorable until "))
	if err != nil || until.Sub(time.Now()) < agent.DefaultRetention-time.Minute {
		t.Fatalf("retention ends %v, want about %v from now", until, agent.DefaultRetention)
	}
	if _, err := os.Stat(img); err != nil {
		t.Fatalf("a deleted VM's disk is gone: %v", err)
	}
	if _, err := alice.Command(ctx, "web", "start"); err == nil || !strings.Contains(err.Error(), "restore it") {
		t.Fatalf("start of a deleted VM: %v", err)
	}
	if r, err := alice.Command(ctx, "web", "restore"); err != nil || r.State != "stopped" {
		t.Fatalf("restore: %v", err)
	}
	if r, err := alice.Command(ctx, "web", "status"); err != nil || r.State != "stopped" {
		t.Fatalf("status after restore: %v %+v", err, r)
	}
	if _, err := alice.Purge(ctx, "web", vk.ID); err == nil || !strings.Contains(err.Error(), "not deleted") {
		t.Fatalf("purge of a live VM: %v", err)
	}
	alice.Command(ctx, "web", "delete")
	if _, err := alice.Purge(ctx, "web", "yes"); err == nil || !strings.Contains(err.Error(), "explicit confirmation") {
		t.Fatalf("purge without confirmation: %v", err)
	}
	if !auditHas(t, c.agents["host1"], vk.ID, "purge", "refused", "explicit confirmation") {
		t.Fatal("unconfirmed purge not logged")
	}
	if r, err := alice.Purge(ctx, "web", vk.ID); err != nil || r.State != "purged" {
		t.Fatalf("purge: %v", err)
	}
	if _, err := os.Stat(img); !os.IsNotExist(err) {
		t.Fatalf("purged disk still on storage: %v", err)
	}
	// Replaying the tenant's original registration (the server keeps it)
	// cannot bring the destroyed key back.
	status, b := regAs(t, c, c.agents["host1"], vk.Tenant, vk.ID, "host1", bond.NewDiskKey())
	if status != 409 || !strings.Contains(string(b), "purged") {
		t.Fatalf("re-registration of a purged VM: %d %s", status, b)
	}
}

// TestPurgeAfterRetention: the host purges a deleted VM once its retention
// ends, and only then.
func TestPurgeAfterRetention(t *testing.T) {
	c := newCluster(t, "host1")
	alice := c.tenant("alice")
	ctx := context.Background()
	vk := blankVM(t, alice, "web", "host1")
	keep := blankVM(t, alice, "db", "host1")
	if _, err := alice.Command(ctx, "web", "delete"); err != nil {
		t.Fatal(err)
	}
	// Restart the agent six days later: nothing is purged yet.
	restart := func(after time.Duration) {
		c.setClock(after)
		c.agents["host1"].stop()
		c.startAgent("host1", c.agents["host1"].DataDir)
		if _, err := c.admin.AddHost(ctx, c.agents["host1"].URL); err != nil {
			t.Fatal(err)
		}
		time.Sleep(200 * time.Millisecond) // the purge loop runs as Serve starts
	}
	img := filepath.Join(c.agents["host1"].DataDir, "vms", vk.ID, "disk.img")
	restart(6 * 24 * time.Hour)
	if _, err := os.Stat(img); err != nil {
		t.Fatalf("purged before retention ended: %v", err)
	}
	restart(agent.DefaultRetention + time.Hour)
	if _, err := os.Stat(img); !os.IsNotExist(err) {
		t.Fatalf("not purged after retention: %v", err)
	}
	if !auditHas(t, c.agents["host1"], vk.ID, "purge", "allowed", "retention period ended") {
		t.Fatal("automatic purge not logged")
	}
	if _, err := os.Stat(filepath.Join(c.agents["host1"].DataDir, "vms", keep.ID, "disk.img")); err != nil {
		t.Fatalf("a live VM was purged: %v", err)
	}
}
