package nbd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"
)

func dialClient(t *testing.T, sock, export string) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := Dial(ctx, "unix", sock, export)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestClientReadWrite(t *testing.T) {
	const size = 8 << 20
	sb := newSparse(size)
	sock := serve(t, &Server{Backend: sb, Name: "vm"})
	c := dialClient(t, sock, "vm")
	ctx := context.Background()
	if c.Size() != size || c.ReadOnly() || !c.CanTrim() || !c.CanFUA() {
		t.Fatalf("size %d readonly %v trim %v fua %v", c.Size(), c.ReadOnly(), c.CanTrim(), c.CanFUA())
	}

	data := pattern(1<<20, 3)
	if err := c.Write(ctx, data, 4096, false); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(sb.bytes(4096, len(data)), data) {
		t.Fatal("backend does not hold what was written")
	}
	got := make([]byte, len(data))
	if err := c.Read(ctx, got, 4096); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("read back differs")
	}

	// FUA and FLUSH reach the server (which flushes the backend for FUA).
	f0 := sb.flushes.Load()
	if err := c.Write(ctx, []byte("fua!"), 3, true); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if n := sb.flushes.Load() - f0; n != 2 {
		t.Errorf("%d backend flushes for a FUA write and a flush, want 2", n)
	}

	if err := c.Trim(ctx, 4096, 8192); err != nil {
		t.Fatal(err)
	}
	if sb.trims.Load() != 1 || !bytes.Equal(sb.bytes(4096, 8192), make([]byte, 8192)) {
		t.Errorf("trim: %d trims, range zero %v", sb.trims.Load(), bytes.Equal(sb.bytes(4096, 8192), make([]byte, 8192)))
	}

	// Unaligned, odd-sized, at the very end.
	tail := []byte("the end")
	if err := c.Write(ctx, tail, size-int64(len(tail)), false); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 100)
	n, err := c.ReadAt(buf, size-int64(len(tail)))
	if n != len(tail) || err != io.EOF || string(buf[:n]) != "the end" {
		t.Errorf("ReadAt at the end: %d %v %q", n, err, buf[:n])
	}
	if n, err := c.ReadAt(buf, size); n != 0 || err != io.EOF {
		t.Errorf("ReadAt past the end: %d %v", n, err)
	}
	if n, err := c.WriteAt([]byte("xy"), 10); n != 2 || err != nil {
		t.Errorf("WriteAt: %d %v", n, err)
	}
	if err := c.Read(ctx, nil, 0); err != nil {
		t.Errorf("empty read: %v", err)
	}
}

// TestClientChunked splits requests larger than the maximum payload and
// pipelines the parts.
func TestClientChunked(t *testing.T) {
	m := newMem(1 << 20)
	sock := serve(t, &Server{Backend: m})
	c := dialClient(t, sock, "")
	c.maxBlock = 4096 // as if the server had advertised it
	ctx := context.Background()
	data := pattern(300000, 9)
	if err := c.Write(ctx, data, 777, false); err != nil {
		t.Fatal(err)
	}
	if w := m.writes.Load(); w != (300000+4095)/4096 {
		t.Errorf("%d backend writes, want %d", w, (300000+4095)/4096)
	}
	got := make([]byte, len(data))
	if err := c.Read(ctx, got, 777); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("chunked read back differs")
	}
}

