package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vmbond/vmbond/internal/nbd"
)

// Durability of `vmbond disk serve` across SIGKILL: writes acknowledged
// before a completed FLUSH (or acknowledged with FUA) must survive, and no
// block may be torn.
//
// SIGKILL ends the server, not the machine: the page cache survives, so this
// checks that the server acknowledges only writes it has made (and in
// order), not that Flush reaches stable storage (fdatasync; see package
// disk's tests).

const (
	dBlock   = 4096
	dImage   = 64 << 20
	dStride  = 8 // test every 8th block: 2048 blocks over the whole image
	dBlocks  = dImage / dBlock / dStride
	dWriters = 8 // goroutines per client; each owns the blocks i%dWriters
	dClients = 2 // connections: the server advertises CAN_MULTI_CONN
	dSumOff  = dBlock - sha256.Size
)

// buildVmbond builds the vmbond binary into a temporary directory.
func buildVmbond(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "vmbond")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "github.com/vmbond/vmbond/cmd/vmbond")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// makeBlock fills b with a checksummed block: sequence number, block
// number, random fill, SHA-256 of the rest.
func makeBlock(b []byte, seq uint64, blk int, rng *rand.ChaCha8) {
	binary.BigEndian.PutUint64(b[0:], seq)
	binary.BigEndian.PutUint64(b[8:], uint64(blk))
	rng.Read(b[16:dSumOff])
	sum := sha256.Sum256(b[:dSumOff])
	copy(b[dSumOff:], sum[:])
}

// parseBlock returns the sequence number of a valid block, 0 for an
// all-zero block, or an error for anything else (torn or misplaced).
func parseBlock(b []byte, blk int) (uint64, error) {
	if bytes.Equal(b, make([]byte, dBlock)) {
		return 0, nil
	}
	sum := sha256.Sum256(b[:dSumOff])
	if !bytes.Equal(sum[:], b[dSumOff:]) {
		return 0, fmt.Errorf("block %d is torn or corrupt (checksum mismatch; header % x)", blk, b[:16])
	}
	seq, idx := binary.BigEndian.Uint64(b[0:]), binary.BigEndian.Uint64(b[8:])
	if idx != uint64(blk) || seq == 0 {
		return 0, fmt.Errorf("block %d holds block %d's data (seq %d): misdirected write", blk, idx, seq)
	}
	return seq, nil
}

// diskServer is a `vmbond disk serve` subprocess.
type diskServer struct {
	cmd  *exec.Cmd
	sock string
	log  string
	done chan struct{}
}

func startDiskServer(t *testing.T, bin, img, key, sock, logPath string) *diskServer {
	t.Helper()
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(bin, "disk", "serve", img, "--key-file", key, "--socket", sock)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s := &diskServer{cmd: cmd, sock: sock, log: logPath, done: make(chan struct{})}
	go func() { cmd.Wait(); close(s.done) }()
	t.Cleanup(func() { s.kill() })
	return s
}

func (s *diskServer) kill() {
	s.cmd.Process.Signal(syscall.SIGKILL)
	<-s.done
}

// dial connects to the server, retrying until it listens.
func (s *diskServer) dial(t *testing.T) *nbd.Client {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		c, err := nbd.Dial(ctx, "unix", s.sock, "")
		cancel()
		if err == nil {
			return c
		}
		select {
		case <-s.done:
			out, _ := os.ReadFile(s.log)
			t.Fatalf("vmbond disk serve exited: %v\n%s", s.cmd.ProcessState, out)
		default:
		}
		if time.Now().After(deadline) {
			out, _ := os.ReadFile(s.log)
			t.Fatalf("cannot connect to vmbond disk serve: %v\n%s", err, out)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// model is what the writers know about each test block. Each block has a
// single owner goroutine with at most one write in flight, so sequence
// numbers order the writes of a block.
type model struct {
	mu       sync.Mutex
	acked    [dBlocks]uint64 // newest acknowledged write
	durable  [dBlocks]uint64 // newest write known durable (flushed or FUA)
	inflight atomic.Int64    // writes sent and not yet answered
	ackCount atomic.Int64
	flushes  atomic.Int64
	failed   atomic.Int64 // writes that got an error (the server died)
}

func (m *model) ack(blk int, seq uint64, fua bool) {
	m.mu.Lock()
	m.acked[blk] = seq
	if fua {
		m.durable[blk] = seq
	}
	m.mu.Unlock()
	m.ackCount.Add(1)
}

// flush flushes through c and marks every write acknowledged before the
// flush was sent as durable once it completes.
func (m *model) flush(ctx context.Context, c *nbd.Client) error {
	m.mu.Lock()
	snap := m.acked
	m.mu.Unlock()
	if err := c.Flush(ctx); err != nil {
		return err
	}
	m.mu.Lock()
	for i, s := range snap {
		m.durable[i] = max(m.durable[i], s)
	}
	m.mu.Unlock()
	m.flushes.Add(1)
	return nil
}

// TestDurabilityAcrossKill writes checksummed blocks through `vmbond disk
// serve`, SIGKILLs it while writes are in flight, restarts it and checks
// every block: flushed data is never lost or rolled back, and nothing is
// torn. It repeats with several kill points, then checks that qemu-img and
// `vmbond disk convert --decrypt` decrypt the image to the same plaintext.
func TestDurabilityAcrossKill(t *testing.T) {
	requireTool(t, "qemu-img")
	bin := buildVmbond(t)
	work := t.TempDir()
	img, key := filepath.Join(work, "disk.img"), filepath.Join(work, "disk.key")
	if out, err := exec.Command(bin, "disk", "create", img, "--size", "64M", "--key-file", key).CombinedOutput(); err != nil {
		t.Fatalf("disk create: %v\n%s", err, out)
	}
	sockDir, err := os.MkdirTemp("", "vmbd") // short: sun_path is ~108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	sock := filepath.Join(sockDir, "s")
	logPath := filepath.Join(work, "serve.log")

	m := &model{}
	var seq atomic.Uint64
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	// Kill after this many acknowledged writes in the round; the last round
	// kills right after a flush completed.
	killAfter := []int64{3000, 9000, 500, 6000}
	var inflightAtKill int64
	for round, n := range killAfter {
		srv := startDiskServer(t, bin, img, key, sock, logPath)
		clients := make([]*nbd.Client, dClients)
		for i := range clients {
			clients[i] = srv.dial(t)
		}
		if round > 0 {
			verifyBlocks(t, clients[0], m, round)
		}
		m.ackCount.Store(0)
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		for ci, c := range clients {
			for w := range dWriters {
				owner := ci*dWriters + w
				rng := rand.NewChaCha8([32]byte{byte(round), byte(owner), byte(seed), byte(seed >> 8), byte(seed >> 16)})
				pick := rand.New(rng)
				wg.Go(func() {
					buf := make([]byte, dBlock)
					for i := 0; ctx.Err() == nil; i++ {
						blk := owner + dClients*dWriters*pick.IntN(dBlocks/(dClients*dWriters))
						s := seq.Add(1)
						makeBlock(buf, s, blk, rng)
						fua := i%7 == 3
						m.inflight.Add(1)
						err := c.Write(context.Background(), buf, int64(blk)*dStride*dBlock, fua)
						m.inflight.Add(-1)
						if err != nil {
							m.failed.Add(1)
							return // the server is gone; this write's fate is unknown
						}
						m.ack(blk, s, fua)
					}
				})
			}
		}
		// A flusher on each connection: a flush covers writes acknowledged
		// on either connection (CAN_MULTI_CONN).
		flushDone := make(chan struct{})
		for _, c := range clients {
			wg.Go(func() {
				for ctx.Err() == nil {
					select {
					case <-flushDone:
						return
					case <-time.After(time.Duration(5+rand.IntN(20)) * time.Millisecond):
					}
					if m.flush(context.Background(), c) != nil {
						return
					}
				}
			})
		}
		last := round == len(killAfter)-1
		deadline := time.Now().Add(2 * time.Minute)
		for m.ackCount.Load() < n {
			if time.Now().After(deadline) {
				t.Fatalf("round %d: only %d writes acknowledged in 2 minutes", round, m.ackCount.Load())
			}
			time.Sleep(time.Millisecond)
		}
		if last {
			close(flushDone)
			if err := m.flush(context.Background(), clients[0]); err != nil {
				t.Fatalf("flush before kill: %v", err)
			}
		}
		inflight := m.inflight.Load()
		srv.kill()
		inflightAtKill += inflight
		cancel()
		wg.Wait()
		if !last {
			close(flushDone)
		}
		for _, c := range clients {
			c.Close()
		}
		t.Logf("round %d: killed after %d acknowledged writes with %d in flight; %d flushes so far, %d writes failed",
			round, m.ackCount.Load(), inflight, m.flushes.Load(), m.failed.Load())
	}
	if inflightAtKill == 0 {
		t.Error("no write was in flight at any kill")
	}

	// Final check, then compare with standard tools.
	srv := startDiskServer(t, bin, img, key, sock, logPath)
	c := srv.dial(t)
	verifyBlocks(t, c, m, len(killAfter))
	plain := make([]byte, dImage)
	if err := c.Read(context.Background(), plain, 0); err != nil {
		t.Fatal(err)
	}
	c.Close()
	srv.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-srv.done:
	case <-time.After(30 * time.Second):
		t.Fatal("vmbond disk serve did not exit on SIGTERM")
	}

	qraw := filepath.Join(work, "qemu.raw")
	if out, err := exec.Command("qemu-img", "convert", "--object", "secret,id=s0,file="+key,
		"--image-opts", "driver=luks,file.filename="+img+",key-secret=s0", "-O", "raw", qraw).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert: %v\n%s", err, out)
	}
	qb, err := os.ReadFile(qraw)
	if err != nil {
		t.Fatal(err)
	}
	if len(qb) != dImage {
		t.Fatalf("qemu-img wrote %d bytes, want %d", len(qb), dImage)
	}
	// qemu-img decrypts never-written sectors (zero ciphertext) to garbage,
	// where vmbond reads zeros (see package disk): compare written blocks.
	written := 0
	for off := 0; off < dImage; off += dBlock {
		v := plain[off : off+dBlock]
		if bytes.Equal(v, make([]byte, dBlock)) {
			continue
		}
		written++
		if !bytes.Equal(qb[off:off+dBlock], v) {
			t.Fatalf("qemu-img decrypts block at %d differently from vmbond", off)
		}
	}
	if written == 0 {
		t.Fatal("no block was written")
	}
	vraw := filepath.Join(work, "vmbond.raw")
	if out, err := exec.Command(bin, "disk", "convert", "--decrypt", img, vraw, "--key-file", key).CombinedOutput(); err != nil {
		t.Fatalf("vmbond disk convert --decrypt: %v\n%s", err, out)
	}
	vb, err := os.ReadFile(vraw)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(vb, plain) {
		t.Fatal("vmbond disk convert --decrypt differs from reading through vmbond disk serve")
	}
	t.Logf("%d blocks written; qemu-img and vmbond disk convert agree with NBD reads", written)
}

// verifyBlocks reads every test block after a restart and checks it
// against the model, then flushes and makes what it read the new baseline.
func verifyBlocks(t *testing.T, c *nbd.Client, m *model, round int) {
	t.Helper()
	ctx := context.Background()
	b := make([]byte, dBlock)
	m.mu.Lock()
	defer m.mu.Unlock()
	var problems []error
	survived, newer, older := 0, 0, 0
	for blk := range dBlocks {
		if err := c.Read(ctx, b, int64(blk)*dStride*dBlock); err != nil {
			t.Fatalf("read block %d: %v", blk, err)
		}
		s, err := parseBlock(b, blk)
		if err != nil {
			problems = append(problems, err)
			continue
		}
		if s < m.durable[blk] {
			problems = append(problems, fmt.Errorf("block %d: holds seq %d, older than its durable seq %d (acked %d)",
				blk, s, m.durable[blk], m.acked[blk]))
			continue
		}
		switch {
		case s == m.acked[blk]:
			survived++
		case s > m.acked[blk]:
			newer++ // a write in flight at the kill landed
		default:
			older++ // an acknowledged but unflushed write may be lost
		}
		m.acked[blk], m.durable[blk] = s, s
	}
	if err := c.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if len(problems) > 0 {
		t.Fatalf("after kill %d: %d bad blocks:\n%v", round, len(problems), errors.Join(problems[:min(len(problems), 20)]...))
	}
	t.Logf("after kill %d: all %d blocks valid; %d hold their last acknowledged write, %d a newer one in flight at the kill, %d an older one (last write unflushed)",
		round, dBlocks, survived, newer, older)
}
