package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// fileBackend serves a file with pread/pwrite, the same work qemu-nbd does
// for a raw image, so the comparison measures the servers.
type fileBackend struct{ f *os.File }

func (b fileBackend) ReadAt(p []byte, off int64) (int, error)  { return b.f.ReadAt(p, off) }
func (b fileBackend) WriteAt(p []byte, off int64) (int, error) { return b.f.WriteAt(p, off) }
func (b fileBackend) Size() int64 {
	fi, err := b.f.Stat()
	if err != nil {
		return 0
	}
	return fi.Size()
}
func (b fileBackend) Flush() error { return b.f.Sync() }

// TestThroughputVsQemuNBD compares this server with qemu-nbd under fio on
// the same raw file. It takes about a minute, so it only runs with
// NBD_BENCH=1:
//
//	NBD_BENCH=1 go test -run ThroughputVsQemuNBD -v ./internal/nbd/
func TestThroughputVsQemuNBD(t *testing.T) {
	if os.Getenv("NBD_BENCH") == "" {
		t.Skip("set NBD_BENCH=1 to compare with qemu-nbd")
	}
	needTool(t, "fio")
	qemuNBD := needTool(t, "qemu-nbd")
	const size = 256 << 20
	dir, err := os.MkdirTemp("", "nbdb")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	img := filepath.Join(dir, "disk.img")
	f, err := os.OpenFile(img, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Write(pattern(size, 1)); err != nil { // allocated, non-zero data
		t.Fatal(err)
	}

	ours := serve(t, &Server{Backend: fileBackend{f}, Logger: discardLogger()})
	qsock := filepath.Join(dir, "q")
	qemu := exec.Command(qemuNBD, "-f", "raw", "-k", qsock, "--cache=writeback", "--aio=threads", "-e", "4", "-t", img)
	qemu.Stderr = os.Stderr
	if err := qemu.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { qemu.Process.Kill(); qemu.Wait() }()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(qsock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("qemu-nbd socket did not appear")
		}
	}

	jobs := []struct {
		name, rw, bs string
		depth        int
	}{
		{"seq-read-1M", "read", "1M", 8},
		{"seq-write-1M", "write", "1M", 8},
		{"rand-read-4k", "randread", "4k", 32},
		{"rand-write-4k", "randwrite", "4k", 32},
	}
	for _, j := range jobs {
		var res [2]float64
		for round := range 2 { // alternate to even out cache and CPU noise
			for i, sock := range []string{ours, qsock} {
				v := fioRun(t, sock, j.rw, j.bs, j.depth)
				res[i] += v / 2
				_ = round
			}
		}
		unit := "MiB/s"
		if j.bs == "4k" {
			unit = "kIOPS"
		}
		t.Logf("%-14s vmbond %8.1f %s   qemu-nbd %8.1f %s   ratio %.2f", j.name, res[0], unit, res[1], unit, res[0]/res[1])
	}
}

// fioRun runs one 5 s fio job and returns MiB/s for 1M blocks or kIOPS for
// 4k blocks.
func fioRun(t *testing.T, sock, rw, bs string, depth int) float64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "fio", "--name=b", "--ioengine=nbd", "--uri="+nbdURI(sock),
		"--rw="+rw, "--bs="+bs, fmt.Sprintf("--iodepth=%d", depth), "--size=256M",
		"--time_based", "--runtime=5", "--ramp_time=1", "--output-format=json").Output()
	if err != nil {
		t.Fatalf("fio %s %s: %v\n%s", rw, bs, err, out)
	}
	var r struct {
		Jobs []struct {
			Read, Write struct {
				BW   float64 `json:"bw"` // KiB/s
				IOPS float64 `json:"iops"`
			}
		} `json:"jobs"`
	}
	if i := bytes.IndexByte(out, '{'); i > 0 {
		out = out[i:] // the nbd engine prints a line first
	}
	if err := json.Unmarshal(out, &r); err != nil || len(r.Jobs) == 0 {
		t.Fatalf("fio output: %v\n%s", err, out)
	}
	d := r.Jobs[0].Read
	if rw == "write" || rw == "randwrite" {
		d = r.Jobs[0].Write
	}
	if bs == "4k" {
		return d.IOPS / 1000
	}
	return d.BW / 1024
}

// BenchmarkRead4K measures the per-request cost of the server with a
// pipelining in-process client (queue depth 16).
func BenchmarkRead4K(b *testing.B) { benchIO(b, cmdRead, 4096) }

// BenchmarkWrite4K is BenchmarkRead4K for writes.
func BenchmarkWrite4K(b *testing.B) { benchIO(b, cmdWrite, 4096) }

// BenchmarkRead1M is BenchmarkRead4K with 1 MiB requests.
func BenchmarkRead1M(b *testing.B) { benchIO(b, cmdRead, 1<<20) }

// BenchmarkWrite1M is BenchmarkWrite4K with 1 MiB requests.
func BenchmarkWrite1M(b *testing.B) { benchIO(b, cmdWrite, 1<<20) }

func benchIO(b *testing.B, typ uint16, bs int) {
	const size, depth = 64 << 20, 16
	m := newMem(size)
	copy(m.data, pattern(size, 3))
	c := connect(b, serve(b, &Server{Backend: m, Logger: discardLogger()}), false, false)
	c.c.SetDeadline(time.Time{})
	payload := pattern(bs, 1)
	reqs := make(chan struct{}, depth)
	b.SetBytes(int64(bs))
	b.ReportAllocs()
	b.ResetTimer()
	go func() {
		hdr := make([]byte, requestSize)
		binary.BigEndian.PutUint32(hdr, requestMagic)
		binary.BigEndian.PutUint16(hdr[6:], typ)
		binary.BigEndian.PutUint32(hdr[24:], uint32(bs))
		for i := range b.N {
			reqs <- struct{}{}
			binary.BigEndian.PutUint64(hdr[16:], uint64(i*bs)%(size-uint64(bs)))
			c.c.Write(hdr)
			if typ == cmdWrite {
				c.c.Write(payload)
			}
		}
	}()
	h := make([]byte, simpleReplySize)
	for range b.N {
		if _, err := io.ReadFull(c.br, h); err != nil {
			b.Fatal(err)
		}
		if typ == cmdRead {
			c.br.Discard(bs)
		}
		<-reqs
	}
}
