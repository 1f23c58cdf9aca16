package nbd

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"net"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

func pattern(n int, seed byte) []byte {
	p := make([]byte, n)
	for i := range min(n, 251) { // prime period, so blocks differ
		p[i] = byte(i*7) ^ seed | 1 // never zero, so no hole replies
	}
	for k := 251; k < n; k *= 2 {
		copy(p[k:], p[:k])
	}
	return p
}

func forEachMode(t *testing.T, f func(t *testing.T, structured bool)) {
	for _, structured := range []bool{false, true} {
		t.Run(fmt.Sprintf("structured=%v", structured), func(t *testing.T) { f(t, structured) })
	}
}

func TestReadWrite(t *testing.T) {
	forEachMode(t, func(t *testing.T, structured bool) {
		m := newMem(8 << 20)
		c := connect(t, serve(t, &Server{Backend: m}), structured, false)
		tests := []struct {
			off   uint64
			n     int
			flags uint16
		}{
			{0, 4096, 0},
			{4096, 1 << 20, 0},
			{12345, 777, 0},   // unaligned is fine with min block 1
			{8<<20 - 1, 1, 0}, // last byte
			{2 << 20, 0, 0},   // zero length
			{3 << 20, 65536, cmdFlagFUA},
			{0, maxPayload / 4, 0}, // larger than the reply coalescing buffer
		}
		for i, tt := range tests {
			p := pattern(tt.n, byte(i))
			flushes := m.flushes.Load()
			if errno := c.writeAt(p, tt.off, tt.flags); errno != 0 {
				t.Fatalf("write %d@%d: errno %d", tt.n, tt.off, errno)
			}
			if got := m.flushes.Load() - flushes; (tt.flags&cmdFlagFUA != 0) != (got == 1) {
				t.Errorf("write %d@%d flags %#x: %d flushes", tt.n, tt.off, tt.flags, got)
			}
			if !bytes.Equal(m.bytes(int(tt.off), tt.n), p) {
				t.Fatalf("backend content after write %d@%d differs", tt.n, tt.off)
			}
			got, errno := c.readAt(tt.off, tt.n, 0)
			if errno != 0 || !bytes.Equal(got, p) {
				t.Fatalf("read %d@%d: errno %d, equal %v", tt.n, tt.off, errno, bytes.Equal(got, p))
			}
		}
		if errno := c.do(cmdFlush, 0, 0, 0); errno != 0 || m.flushes.Load() != 2 {
			t.Errorf("flush: errno %d, flushes %d", errno, m.flushes.Load())
		}
		if errno := c.do(cmdCache, 0, 0, 4096); errno != 0 {
			t.Errorf("cache: errno %d", errno)
		}
		if structured {
			if _, errno := c.readAt(0, 4096, cmdFlagDF); errno != 0 {
				t.Errorf("read with DF: errno %d", errno)
			}
		}
		c.request(cmdDisc, 0, 1, 0, 0, nil)
		c.expectClosed()
	})
}

func TestStructuredReadHole(t *testing.T) {
	m := newMem(1 << 20)
	c := connect(t, serve(t, &Server{Backend: m}), true, false)
	c.request(cmdRead, 0, 5, 8192, 65536, nil)
	r := c.readReply(nil)
	if r.typ != replyTypeOffsetHole || r.flags != replyFlagDone || len(r.payload) != 12 ||
		binary.BigEndian.Uint64(r.payload) != 8192 || binary.BigEndian.Uint32(r.payload[8:]) != 65536 {
		t.Fatalf("reply %+v, want one OFFSET_HOLE chunk", r)
	}
	c.request(cmdRead, 0, 6, 0, 0, nil)
	if r := c.readReply(nil); r.typ != replyTypeNone || r.flags != replyFlagDone || r.cookie != 6 {
		t.Fatalf("zero-length read reply %+v, want NONE", r)
	}
}

func TestRequestErrors(t *testing.T) {
	const size = 1 << 20
	payload := make([]byte, 4096)
	tests := []struct {
		name       string
		srv        func(*Server)
		plain      bool // backend without optional interfaces
		structured bool
		meta       bool
		typ, flags uint16
		off        uint64
		length     uint32
		payload    bool
		want       uint32
	}{
		{name: "read past end", typ: cmdRead, off: size - 1, length: 2, want: errInval},
		{name: "read offset past end", typ: cmdRead, off: size + 4096, length: 1, want: errInval},
		{name: "read offset overflow", typ: cmdRead, off: math.MaxUint64, length: 2, want: errInval},
		{name: "write past end", typ: cmdWrite, off: size - 1, length: 4096, payload: true, want: errNoSpc},
		{name: "write zeroes past end", typ: cmdWriteZeroes, off: size, length: 1, want: errNoSpc},
		{name: "trim past end", typ: cmdTrim, off: size - 1, length: 2, want: errInval},
		{name: "block status past end", structured: true, meta: true, typ: cmdBlockStatus, off: size, length: 1, want: errInval},
		{name: "block status zero length", structured: true, meta: true, typ: cmdBlockStatus, want: errInval},
		{name: "block status without context", structured: true, typ: cmdBlockStatus, length: 1, want: errInval},
		{name: "unknown command", typ: 42, want: errInval},
		{name: "resize not supported", typ: 8, want: errInval},
		{name: "unknown flag", typ: cmdRead, flags: 1 << 9, length: 1, want: errInval},
		{name: "no hole on read", typ: cmdRead, flags: cmdFlagNoHole, length: 1, want: errInval},
		{name: "DF without structured", typ: cmdRead, flags: cmdFlagDF, length: 1, want: errInval},
		{name: "req one on write", typ: cmdWrite, flags: cmdFlagReqOne, length: 4096, payload: true, want: errInval},
		{name: "fast zero on trim", typ: cmdTrim, flags: cmdFlagFastZero, length: 1, want: errInval},
		{name: "read too large", typ: cmdRead, length: maxPayload + 1, want: errInval},
		{name: "read too large structured", structured: true, typ: cmdRead, length: maxPayload + 1, want: errOverflow},
		{name: "structured error", structured: true, typ: cmdRead, off: size, length: 1, want: errInval},
		{name: "flush with offset", typ: cmdFlush, off: 1, want: errInval},
		{name: "trim not advertised", plain: true, typ: cmdTrim, length: 1, want: errInval},
		{name: "read-only write", srv: func(s *Server) { s.ReadOnly = true }, typ: cmdWrite, length: 4096, payload: true, want: errPerm},
		{name: "read-only trim", srv: func(s *Server) { s.ReadOnly = true }, typ: cmdTrim, length: 1, want: errInval},
		{name: "read-only zeroes", srv: func(s *Server) { s.ReadOnly = true }, typ: cmdWriteZeroes, length: 1, want: errInval},
		{name: "unaligned read", srv: func(s *Server) { s.MinBlockSize = 512 }, typ: cmdRead, off: 512, length: 100, want: errInval},
		{name: "unaligned write", srv: func(s *Server) { s.MinBlockSize = 512 }, typ: cmdWrite, off: 1, length: 4096, payload: true, want: errInval},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var b Backend = newSparse(size)
			if tt.plain {
				b = newMem(size)
			}
			s := &Server{Backend: b}
			if tt.srv != nil {
				tt.srv(s)
			}
			c := connect(t, serve(t, s), tt.structured, tt.meta)
			var p []byte
			if tt.payload {
				p = payload[:tt.length]
			}
			c.request(tt.typ, tt.flags, 99, tt.off, tt.length, p)
			r := c.readReply(nil)
			if r.cookie != 99 || r.errno != tt.want {
				t.Fatalf("reply %+v, want errno %d", r, tt.want)
			}
			if tt.structured && (r.simple || r.typ != replyTypeError || r.flags != replyFlagDone) {
				t.Errorf("structured error reply %+v, want one ERROR chunk", r)
			}
			// The connection must stay in sync.
			if errno := c.do(cmdFlush, 0, 0, 0); errno != 0 {
				t.Errorf("flush after error: errno %d", errno)
			}
		})
	}
}

func TestFatalRequests(t *testing.T) {
	tests := []struct {
		name string
		send func(c *client)
	}{
		{"bad magic", func(c *client) { c.write(make([]byte, requestSize)) }},
		{"old request magic", func(c *client) {
			c.write(binary.BigEndian.AppendUint32(make([]byte, 0, requestSize), 0x12560953))
			c.write(make([]byte, requestSize-4))
		}},
		{"write larger than max payload", func(c *client) { c.request(cmdWrite, 0, 1, 0, maxPayload+1, nil) }},
		{"truncated write payload", func(c *client) {
			c.request(cmdWrite, 0, 1, 0, 4096, make([]byte, 100))
			c.c.(*net.UnixConn).CloseWrite()
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := connect(t, serve(t, &Server{Backend: newMem(1 << 20)}), false, false)
			tt.send(c)
			c.expectClosed()
		})
	}
}

func TestWriteZeroes(t *testing.T) {
	const size = 4 << 20
	t.Run("zeroer", func(t *testing.T) {
		sb := newSparse(size)
		c := connect(t, serve(t, &Server{Backend: sb}), false, false)
		for i, flags := range []uint16{0, cmdFlagNoHole, cmdFlagFastZero, cmdFlagFUA | cmdFlagNoHole | cmdFlagFastZero} {
			if errno := c.do(cmdWriteZeroes, flags, uint64(i)*8192, 8192); errno != 0 {
				t.Fatalf("flags %#x: errno %d", flags, errno)
			}
			want := zeroCall{int64(i) * 8192, 8192, flags&cmdFlagNoHole == 0}
			sb.amu.Lock()
			got := sb.zeroCalls[i]
			sb.amu.Unlock()
			if got != want {
				t.Errorf("flags %#x: call %+v, want %+v", flags, got, want)
			}
		}
		if sb.flushes.Load() != 1 {
			t.Errorf("flushes %d, want 1 (FUA)", sb.flushes.Load())
		}
	})
	t.Run("emulated", func(t *testing.T) {
		m := newMem(size)
		copy(m.data, pattern(size, 1))
		c := connect(t, serve(t, &Server{Backend: m}), true, false)
		off, n := uint64(4095), uint32(3<<20+5) // several chunks of the zero buffer
		if errno := c.do(cmdWriteZeroes, cmdFlagFastZero, off, n); errno != errNotSup {
			t.Fatalf("fast zero: errno %d, want ENOTSUP", errno)
		}
		if !bytes.Equal(m.bytes(0, size), pattern(size, 1)) {
			t.Fatalf("failed fast zero changed data")
		}
		if errno := c.do(cmdWriteZeroes, 0, off, n); errno != 0 {
			t.Fatalf("errno %d", errno)
		}
		want := pattern(size, 1)
		clear(want[off : off+uint64(n)])
		if !bytes.Equal(m.bytes(0, size), want) {
			t.Fatalf("emulated zeroes wrote wrong data")
		}
	})
	t.Run("zeroer unsupported falls back", func(t *testing.T) {
		sb := newSparse(size)
		sb.zeroErr = fmt.Errorf("no: %w", errors.ErrUnsupported)
		copy(sb.data, pattern(size, 2))
		c := connect(t, serve(t, &Server{Backend: sb}), false, false)
		if errno := c.do(cmdWriteZeroes, cmdFlagFastZero, 0, 4096); errno != errNotSup {
			t.Fatalf("fast zero: errno %d, want ENOTSUP", errno)
		}
		if errno := c.do(cmdWriteZeroes, 0, 0, 4096); errno != 0 {
			t.Fatalf("errno %d", errno)
		}
		if !bytes.Equal(sb.bytes(0, 4096), make([]byte, 4096)) {
			t.Fatalf("not zeroed")
		}
	})
}

func TestTrim(t *testing.T) {
	sb := newSparse(1 << 20)
	c := connect(t, serve(t, &Server{Backend: sb}), false, false)
	if errno := c.writeAt(pattern(8192, 3), 0, 0); errno != 0 {
		t.Fatal(errno)
	}
	if errno := c.do(cmdTrim, cmdFlagFUA, 0, 8192); errno != 0 {
		t.Fatalf("trim errno %d", errno)
	}
	if sb.trims.Load() != 1 || sb.flushes.Load() != 1 {
		t.Errorf("trims %d flushes %d, want 1 and 1", sb.trims.Load(), sb.flushes.Load())
	}
	if errno := c.do(cmdTrim, 0, 0, 0); errno != 0 || sb.trims.Load() != 1 {
		t.Errorf("zero-length trim: errno %d, trims %d", errno, sb.trims.Load())
	}
}

// fixedStatus returns canned extents.
type fixedStatus struct {
	*memBackend
	exts []Extent
	err  error
}

func (f *fixedStatus) BlockStatus(off, length int64) ([]Extent, error) { return f.exts, f.err }

type desc struct{ length, flags uint32 }

func (c *client) blockStatus(flags uint16, off uint64, length uint32) ([]desc, uint32) {
	c.t.Helper()
	c.request(cmdBlockStatus, flags, 3, off, length, nil)
	r := c.readReply(nil)
	if r.flags&replyFlagDone == 0 {
		c.t.Fatalf("block status chunk without DONE")
	}
	if r.errno != 0 {
		return nil, r.errno
	}
	if r.typ != replyTypeBlockStatus || len(r.payload) < 12 || len(r.payload)%8 != 4 ||
		binary.BigEndian.Uint32(r.payload) != allocationCtxID {
		c.t.Fatalf("bad block status reply %+v", r)
	}
	var ds []desc
	for p := r.payload[4:]; len(p) > 0; p = p[8:] {
		ds = append(ds, desc{binary.BigEndian.Uint32(p), binary.BigEndian.Uint32(p[4:])})
	}
	return ds, 0
}

func TestBlockStatus(t *testing.T) {
	const hz = stateHole | stateZero
	const size = 1 << 20
	sb := newSparse(size)
	c := connect(t, serve(t, &Server{Backend: sb}), true, true)
	c.writeAt(pattern(8192, 1), 16384, 0)
	c.writeAt(pattern(4096, 1), 32768, 0)
	c.writeAt(pattern(4096, 1), size-4096, 0)

	tests := []struct {
		flags  uint16
		off    uint64
		length uint32
		want   []desc
	}{
		{0, 0, size, []desc{{16384, hz}, {8192, 0}, {8192, hz}, {4096, 0}, {size - 36864 - 4096, hz}, {4096, 0}}},
		{0, 100, 16284, []desc{{16284, hz}}},
		{0, 0, 20000, []desc{{16384, hz}, {4096, 0}}}, // last may extend past the request
		{cmdFlagReqOne, 0, 20000, []desc{{16384, hz}}},
		{cmdFlagReqOne, 0, 1000, []desc{{1000, hz}}},
		{cmdFlagReqOne, 16384, 100, []desc{{100, 0}}},
		{0, size - 4096, 4096, []desc{{4096, 0}}},
	}
	for _, tt := range tests {
		got, errno := c.blockStatus(tt.flags, tt.off, tt.length)
		if errno != 0 || fmt.Sprint(got) != fmt.Sprint(tt.want) {
			t.Errorf("block status flags %#x %d@%d: %v errno %d, want %v", tt.flags, tt.length, tt.off, got, errno, tt.want)
		}
	}

	// Trim punches a hole, write zeroes with NO_HOLE allocates.
	c.do(cmdTrim, 0, 16384, 8192)
	c.do(cmdWriteZeroes, cmdFlagNoHole, 0, 4096)
	got, _ := c.blockStatus(0, 0, 40960)
	if want := []desc{{4096, 0}, {28672, hz}, {4096, 0}, {4096, hz}}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("after trim: %v, want %v", got, want)
	}

	sb.amu.Lock()
	sb.statusErr = syscall.EIO
	sb.amu.Unlock()
	if _, errno := c.blockStatus(0, 0, 4096); errno != errIO {
		t.Errorf("backend error: errno %d, want EIO", errno)
	}
}

func TestBlockStatusEncoding(t *testing.T) {
	const size = 1 << 40 // larger than a 32-bit extent
	tests := []struct {
		name   string
		exts   []Extent
		err    error
		flags  uint16
		off    uint64
		length uint32
		want   []desc
		errno  uint32
	}{
		{name: "no BlockStatuser data", exts: nil, length: 1 << 20, want: []desc{{1 << 20, 0}}},
		{name: "unsupported", err: errors.ErrUnsupported, length: 512, want: []desc{{512, 0}}},
		{name: "merge equal runs", length: 3000, exts: []Extent{{1000, true, true}, {1000, true, true}, {1000, false, false}},
			want: []desc{{2000, 3}, {1000, 0}}},
		{name: "stop once past request", length: 1000, exts: []Extent{{500, false, false}, {800, true, false}, {100, false, false}},
			want: []desc{{500, 0}, {800, 1}}},
		{name: "clip huge extent", length: 1 << 20, exts: []Extent{{1 << 35, false, true}, {1, false, false}},
			want: []desc{{math.MaxUint32, 2}}},
		{name: "clip at export end", off: size - 100, length: 100, exts: []Extent{{1 << 20, true, true}},
			want: []desc{{100, 3}}},
		{name: "invalid first extent", length: 100, exts: []Extent{{0, false, false}}, errno: errIO},
		{name: "negative extent ends list", length: 100, exts: []Extent{{10, true, false}, {-5, false, false}}, want: []desc{{10, 1}}},
		{name: "empty list", length: 100, exts: []Extent{}, errno: errIO},
		{name: "backend error", length: 100, err: syscall.EIO, errno: errIO},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var b Backend = &fixedStatus{memBackend: &memBackend{}, exts: tt.exts, err: tt.err}
			if tt.exts == nil && tt.err == nil {
				b = &memBackend{}
			}
			s := &Server{Backend: sizeOverride{b, size}}
			c := connect(t, serve(t, s), true, true)
			got, errno := c.blockStatus(tt.flags, tt.off, tt.length)
			if errno != tt.errno || fmt.Sprint(got) != fmt.Sprint(tt.want) {
				t.Errorf("got %v errno %d, want %v errno %d", got, errno, tt.want, tt.errno)
			}
		})
	}
}

// sizeOverride reports a different size, keeping the optional interfaces of
// the wrapped backend visible through embedding of the concrete types below.
type sizeOverride struct {
	Backend
	size int64
}

func (s sizeOverride) Size() int64 { return s.size }

func (s sizeOverride) BlockStatus(off, length int64) ([]Extent, error) {
	if bs, ok := s.Backend.(BlockStatuser); ok {
		return bs.BlockStatus(off, length)
	}
	return nil, errors.ErrUnsupported
}

func TestBackendErrors(t *testing.T) {
	tests := []struct {
		name     string
		readErr  error
		writeErr error
		typ      uint16
		want     uint32
	}{
		{"read EIO", errors.New("disk on fire"), nil, cmdRead, errIO},
		{"read EINVAL", fmt.Errorf("wrapped: %w", syscall.EINVAL), nil, cmdRead, errInval},
		{"write ENOSPC", nil, syscall.ENOSPC, cmdWrite, errNoSpc},
		{"write EDQUOT", nil, syscall.EDQUOT, cmdWrite, errNoSpc},
		{"write EROFS", nil, syscall.EROFS, cmdWrite, errPerm},
		{"write generic", nil, errors.New("boom"), cmdWrite, errIO},
		{"zeroes via write", nil, syscall.ENOSPC, cmdWriteZeroes, errNoSpc},
	}
	forEachMode(t, func(t *testing.T, structured bool) {
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				m := newMem(1 << 20)
				m.readErr, m.writeErr = tt.readErr, tt.writeErr
				c := connect(t, serve(t, &Server{Backend: m}), structured, false)
				var p []byte
				if tt.typ == cmdWrite {
					p = make([]byte, 4096)
				}
				c.request(tt.typ, 0, 1, 0, 4096, p)
				r := c.readReply(nil) // a failed simple read carries no payload
				if r.errno != tt.want {
					t.Fatalf("errno %d, want %d", r.errno, tt.want)
				}
				if structured && (r.typ != replyTypeError || !bytes.Contains(r.payload, []byte("failed"))) {
					t.Errorf("structured error %+v", r)
				}
				if errno := c.do(cmdFlush, 0, 0, 0); errno != 0 {
					t.Errorf("flush errno %d", errno)
				}
			})
		}
	})
}

// TestOutOfOrder checks that a slow request does not hold back a fast one.
func TestOutOfOrder(t *testing.T) {
	m := newMem(1 << 20)
	release := make(chan struct{})
	m.delay = func(off int64) time.Duration {
		if off == 0 {
			<-release
		}
		return 0
	}
	c := connect(t, serve(t, &Server{Backend: m}), false, false)
	c.request(cmdRead, 0, 1, 0, 4096, nil)
	c.request(cmdRead, 0, 2, 4096, 4096, nil)
	n := func(uint64) int { return 4096 }
	if r := c.readReply(n); r.cookie != 2 {
		t.Fatalf("first reply cookie %d, want 2", r.cookie)
	}
	close(release)
	if r := c.readReply(n); r.cookie != 1 {
		t.Fatalf("second reply cookie %d, want 1", r.cookie)
	}
}

// TestPipelined floods one connection with mixed requests and matches
// replies by cookie.
func TestPipelined(t *testing.T) {
	forEachMode(t, func(t *testing.T, structured bool) {
		const size = 16 << 20
		m := newMem(size)
		var cur, peak atomic.Int64
		m.delay = func(int64) time.Duration {
			if n := cur.Add(1); n > peak.Load() {
				peak.Store(n)
			}
			time.Sleep(100 * time.Microsecond)
			cur.Add(-1)
			return 0
		}
		c := connect(t, serve(t, &Server{Backend: m, MaxWorkers: 4, MaxInFlight: 1}), structured, false)
		// Disjoint blocks per request so the final content is determined.
		const n, bs = 400, 16384
		sizes := map[uint64]int{}
		go func() {
			for i := range n {
				off := uint64(i) * bs
				if i%2 == 0 {
					c.request(cmdWrite, 0, uint64(i), off, bs, pattern(bs, byte(i)))
				} else {
					c.request(cmdRead, 0, uint64(i), off, bs, nil)
				}
			}
		}()
		for i := 1; i < n; i += 2 {
			sizes[uint64(i)] = bs
		}
		seen := map[uint64]bool{}
		for len(seen) < n {
			r := c.readReply(func(cookie uint64) int { return sizes[cookie] })
			if r.errno != 0 || seen[r.cookie] || r.cookie >= n {
				t.Fatalf("reply %+v (seen %v)", r, seen[r.cookie])
			}
			if r.simple || r.flags&replyFlagDone != 0 {
				seen[r.cookie] = true
			}
		}
		for i := 0; i < n; i += 2 {
			if !bytes.Equal(m.bytes(i*bs, bs), pattern(bs, byte(i))) {
				t.Fatalf("block %d has wrong content", i)
			}
		}
		if p := peak.Load(); p > 4 {
			t.Errorf("peak backend concurrency %d > MaxWorkers 4", p)
		}
	})
}

// TestDiscDrains checks NBD_CMD_DISC completes outstanding requests first.
func TestDiscDrains(t *testing.T) {
	m := newMem(1 << 20)
	m.delay = func(int64) time.Duration { return 50 * time.Millisecond }
	c := connect(t, serve(t, &Server{Backend: m}), true, false)
	c.request(cmdWrite, cmdFlagFUA, 1, 0, 4096, pattern(4096, 1))
	c.request(cmdRead, 0, 2, 0, 4096, nil)
	c.request(cmdDisc, 0, 3, 0, 0, nil)
	got := map[uint64]bool{}
	for range 2 {
		got[c.readReply(nil).cookie] = true
	}
	if !got[1] || !got[2] {
		t.Fatalf("replies %v, want cookies 1 and 2", got)
	}
	c.expectClosed()
}