// TestClientConcurrent runs many goroutines on one client; each owns a
// region, so every read must return that goroutine's last write.
func TestClientConcurrent(t *testing.T) {
	m := newMem(4 << 20)
	m.delay = func(off int64) time.Duration { return time.Duration(off%7) * time.Millisecond }
	sock := serve(t, &Server{Backend: m})
	c := dialClient(t, sock, "")
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for g := range 16 {
		wg.Go(func() {
			base := int64(g) * 256 << 10
			for i := range 20 {
				p := pattern(4096+i*512, byte(g*31+i))
				off := base + int64(i)*1024
				if err := c.Write(ctx, p, off, i%5 == 0); err != nil {
					errs <- err
					return
				}
				got := make([]byte, len(p))
				if err := c.Read(ctx, got, off); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(got, p) {
					errs <- fmt.Errorf("goroutine %d, round %d: read back differs", g, i)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestClientErrors(t *testing.T) {
	ctx := context.Background()
	m := newMem(1 << 20)
	sock := serve(t, &Server{Backend: m, Name: "vm", MinBlockSize: 512})
	c := dialClient(t, sock, "")

	// Range errors are caught before sending.
	if err := c.Read(ctx, make([]byte, 10), 1<<20-5); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("read past the end: %v", err)
	}
	if err := c.Write(ctx, []byte{1}, -1, false); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("write at -1: %v", err)
	}
	// The server refuses a misaligned request; the connection survives.
	var ne *Error
	if err := c.Write(ctx, []byte{1}, 1, false); !errors.As(err, &ne) || ne.Op != "write" || !errors.Is(err, syscall.EINVAL) {
		t.Errorf("misaligned write: %v", err)
	}
	if err := c.Write(ctx, make([]byte, 512), 0, false); err != nil {
		t.Errorf("write after errors: %v", err)
	}
	full := newMem(4096)
	full.writeErr = fmt.Errorf("disk full: %w", syscall.ENOSPC)
	fc := dialClient(t, serve(t, &Server{Backend: full}), "")
	if err := fc.Write(ctx, make([]byte, 512), 0, false); !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("write to a full backend: %v", err)
	}
	if err := c.Trim(ctx, 0, 512); !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("trim without Trimmer: %v", err)
	}

	// Unknown export.
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if c2, err := Dial(dctx, "unix", sock, "nope"); err == nil {
		c2.Close()
		t.Error("Dial of an unknown export succeeded")
	}

	// Read-only export.
	ro := dialClient(t, serve(t, &Server{Backend: newMem(4096), ReadOnly: true}), "")
	if err := ro.Write(ctx, []byte{1}, 0, false); !errors.Is(err, syscall.EPERM) || !ro.ReadOnly() {
		t.Errorf("write to a read-only export: %v", err)
	}

	// After Close every request fails.
	c.Close()
	if err := c.Read(ctx, make([]byte, 512), 0); !errors.Is(err, ErrClientClosed) {
		t.Errorf("read after Close: %v", err)
	}
	c.Close() // idempotent
}

// TestClientCancel: a request whose context ends breaks the connection.
func TestClientCancel(t *testing.T) {
	m := newMem(1 << 20)
	m.delay = func(int64) time.Duration { return time.Second }
	c := dialClient(t, serve(t, &Server{Backend: m}), "")
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := c.Read(ctx, make([]byte, 4096), 0); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("read with expired context: %v", err)
	}
	if err := c.Write(context.Background(), []byte{1}, 0, false); err == nil {
		t.Fatal("connection still usable after an abandoned request")
	}
}

// TestClientServerGone: requests in flight when the server dies fail.
func TestClientServerGone(t *testing.T) {
	dir, err := os.MkdirTemp("", "nbdc")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "s")
	m := newMem(1 << 20)
	m.delay = func(int64) time.Duration { return 200 * time.Millisecond }
	s := &Server{Backend: m, Logger: testLogger(t)}
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, l) }()
	c := dialClient(t, sock, "")
	res := make(chan error, 1)
	go func() { res <- c.Read(context.Background(), make([]byte, 4096), 0) }()
	time.Sleep(50 * time.Millisecond)
	cancel() // drains the read, then hangs up
	if err := <-res; err != nil {
		t.Errorf("read in flight at shutdown: %v", err)
	}
	<-done
	if err := c.Read(context.Background(), make([]byte, 4096), 0); err == nil {
		t.Error("read after the server went away succeeded")
	}
}

// TestClientQemuNBD checks the client against qemu-nbd.
func TestClientQemuNBD(t *testing.T) {
	qemuNBD := needTool(t, "qemu-nbd")
	dir, err := os.MkdirTemp("", "nbdq")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	img, sock := filepath.Join(dir, "disk.raw"), filepath.Join(dir, "q")
	const size = 4 << 20
	if err := os.WriteFile(img, pattern(size, 1), 0o600); err != nil {
		t.Fatal(err)
	}
	q := exec.Command(qemuNBD, "-f", "raw", "-k", sock, "-x", "disk", "--discard=unmap", "-t", img)
	var stderr bytes.Buffer
	q.Stderr = &stderr
	if err := q.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { q.Process.Kill(); q.Wait() }()
	var c *Client
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, err = Dial(ctx, "unix", sock, "disk")
		cancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("qemu-nbd: %v\n%s", err, stderr.String())
		}
	}
	defer c.Close()
	ctx := context.Background()
	if c.Size() != size || c.ReadOnly() {
		t.Fatalf("qemu-nbd export: size %d read-only %v", c.Size(), c.ReadOnly())
	}
	want := pattern(size, 1)
	got := make([]byte, size)
	if err := c.Read(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("read from qemu-nbd differs from the file")
	}
	w := pattern(65536+3, 2)
	copy(want[12345:], w)
	if err := c.Write(ctx, w, 12345, false); err != nil {
		t.Fatal(err)
	}
	copy(want[1<<20:], []byte("fua"))
	if err := c.Write(ctx, []byte("fua"), 1<<20, true); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if c.CanTrim() {
		if err := c.Trim(ctx, 2<<20, 1<<20); err != nil {
			t.Fatal(err)
		}
		// Trim contents are unspecified; make them definite again.
		copy(want[2<<20:3<<20], make([]byte, 1<<20))
		if err := c.Write(ctx, make([]byte, 1<<20), 2<<20, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Read(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("read back from qemu-nbd differs")
	}
	if err := c.Read(ctx, got[:10], size-5); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("read past the end: %v", err)
	}
	c.Close()
	file, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(file, want) {
		t.Fatal("the file qemu-nbd serves does not hold what was written")
	}
}
