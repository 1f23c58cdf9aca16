package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// memBackend is a plain in-memory Backend with no optional interfaces.
type memBackend struct {
	mu      sync.RWMutex
	data    []byte
	flushes atomic.Int64
	writes  atomic.Int64

	readErr  error // returned by ReadAt if set
	writeErr error // returned by WriteAt if set
	delay    func(off int64) time.Duration
}

func newMem(size int) *memBackend { return &memBackend{data: make([]byte, size)} }

func (m *memBackend) ReadAt(p []byte, off int64) (int, error) {
	if m.delay != nil {
		time.Sleep(m.delay(off))
	}
	if m.readErr != nil {
		return 0, m.readErr
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	if off < 0 || off+int64(len(p)) > int64(len(m.data)) {
		return 0, errors.New("memBackend: read out of range") // the server must prevent this
	}
	return copy(p, m.data[off:]), nil
}

func (m *memBackend) WriteAt(p []byte, off int64) (int, error) {
	if m.writeErr != nil {
		return 0, m.writeErr
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if off < 0 || off+int64(len(p)) > int64(len(m.data)) {
		return 0, errors.New("memBackend: write out of range")
	}
	m.writes.Add(1)
	return copy(m.data[off:], p), nil
}

func (m *memBackend) Size() int64  { return int64(len(m.data)) }
func (m *memBackend) Flush() error { m.flushes.Add(1); return nil }

func (m *memBackend) bytes(off, n int) []byte {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return append([]byte(nil), m.data[off:off+n]...)
}

// sparseBackend tracks allocation in 4 KiB blocks and implements Trimmer,
// Zeroer and BlockStatuser.
type sparseBackend struct {
	*memBackend
	amu       sync.Mutex
	allocated []bool
	trims     atomic.Int64
	zeroCalls []zeroCall
	zeroErr   error
	statusErr error
}

type zeroCall struct {
	off, length int64
	mayTrim     bool
}

const sparseBlock = 4096

func newSparse(size int) *sparseBackend {
	return &sparseBackend{memBackend: newMem(size), allocated: make([]bool, (size+sparseBlock-1)/sparseBlock)}
}

func (s *sparseBackend) WriteAt(p []byte, off int64) (int, error) {
	n, err := s.memBackend.WriteAt(p, off)
	s.mark(off, int64(n), true)
	return n, err
}

func (s *sparseBackend) mark(off, n int64, alloc bool) {
	s.amu.Lock()
	defer s.amu.Unlock()
	if n <= 0 {
		return
	}
	first, last := off/sparseBlock, (off+n-1)/sparseBlock
	if !alloc { // only whole blocks become holes
		if off%sparseBlock != 0 {
			first++
		}
		if (off+n)%sparseBlock != 0 && (off+n) != int64(len(s.data)) {
			last--
		}
	}
	for b := first; b <= last; b++ {
		s.allocated[b] = alloc
	}
}

func (s *sparseBackend) zero(off, n int64) {
	s.mu.Lock()
	clear(s.data[off : off+n])
	s.mu.Unlock()
}

func (s *sparseBackend) Trim(off, n int64) error {
	s.trims.Add(1)
	s.zero(off, n)
	s.mark(off, n, false)
	return nil
}

func (s *sparseBackend) WriteZeroes(off, n int64, mayTrim bool) error {
	s.amu.Lock()
	s.zeroCalls = append(s.zeroCalls, zeroCall{off, n, mayTrim})
	s.amu.Unlock()
	if s.zeroErr != nil {
		return s.zeroErr
	}
	s.zero(off, n)
	s.mark(off, n, !mayTrim)
	return nil
}

func (s *sparseBackend) BlockStatus(off, n int64) ([]Extent, error) {
	s.amu.Lock()
	defer s.amu.Unlock()
	if s.statusErr != nil {
		return nil, s.statusErr
	}
	var exts []Extent
	end := off + n
	for pos := off; pos < end; {
		b := pos / sparseBlock
		alloc := s.allocated[b]
		next := min((b+1)*sparseBlock, int64(len(s.data)))
		l := next - pos
		if k := len(exts); k > 0 && exts[k-1].Hole == !alloc {
			exts[k-1].Length += l // deliberately may run past end, as allowed
		} else {
			exts = append(exts, Extent{Length: l, Hole: !alloc, Zero: !alloc})
		}
		pos = next
	}
	return exts, nil
}

// testLogger routes server logs to t.Log so failures show them.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Logf("%s", p)
	return len(p), nil
}

// serve runs s on a fresh unix socket until the test ends and returns the
// socket path.
func serve(t testing.TB, s *Server) string {
	t.Helper()
	if s.Logger == nil {
		s.Logger = testLogger(t)
	}
	dir, err := os.MkdirTemp("", "nbd") // short: sun_path is ~108 bytes
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "s")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if !errors.Is(err, context.Canceled) {
				t.Errorf("Serve returned %v, want context.Canceled", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("Serve did not return after cancel")
		}
		os.RemoveAll(dir)
	})
	return sock
}