// TestShutdown checks cancelling Serve's context completes in-flight
// requests, closes connections and returns.
func TestShutdown(t *testing.T) {
	m := newMem(1 << 20)
	started := make(chan struct{})
	m.delay = func(int64) time.Duration { close(started); return 200 * time.Millisecond }
	dir := t.TempDir()
	l, err := net.Listen("unix", dir+"/s")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	s := &Server{Backend: m, Logger: testLogger(t)}
	go func() { done <- s.Serve(ctx, l) }()
	c := connect(t, l.Addr().String(), false, false)
	c.request(cmdRead, 0, 1, 0, 4096, nil)
	<-started
	cancel()
	if r := c.readReply(func(uint64) int { return 4096 }); r.cookie != 1 || r.errno != 0 {
		t.Fatalf("in-flight reply %+v", r)
	}
	c.expectClosed()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Serve = %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return")
	}
	if _, err := net.Dial("unix", dir+"/s"); err == nil {
		t.Fatal("listener still accepting")
	}
}

// TestMultiConn checks a write flushed on one connection is visible on
// another, which CAN_MULTI_CONN promises.
func TestMultiConn(t *testing.T) {
	sock := serve(t, &Server{Backend: newMem(1 << 20)})
	a, b := connect(t, sock, false, false), connect(t, sock, true, false)
	if a.flags&tflagCanMultiConn == 0 {
		t.Fatal("CAN_MULTI_CONN not advertised")
	}
	p := pattern(65536, 9)
	a.writeAt(p, 4096, cmdFlagFUA)
	if got, _ := b.readAt(4096, len(p), 0); !bytes.Equal(got, p) {
		t.Fatal("write not visible on the other connection")
	}
}

// TestServeConnPipe drives ServeConn directly over net.Pipe.
func TestServeConnPipe(t *testing.T) {
	srv, cli := net.Pipe()
	s := &Server{Backend: newMem(1 << 20), Logger: testLogger(t)}
	done := make(chan error, 1)
	go func() { done <- s.ServeConn(context.Background(), srv) }()
	c := &client{t: t, c: cli, br: bufio.NewReader(cli)}
	c.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
	c.info(optGo, "")
	p := pattern(1<<20, 4)
	go c.request(cmdWrite, 0, 1, 0, 1<<20, p)
	if r := c.readReply(nil); r.errno != 0 {
		t.Fatalf("write errno %d", r.errno)
	}
	if got, _ := c.readAt(0, 1<<20, 0); !bytes.Equal(got, p) {
		t.Fatal("read back differs")
	}
	c.request(cmdDisc, 0, 0, 0, 0, nil)
	if err := <-done; err != nil {
		t.Fatalf("ServeConn = %v", err)
	}
}

func TestRandomIO(t *testing.T) {
	// Compare against a shadow copy under a random mix of operations.
	const size = 4 << 20
	sb := newSparse(size)
	shadow := make([]byte, size)
	c := connect(t, serve(t, &Server{Backend: sb}), true, true)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 300 {
		off := rng.IntN(size - 1)
		n := 1 + rng.IntN(min(size-off, 256<<10))
		switch rng.IntN(4) {
		case 0, 1:
			p := pattern(n, byte(i))
			if errno := c.writeAt(p, uint64(off), 0); errno != 0 {
				t.Fatal(errno)
			}
			copy(shadow[off:], p)
		case 2:
			if errno := c.do(cmdWriteZeroes, uint16(rng.IntN(2))*cmdFlagNoHole, uint64(off), uint32(n)); errno != 0 {
				t.Fatal(errno)
			}
			clear(shadow[off : off+n])
		case 3:
			got, errno := c.readAt(uint64(off), n, 0)
			if errno != 0 || !bytes.Equal(got, shadow[off:off+n]) {
				t.Fatalf("op %d: read %d@%d mismatch (errno %d)", i, n, off, errno)
			}
		}
	}
}
