package nbd

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"syscall"
)

// op is one request in flight. ops are pooled per Server.
type op struct {
	req  request
	cost int64   // budget bytes held
	buf  *[]byte // pooled payload or reply buffer, if any
	hdr  [32]byte
}

func (s *Server) getOp() *op {
	if o, ok := s.ops.Get().(*op); ok {
		return o
	}
	return new(op)
}

func (s *Server) putOp(o *op) {
	s.bufs.put(o.buf)
	o.buf = nil
	s.ops.Put(o)
}

// session is the transmission phase of one connection: a reader goroutine
// parses requests and reads write payloads, a bounded pool of workers runs
// them against the backend, and replies go out through one replyWriter in
// whatever order they complete.
type session struct {
	s      *Server
	x      *export
	nc     net.Conn
	br     *bufio.Reader
	log    *slog.Logger
	w      replyWriter
	budget *budget
	work   chan *op

	closeOnce sync.Once
}

// transmit runs the transmission phase until the client disconnects, the
// connection fails or ctx is done. Outstanding requests are always completed
// before it returns.
func (c *conn) transmit(ctx context.Context, x *export) error {
	n := c.s.workers()
	ss := &session{
		s:      c.s,
		x:      x,
		nc:     c.nc,
		br:     c.br,
		log:    c.log,
		budget: newBudget(c.s.inFlight(), n),
		work:   make(chan *op, n), // never blocks: the budget holds n slots
	}
	ss.w.init(c.nc)
	var wg sync.WaitGroup
	for range n {
		wg.Go(ss.worker)
	}
	err := ss.readLoop(ctx)
	close(ss.work)
	wg.Wait()
	if werr := ss.w.error(); err == nil && werr != nil {
		err = fmt.Errorf("sending reply: %w", werr)
	}
	return err
}

// readLoop reads requests until NBD_CMD_DISC, EOF or an error that makes the
// stream unusable.
func (ss *session) readLoop(ctx context.Context) error {
	var h [requestSize]byte
	for {
		if _, err := io.ReadFull(ss.br, h[:]); err != nil {
			return ss.readErr(ctx, "reading request header", err)
		}
		r, err := parseRequest(h[:])
		if err != nil {
			ss.log.Warn("nbd: malformed request; disconnecting", "err", err)
			return err
		}
		if r.typ == cmdDisc {
			ss.log.Debug("nbd: client sent NBD_CMD_DISC")
			return nil
		}
		var cost int64
		switch r.typ {
		case cmdRead:
			cost = int64(min(r.length, maxPayload))
		case cmdWrite:
			if r.length > maxPayload {
				// The payload cannot be skipped cheaply and the client broke
				// a MUST; the spec allows a hard disconnect.
				ss.log.Warn("nbd: write larger than maximum payload; disconnecting", "length", r.length)
				return fmt.Errorf("write of %d bytes exceeds maximum payload %d", r.length, maxPayload)
			}
			cost = int64(r.length)
		}
		if err := ss.budget.acquire(ctx, cost); err != nil {
			return nil // shutdown; the caller reports ctx.Err()
		}
		o := ss.s.getOp()
		o.req, o.cost = r, cost
		if r.typ == cmdWrite && r.length > 0 {
			o.buf = ss.s.bufs.get(int(r.length))
			if _, err := io.ReadFull(ss.br, *o.buf); err != nil {
				ss.budget.release(o.cost)
				ss.s.putOp(o)
				return ss.readErr(ctx, "reading write payload", err)
			}
		}
		ss.work <- o
	}
}

// readErr classifies a read failure: shutdown and a client hanging up
// between requests are not errors.
func (ss *session) readErr(ctx context.Context, what string, err error) error {
	switch {
	case ctx.Err() != nil:
		return nil
	case ss.w.error() != nil:
		return nil // we closed the connection; transmit reports the write error
	case errors.Is(err, io.EOF) && what == "reading request header":
		ss.log.Debug("nbd: client closed connection without NBD_CMD_DISC")
		return nil
	}
	return fmt.Errorf("%s: %w", what, err)
}

func (ss *session) worker() {
	for o := range ss.work {
		ss.handleSafely(o)
		ss.budget.release(o.cost)
		ss.s.putOp(o)
	}
}

// handleSafely runs one request. Like net/http, it contains a panic (from a
// backend, say) to this connection instead of taking down every export the
// agent serves: the connection is closed, since the client will never get
// a reply for the request.
func (ss *session) handleSafely(o *op) {
	defer func() {
		if v := recover(); v != nil {
			ss.log.Error("nbd: panic serving request; closing connection", "cmd", cmdName(o.req.typ),
				"panic", v, "stack", string(debug.Stack()))
			ss.closeOnce.Do(func() { ss.nc.Close() })
		}
	}()
	ss.handle(o)
}

func (ss *session) handle(o *op) {
	r := &o.req
	if e := ss.x.check(r); e != 0 {
		ss.log.Debug("nbd: rejected request", "cmd", cmdName(r.typ), "flags", r.flags,
			"offset", r.offset, "length", r.length, "errno", e)
		ss.replyError(o, e, checkMessage(e))
		return
	}
	var err error
	switch r.typ {
	case cmdRead:
		ss.read(o)
		return
	case cmdBlockStatus:
		ss.blockStatus(o)
		return
	case cmdWrite:
		if o.buf != nil { // nil for a zero-length write
			err = writeFull(ss.x.backend, *o.buf, int64(r.offset))
		}
	case cmdFlush:
		err = ss.x.backend.Flush()
	case cmdTrim:
		if r.length > 0 {
			err = ss.x.trimmer.Trim(int64(r.offset), int64(r.length))
			if errors.Is(err, errors.ErrUnsupported) {
				err = nil // a trim is only a hint
			}
		}
	case cmdWriteZeroes:
		err = ss.writeZeroes(r)
	case cmdCache:
		// Advisory; nothing to prefetch into.
	}
	if err == nil && r.flags&cmdFlagFUA != 0 && r.typ != cmdFlush {
		err = ss.x.backend.Flush()
	}
	if err != nil {
		ss.replyBackendError(o, err)
		return
	}
	ss.send(putSimpleReply(o.hdr[:], 0, r.cookie), nil)
}

// errNoFastZero fails NBD_CMD_FLAG_FAST_ZERO when zeroing means writing.
var errNoFastZero = errors.New("zeroing is no faster than writing")

func (ss *session) writeZeroes(r *request) error {
	off, n := int64(r.offset), int64(r.length)
	if n == 0 {
		return nil
	}
	if z := ss.x.zeroer; z != nil {
		err := z.WriteZeroes(off, n, r.flags&cmdFlagNoHole == 0)
		if !errors.Is(err, errors.ErrUnsupported) {
			return err
		}
	}
	if r.flags&cmdFlagFastZero != 0 {
		return errNoFastZero
	}
	zeros := ss.s.zeros()
	for n > 0 {
		k := min(n, int64(len(zeros)))
		if err := writeFull(ss.x.backend, zeros[:k], off); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

func writeFull(b Backend, p []byte, off int64) error {
	n, err := b.WriteAt(p, off)
	if err == nil && n < len(p) {
		err = io.ErrShortWrite
	}
	return err
}

func (ss *session) read(o *op) {
	r := &o.req
	n := int(r.length)
	if n == 0 {
		if ss.x.structured {
			ss.send(putChunkHeader(o.hdr[:], replyFlagDone, replyTypeNone, r.cookie, 0), nil)
		} else {
			ss.send(putSimpleReply(o.hdr[:], 0, r.cookie), nil)
		}
		return
	}
	o.buf = ss.s.bufs.get(n)
	p := *o.buf
	// Read everything before sending a header, so an error never has to
	// interrupt a reply and the data can go out in one chunk.
	got, err := ss.x.backend.ReadAt(p, int64(r.offset))
	if got < n {
		if err == nil {
			err = io.ErrUnexpectedEOF
		}
		ss.replyBackendError(o, err)
		return
	}
	if !ss.x.structured {
		ss.send(putSimpleReply(o.hdr[:], 0, r.cookie), p)
		return
	}
	if isZero(p, ss.s.zeros()) {
		putChunkHeader(o.hdr[:], replyFlagDone, replyTypeOffsetHole, r.cookie, 12)
		binary.BigEndian.PutUint64(o.hdr[20:], r.offset)
		binary.BigEndian.PutUint32(o.hdr[28:], r.length)
		ss.send(o.hdr[:32], nil)
		return
	}
	putChunkHeader(o.hdr[:], replyFlagDone, replyTypeOffsetData, r.cookie, 8+r.length)
	binary.BigEndian.PutUint64(o.hdr[20:], r.offset)
	ss.send(o.hdr[:28], p)
}

// isZero reports whether p is all zeros, comparing against zeros in chunks
// (bytes.Equal is vectorized and stops at the first difference).
func isZero(p, zeros []byte) bool {
	for len(p) > 0 {
		k := min(len(p), len(zeros))
		if !bytes.Equal(p[:k], zeros[:k]) {
			return false
		}
		p = p[k:]
	}
	return true
}

func (ss *session) blockStatus(o *op) {
	r := &o.req
	var one [1]Extent
	exts := one[:0]
	if bs := ss.x.statuser; bs != nil {
		var err error
		exts, err = bs.BlockStatus(int64(r.offset), int64(r.length))
		switch {
		case errors.Is(err, errors.ErrUnsupported):
			exts = one[:0]
		case err != nil:
			ss.replyBackendError(o, err)
			return
		case len(exts) == 0:
			ss.replyBackendError(o, errors.New("backend returned no extents"))
			return
		}
	}
	if len(exts) == 0 {
		one[0] = Extent{Length: int64(r.length)} // status unknown: allocated data
		exts = one[:]
	}

	reqOne := r.flags&cmdFlagReqOne != 0
	maxLen := uint64(math.MaxUint32) &^ uint64(ss.x.minBlock-1)
	limit := min(len(exts), maxExtents)
	if reqOne {
		limit = 1
	}
	o.buf = ss.s.bufs.get(chunkHeaderSize + 4 + 8*limit)
	b := *o.buf
	desc := b[chunkHeaderSize+4:]
	end := r.offset + uint64(r.length)
	pos, n := r.offset, 0
	var lastLen uint64
	var lastFlags uint32
	for _, e := range exts {
		if e.Length <= 0 || pos >= ss.x.size {
			break // malformed or past the end: report what we have
		}
		l := min(uint64(e.Length), ss.x.size-pos)
		if reqOne {
			l = min(l, end-pos) // must not exceed the request
		}
		var f uint32
		if e.Hole {
			f |= stateHole
		}
		if e.Zero {
			f |= stateZero
		}
		if n > 0 && f == lastFlags && lastLen+l <= maxLen {
			lastLen += l // merge runs with the same status
			binary.BigEndian.PutUint32(desc[8*(n-1):], uint32(lastLen))
		} else {
			if n == limit {
				break
			}
			clipped := l > maxLen
			l = min(l, maxLen)
			binary.BigEndian.PutUint32(desc[8*n:], uint32(l))
			binary.BigEndian.PutUint32(desc[8*n+4:], f)
			n++
			lastLen, lastFlags = l, f
			if clipped {
				break // the rest of e cannot be described without realigning
			}
		}
		pos += l
		if pos >= end {
			break // only the last extent may reach past the request
		}
	}
	if n == 0 {
		ss.replyBackendError(o, fmt.Errorf("backend returned an invalid extent %+v", exts[0]))
		return
	}
	putChunkHeader(b, replyFlagDone, replyTypeBlockStatus, r.cookie, uint32(4+8*n))
	binary.BigEndian.PutUint32(b[chunkHeaderSize:], allocationCtxID)
	ss.send(b[:chunkHeaderSize+4], desc[:8*n])
}

// replyBackendError logs a backend failure and reports it to the client.
// The message stays generic: details (paths, keys) are for the host log.
func (ss *session) replyBackendError(o *op, err error) {
	r := &o.req
	e := errnoOf(err)
	if errors.Is(err, errNoFastZero) {
		e = errNotSup
	} else {
		ss.log.Error("nbd: backend request failed", "cmd", cmdName(r.typ), "offset", r.offset,
			"length", r.length, "err", err)
	}
	ss.replyError(o, e, cmdName(r.typ)+" failed")
}

// errnoOf maps a backend error to an NBD error value.
func errnoOf(err error) uint32 {
	var en syscall.Errno
	if errors.As(err, &en) {
		switch en {
		case syscall.ENOSPC, syscall.EDQUOT, syscall.EFBIG:
			return errNoSpc
		case syscall.EPERM, syscall.EROFS, syscall.EACCES:
			return errPerm
		case syscall.EINVAL:
			return errInval
		case syscall.ESHUTDOWN:
			return errShutdown
		}
	}
	return errIO
}

func checkMessage(e uint32) string {
	switch e {
	case errPerm:
		return "export is read-only"
	case errNoSpc:
		return "request extends beyond the end of the export"
	case errOverflow:
		return "request too large"
	}
	return "invalid request"
}

// replyError sends an error reply: a structured ERROR chunk with a message
// when structured replies were negotiated (required for reads), else a
// simple reply.
func (ss *session) replyError(o *op, errno uint32, msg string) {
	r := &o.req
	if !ss.x.structured {
		ss.send(putSimpleReply(o.hdr[:], errno, r.cookie), nil)
		return
	}
	putChunkHeader(o.hdr[:], replyFlagDone, replyTypeError, r.cookie, uint32(6+len(msg)))
	binary.BigEndian.PutUint32(o.hdr[20:], errno)
	binary.BigEndian.PutUint16(o.hdr[24:], uint16(len(msg)))
	ss.send(o.hdr[:26], []byte(msg))
}

// send writes one reply. After a write error the connection is closed so
// the reader stops too; the remaining replies are dropped.
func (ss *session) send(hdr, data []byte) {
	if err := ss.w.send(hdr, data); err != nil {
		ss.closeOnce.Do(func() {
			ss.log.Debug("nbd: sending reply failed; closing", "err", err)
			ss.nc.Close()
		})
	}
}

// replyWriter serializes replies onto the connection. Small replies are
// coalesced while other workers wait for the lock, and flushed by the last
// one, so a burst of 4 KiB replies costs few syscalls; large payloads go out
// with writev, without being copied.
type replyWriter struct {
	nc      net.Conn
	waiting atomic.Int32

	mu   sync.Mutex
	buf  []byte
	iov  [3][]byte
	bufs net.Buffers
	err  error
}

const (
	replyBufSize = 256 << 10
	copyLimit    = 64 << 10 // payloads above this are not copied into buf
)

func (w *replyWriter) init(nc net.Conn) {
	w.nc = nc
	w.buf = make([]byte, 0, replyBufSize)
}

func (w *replyWriter) send(hdr, data []byte) error {
	w.waiting.Add(1)
	w.mu.Lock()
	defer w.mu.Unlock()
	more := w.waiting.Add(-1) > 0
	if w.err != nil {
		return w.err
	}
	if len(data) <= copyLimit && len(w.buf)+len(hdr)+len(data) <= cap(w.buf) {
		w.buf = append(w.buf, hdr...)
		w.buf = append(w.buf, data...)
		if more {
			return nil // a waiting sender flushes
		}
		data, hdr = nil, nil
	}
	w.iov = [3][]byte{w.buf, hdr, data}
	w.bufs = w.iov[:]
	_, err := w.bufs.WriteTo(w.nc)
	w.buf = w.buf[:0]
	w.iov = [3][]byte{} // drop references to pooled buffers
	if err != nil {
		w.err = err
	}
	return err
}

func (w *replyWriter) error() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}