// client is a minimal NBD client for protocol tests.
type client struct {
	t          testing.TB
	c          net.Conn
	br         *bufio.Reader
	size       uint64
	flags      uint16
	structured bool
}

func dial(t testing.TB, sock string) *client {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(20 * time.Second))
	t.Cleanup(func() { c.Close() })
	return &client{t: t, c: c, br: bufio.NewReader(c)}
}

func (c *client) write(b []byte) {
	c.t.Helper()
	if _, err := c.c.Write(b); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

func (c *client) readFull(n int) []byte {
	c.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(c.br, b); err != nil {
		c.t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

// greet reads the server greeting and sends client flags.
func (c *client) greet(flags uint32) {
	c.t.Helper()
	b := c.readFull(18)
	if binary.BigEndian.Uint64(b) != nbdMagic || binary.BigEndian.Uint64(b[8:]) != optMagic {
		c.t.Fatalf("bad greeting % x", b)
	}
	if hf := binary.BigEndian.Uint16(b[16:]); hf != flagFixedNewstyle|flagNoZeroes {
		c.t.Fatalf("handshake flags = %#x", hf)
	}
	c.write(binary.BigEndian.AppendUint32(nil, flags))
}

func (c *client) sendOpt(opt uint32, data []byte) {
	c.t.Helper()
	b := binary.BigEndian.AppendUint64(nil, optMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	c.write(append(b, data...))
}

type optReply struct {
	opt, typ uint32
	data     []byte
}

func (c *client) optReply() optReply {
	c.t.Helper()
	h := c.readFull(optReplyHdrSize)
	if m := binary.BigEndian.Uint64(h); m != optReplyMagic {
		c.t.Fatalf("option reply magic %#x", m)
	}
	return optReply{
		opt:  binary.BigEndian.Uint32(h[8:]),
		typ:  binary.BigEndian.Uint32(h[12:]),
		data: c.readFull(int(binary.BigEndian.Uint32(h[16:]))),
	}
}

// expectReply reads one option reply and checks its type.
func (c *client) expectReply(opt, typ uint32) optReply {
	c.t.Helper()
	r := c.optReply()
	if r.opt != opt || r.typ != typ {
		c.t.Fatalf("reply to option %d: got opt %d type %#x (%q), want type %#x", opt, r.opt, r.typ, r.data, typ)
	}
	return r
}

func infoData(name string, infos ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

func metaData(name string, queries ...string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = binary.BigEndian.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

// info sends NBD_OPT_INFO or NBD_OPT_GO and collects NBD_REP_INFO replies
// by type until ACK.
func (c *client) info(opt uint32, name string, infos ...uint16) map[uint16][]byte {
	c.t.Helper()
	c.sendOpt(opt, infoData(name, infos...))
	got := map[uint16][]byte{}
	for {
		r := c.optReply()
		switch r.typ {
		case repInfo:
			got[binary.BigEndian.Uint16(r.data)] = r.data[2:]
		case repAck:
			if e, ok := got[infoExport]; ok {
				c.size = binary.BigEndian.Uint64(e)
				c.flags = binary.BigEndian.Uint16(e[8:])
			}
			return got
		default:
			c.t.Fatalf("option %d: reply type %#x (%q)", opt, r.typ, r.data)
		}
	}
}

// connect performs a full handshake. structured and meta select the
// optional features.
func connect(t testing.TB, sock string, structured, meta bool) *client {
	t.Helper()
	c := dial(t, sock)
	c.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
	if structured {
		c.sendOpt(optStructuredReply, nil)
		c.expectReply(optStructuredReply, repAck)
		c.structured = true
	}
	if meta {
		c.sendOpt(optSetMetaContext, metaData("", allocationCtx))
		c.expectReply(optSetMetaContext, repMetaContext)
		c.expectReply(optSetMetaContext, repAck)
	}
	c.info(optGo, "", infoBlockSize)
	return c
}

func (c *client) request(typ, flags uint16, cookie, off uint64, length uint32, payload []byte) {
	c.t.Helper()
	b := make([]byte, requestSize, requestSize+len(payload))
	binary.BigEndian.PutUint32(b, requestMagic)
	binary.BigEndian.PutUint16(b[4:], flags)
	binary.BigEndian.PutUint16(b[6:], typ)
	binary.BigEndian.PutUint64(b[8:], cookie)
	binary.BigEndian.PutUint64(b[16:], off)
	binary.BigEndian.PutUint32(b[24:], length)
	c.write(append(b, payload...))
}

// reply is one reply message: a simple reply or one structured chunk.
type reply struct {
	simple  bool
	errno   uint32
	cookie  uint64
	flags   uint16 // structured only
	typ     uint16 // structured only
	payload []byte // structured only
}

// readReply reads the next reply; dataLen is the payload length to read
// after a successful simple reply (the client has to know it).
func (c *client) readReply(dataLen func(cookie uint64) int) reply {
	c.t.Helper()
	h := c.readFull(4)
	switch m := binary.BigEndian.Uint32(h); m {
	case simpleReplyMagic:
		b := c.readFull(12)
		r := reply{simple: true, errno: binary.BigEndian.Uint32(b), cookie: binary.BigEndian.Uint64(b[4:])}
		if r.errno == 0 && dataLen != nil {
			r.payload = c.readFull(dataLen(r.cookie))
		}
		return r
	case structuredReplyMagic:
		b := c.readFull(16)
		r := reply{
			flags:  binary.BigEndian.Uint16(b),
			typ:    binary.BigEndian.Uint16(b[2:]),
			cookie: binary.BigEndian.Uint64(b[4:]),
		}
		r.payload = c.readFull(int(binary.BigEndian.Uint32(b[12:])))
		if r.typ&(1<<15) != 0 && len(r.payload) >= 4 {
			r.errno = binary.BigEndian.Uint32(r.payload)
		}
		return r
	default:
		c.t.Fatalf("reply magic %#x", m)
		return reply{}
	}
}

// do sends a request without payload-dependent replies and returns its
// (only, or final) reply's error value.
func (c *client) do(typ, flags uint16, off uint64, length uint32) uint32 {
	c.t.Helper()
	c.request(typ, flags, 7, off, length, nil)
	r := c.readReply(nil)
	if r.cookie != 7 {
		c.t.Fatalf("cookie %d, want 7", r.cookie)
	}
	if !r.simple && r.flags&replyFlagDone == 0 {
		c.t.Fatalf("single chunk without DONE flag")
	}
	return r.errno
}

// writeAt writes p and returns the error value.
func (c *client) writeAt(p []byte, off uint64, flags uint16) uint32 {
	c.t.Helper()
	c.request(cmdWrite, flags, 9, off, uint32(len(p)), p)
	return c.readReply(nil).errno
}

// readAt reads n bytes, reassembling structured chunks.
func (c *client) readAt(off uint64, n int, flags uint16) ([]byte, uint32) {
	c.t.Helper()
	c.request(cmdRead, flags, 11, off, uint32(n), nil)
	if !c.structured {
		r := c.readReply(func(uint64) int { return n })
		return r.payload, r.errno
	}
	buf := make([]byte, n)
	var errno uint32
	for {
		r := c.readReply(nil)
		if r.simple {
			c.t.Fatalf("simple reply to a structured read")
		}
		switch r.typ {
		case replyTypeOffsetData:
			o := binary.BigEndian.Uint64(r.payload) - off
			copy(buf[o:], r.payload[8:])
		case replyTypeOffsetHole:
			o := binary.BigEndian.Uint64(r.payload) - off
			clear(buf[o : o+uint64(binary.BigEndian.Uint32(r.payload[8:]))])
		case replyTypeNone:
		case replyTypeError:
			errno = r.errno
		default:
			c.t.Fatalf("unexpected chunk type %d", r.typ)
		}
		if r.flags&replyFlagDone != 0 {
			return buf, errno
		}
	}
}

// expectClosed checks that the server hangs up.
func (c *client) expectClosed() {
	c.t.Helper()
	c.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	b, err := io.ReadAll(c.br)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		c.t.Fatalf("server did not close the connection (read %d bytes)", len(b))
	}
}

func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }
