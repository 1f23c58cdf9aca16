package e2e

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/vmbond/vmbond/internal/client"
	"github.com/vmbond/vmbond/internal/disk"
)

// TestCreateFromQcow2: a qcow2 image is converted and encrypted on the
// tenant's side; the host's image decrypts to the same bytes, and no
// plaintext reached the server or the host.
func TestCreateFromQcow2(t *testing.T) {
	g := buildGuest(t)
	requireTool(t, "qemu-img")
	q := filepath.Join(t.TempDir(), "guest.qcow2")
	if out, err := exec.Command("qemu-img", "convert", "-f", "raw", "-O", "qcow2", g.Disk, q).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img: %v\n%s", err, out)
	}
	c := newCluster(t, "host1")
	alice := c.tenant("alice")
	vk, err := alice.Create(context.Background(), client.CreateOptions{Name: "web", Image: q})
	if err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(g.Disk)
	if err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(c.agents["host1"].DataDir, "vms", vk.ID, "disk.img")
	d, err := disk.Open(img, vk.DiskKey)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if d.Size() != int64(len(raw)) {
		t.Fatalf("disk holds %d bytes, image %d", d.Size(), len(raw))
	}
	got := make([]byte, len(raw))
	if _, err := d.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, raw) {
		t.Fatal("the host's disk does not decrypt to the tenant's image")
	}
	ct, _ := os.ReadFile(img)
	if bytes.Contains(ct, []byte("SYSLINUX")) || bytes.Contains(ct, raw[:440]) {
		t.Fatal("plaintext of the image on the host's storage")
	}
	leftovers, _ := filepath.Glob(filepath.Join(alice.Store.Dir, ".create-*"))
	if len(leftovers) != 0 {
		t.Fatalf("plaintext temporary files left in the keystore: %v", leftovers)
	}
}
