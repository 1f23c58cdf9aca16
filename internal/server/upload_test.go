//go:build unix

package server

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/vmbond/vmbond/internal/proto"
)

// allocated returns the bytes a file occupies on disk.
func allocated(t *testing.T, path string) (size, alloc int64) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		t.Skip("no block counts on this platform")
	}
	return fi.Size(), int64(st.Blocks) * 512
}

// sparseImage is 8 MiB of zeros with data in a few blocks, ending in zeros.
func sparseImage() []byte {
	img := make([]byte, 8<<20)
	copy(img[0:], "header block")
	copy(img[4096*1000+17:], "middle")
	img[5<<20] = 1
	copy(img[5<<20+4096:], bytes.Repeat([]byte{0xFF}, 3*4096)) // a run of blocks
	return img
}

func listDir(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

func TestSparseUpload(t *testing.T) {
	e := newEnv(t, nil)
	alpha := e.tenant("alpha")
	img := sparseImage()
	for _, tc := range []struct {
		name string
		body func() any
	}{
		{"content-length", func() any { return img }},
		{"chunked", func() any { return io.MultiReader(bytes.NewReader(img)) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e.must("PUT", "/v1/vms/vm-1/disk", alpha, tc.body(), nil)
			path := filepath.Join(e.dir, "images", "vm-1.img")
			got, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, img) {
				t.Fatal("stored image differs from the upload")
			}
			size, alloc := allocated(t, path)
			if size != int64(len(img)) {
				t.Fatalf("size %d, want %d", size, len(img))
			}
			if alloc >= size/4 {
				t.Fatalf("image occupies %d of %d bytes: not sparse", alloc, size)
			}
			fi, _ := os.Stat(path)
			if fi.Mode().Perm() != 0o600 {
				t.Errorf("image mode %v", fi.Mode().Perm())
			}
		})
	}
	if names := listDir(t, filepath.Join(e.dir, "images")); len(names) != 1 {
		t.Fatalf("images dir holds %v, want only vm-1.img", names)
	}
	// Boot files land under boot/{vm}/.
	e.must("PUT", "/v1/vms/vm-1/boot/kernel", alpha, "vmlinuz", nil)
	if b, err := os.ReadFile(filepath.Join(e.dir, "boot", "vm-1", "kernel")); err != nil || string(b) != "vmlinuz" {
		t.Fatalf("kernel %q, %v", b, err)
	}
	st, out := e.do("PUT", "/v1/vms/vm-1/boot/bzImage", alpha, "x")
	e.wantError(st, out, 400, proto.CodeBadRequest, `unknown boot file "bzImage"`)
	// Empty upload: an empty file.
	e.must("PUT", "/v1/vms/vm-2/disk", alpha, "", nil)
	if size, _ := allocated(t, filepath.Join(e.dir, "images", "vm-2.img")); size != 0 {
		t.Fatalf("empty upload size %d", size)
	}
}

func TestUploadLimitsAndOwnership(t *testing.T) {
	const max = 1 << 20
	e := newEnv(t, func(c *Config) { c.MaxImageSize = max })
	alpha := e.tenant("alpha")
	beta := e.tenant("beta")
	over := bytes.Repeat([]byte{7}, max+1)
	for _, tc := range []struct {
		name string
		body func() any
	}{
		{"declared too large", func() any { return over }},
		{"streamed too large", func() any { return io.MultiReader(bytes.NewReader(over)) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st, out := e.do("PUT", "/v1/vms/vm-1/disk", alpha, tc.body())
			e.wantError(st, out, 413, proto.CodeBadRequest, "exceeds the limit of 1048576 bytes")
			if names := listDir(t, filepath.Join(e.dir, "images")); len(names) != 0 {
				t.Fatalf("refused upload left %v behind", names)
			}
		})
	}
	// Exactly at the limit is fine, and a refused upload left no claim:
	// beta can take the id.
	e.must("PUT", "/v1/vms/vm-1/disk", beta, over[:max], nil)
	st, out := e.do("PUT", "/v1/vms/vm-1/disk", alpha, "mine")
	e.wantError(st, out, 409, proto.CodeConflict, "taken by another tenant")
	st, out = e.do("PUT", "/v1/vms/vm-1/boot/initrd", alpha, "mine")
	e.wantError(st, out, 409, proto.CodeConflict, "taken by another tenant")
	if b, _ := os.ReadFile(filepath.Join(e.dir, "images", "vm-1.img")); len(b) != max {
		t.Fatal("refused upload replaced beta's image")
	}
	// The owner may replace its own upload.
	e.must("PUT", "/v1/vms/vm-1/disk", beta, "v2", nil)
	if b, _ := os.ReadFile(filepath.Join(e.dir, "images", "vm-1.img")); string(b) != "v2" {
		t.Fatalf("replaced image %q", b)
	}
	// Boot files have their own limit, and a refused boot upload leaves no
	// directory behind.
	bigBoot := io.LimitReader(zeroReader{}, MaxBootFileSize+1)
	st, out = e.do("PUT", "/v1/vms/vm-3/boot/kernel", alpha, bigBoot)
	e.wantError(st, out, 413, proto.CodeBadRequest, "exceeds the limit")
	if names := listDir(t, filepath.Join(e.dir, "boot")); len(names) != 0 {
		t.Fatalf("refused boot upload left %v", names)
	}
	st, out = e.do("PUT", "/v1/vms/Bad/disk", alpha, "x")
	e.wantError(st, out, 400, proto.CodeBadRequest, "invalid vm")
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}
