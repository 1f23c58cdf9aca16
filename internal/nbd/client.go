package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"syscall"
	"time"
)

// Client is a small NBD client for tests and tools: fixed-newstyle
// negotiation with NBD_OPT_GO, then simple replies only (no structured
// replies, no metadata contexts).
//
// A Client is safe for concurrent use. Requests from different goroutines are
// pipelined on the one connection and may complete in any order, as the
// server chooses. NBD cannot cancel a request, so a request whose context
// ends before its reply arrives breaks the connection: it and every other
// outstanding request fail, and so does every later one.
type Client struct {
	nc       net.Conn
	size     int64
	flags    uint16
	maxBlock uint32 // largest request payload

	wmu sync.Mutex // serialises request writes

	mu      sync.Mutex
	pending map[uint64]*clientCall
	cookie  uint64
	err     error // set once the connection is unusable; sticky
	done    chan struct{}
}

// clientCall is one request in flight.
type clientCall struct {
	buf   []byte     // read destination; nil for other commands
	reply chan error // buffered; receives exactly one value
}

// Error is an error value the server replied with.
type Error struct {
	Op    string // "read", "write", "flush" or "trim"
	Errno uint32 // the NBD error value, e.g. 5 (NBD_EIO)
}

func (e *Error) Error() string {
	return fmt.Sprintf("nbd: %s: server replied %v (NBD error %d)", e.Op, e.Unwrap(), e.Errno)
}

// Unwrap returns the syscall.Errno the NBD error value stands for, so
// errors.Is(err, syscall.ENOSPC) works. Unknown values map to EIO.
func (e *Error) Unwrap() error {
	switch e.Errno {
	case errPerm:
		return syscall.EPERM
	case errInval:
		return syscall.EINVAL
	case errNoSpc:
		return syscall.ENOSPC
	case errOverflow:
		return syscall.EOVERFLOW
	case errNotSup:
		return syscall.ENOTSUP
	case errShutdown:
		return syscall.ESHUTDOWN
	case 12:
		return syscall.ENOMEM
	}
	return syscall.EIO
}

// ErrClientClosed is returned for requests on a Client after Close.
var ErrClientClosed = errors.New("nbd: client closed")

// Dial connects to an NBD server at addr ("unix" or "tcp" network) and
// negotiates the named export ("" is the server's default export) with
// NBD_OPT_GO. ctx bounds the connection and the negotiation only.
func Dial(ctx context.Context, network, addr, export string) (*Client, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, fmt.Errorf("nbd: dial: %w", err)
	}
	if dl, ok := ctx.Deadline(); ok {
		nc.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Now()) })
	br := bufio.NewReaderSize(nc, 64<<10)
	c := &Client{nc: nc, maxBlock: maxPayload, pending: map[uint64]*clientCall{}, done: make(chan struct{})}
	err = c.negotiate(br, export)
	if !stop() || ctx.Err() != nil {
		err = ctx.Err()
	}
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("nbd: negotiating with %s: %w", addr, err)
	}
	nc.SetDeadline(time.Time{})
	go c.readReplies(br)
	return c, nil
}

// negotiate runs the fixed-newstyle handshake up to the transmission phase.
func (c *Client) negotiate(br *bufio.Reader, export string) error {
	var b [optReplyHdrSize]byte
	if _, err := io.ReadFull(br, b[:18]); err != nil {
		return fmt.Errorf("reading greeting: %w", err)
	}
	if binary.BigEndian.Uint64(b[0:]) != nbdMagic || binary.BigEndian.Uint64(b[8:]) != optMagic {
		return fmt.Errorf("not a newstyle NBD server (greeting % x)", b[:16])
	}
	hf := binary.BigEndian.Uint16(b[16:])
	if hf&flagFixedNewstyle == 0 {
		return errors.New("server does not support fixed newstyle negotiation")
	}
	cf := uint32(clientFlagFixedNewstyle)
	if hf&flagNoZeroes != 0 {
		cf |= clientFlagNoZeroes
	}
	if len(export) > maxStringLen {
		return fmt.Errorf("export name of %d bytes is too long", len(export))
	}
	// Option header, then NBD_OPT_GO data: name, and one info request
	// (NBD_INFO_BLOCK_SIZE: we honour the maximum payload it reports).
	msg := binary.BigEndian.AppendUint32(nil, cf)
	msg = binary.BigEndian.AppendUint64(msg, optMagic)
	msg = binary.BigEndian.AppendUint32(msg, optGo)
	msg = binary.BigEndian.AppendUint32(msg, uint32(4+len(export)+2+2))
	msg = binary.BigEndian.AppendUint32(msg, uint32(len(export)))
	msg = append(msg, export...)
	msg = binary.BigEndian.AppendUint16(msg, 1)
	msg = binary.BigEndian.AppendUint16(msg, infoBlockSize)
	if _, err := c.nc.Write(msg); err != nil {
		return fmt.Errorf("sending NBD_OPT_GO: %w", err)
	}
	haveExport := false
	for {
		if _, err := io.ReadFull(br, b[:]); err != nil {
			return fmt.Errorf("reading option reply: %w", err)
		}
		if m := binary.BigEndian.Uint64(b[0:]); m != optReplyMagic {
			return fmt.Errorf("bad option reply magic %#x", m)
		}
		opt, typ, n := binary.BigEndian.Uint32(b[8:]), binary.BigEndian.Uint32(b[12:]), binary.BigEndian.Uint32(b[16:])
		if opt != optGo {
			return fmt.Errorf("reply to option %d, want %d (NBD_OPT_GO)", opt, optGo)
		}
		if n > maxOptionLen {
			return fmt.Errorf("option reply of %d bytes", n)
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(br, data); err != nil {
			return fmt.Errorf("reading option reply data: %w", err)
		}
		switch {
		case typ == repAck:
			if !haveExport {
				return errors.New("server acknowledged NBD_OPT_GO without NBD_INFO_EXPORT")
			}
			return nil
		case typ == repInfo:
			if len(data) < 2 {
				return errors.New("short NBD_REP_INFO")
			}
			switch binary.BigEndian.Uint16(data) {
			case infoExport:
				if len(data) != 12 {
					return fmt.Errorf("NBD_INFO_EXPORT of %d bytes", len(data))
				}
				size := binary.BigEndian.Uint64(data[2:])
				if size > 1<<62 {
					return fmt.Errorf("export size %d is too large", size)
				}
				c.size, c.flags = int64(size), binary.BigEndian.Uint16(data[10:])
				haveExport = true
			case infoBlockSize:
				if len(data) != 14 {
					return fmt.Errorf("NBD_INFO_BLOCK_SIZE of %d bytes", len(data))
				}
				if m := binary.BigEndian.Uint32(data[10:]); m > 0 {
					c.maxBlock = min(m, maxPayload)
				}
			}
			// Other information (name, description) is not needed.
		case typ&(1<<31) != 0:
			return fmt.Errorf("server refused export %q: %s (reply type %#x)", export, data, typ)
		default:
			return fmt.Errorf("unexpected option reply type %#x", typ)
		}
	}
}

// Size is the export's size in bytes.
func (c *Client) Size() int64 { return c.size }

// ReadOnly reports whether the server exports the device read-only.
func (c *Client) ReadOnly() bool { return c.flags&tflagReadOnly != 0 }

// CanTrim reports whether the server accepts Trim.
func (c *Client) CanTrim() bool { return c.flags&tflagSendTrim != 0 }

// CanFUA reports whether the server honours the FUA flag itself; Write
// emulates it with a flush otherwise.
func (c *Client) CanFUA() bool { return c.flags&tflagSendFUA != 0 }

// Read reads len(p) bytes at off, which must lie within Size. Large reads
// are split into requests the server accepts and sent together.
func (c *Client) Read(ctx context.Context, p []byte, off int64) error {
	if err := c.checkRange("read", off, int64(len(p))); err != nil {
		return err
	}
	return c.chunked(ctx, "read", cmdRead, 0, p, off, int64(len(p)))
}

// Write writes p at off, which must lie within Size. With fua, Write returns
// only once the data is durable (Forced Unit Access), as after a Flush.
func (c *Client) Write(ctx context.Context, p []byte, off int64, fua bool) error {
	if err := c.checkRange("write", off, int64(len(p))); err != nil {
		return err
	}
	if c.ReadOnly() {
		return &Error{Op: "write", Errno: errPerm}
	}
	var flags uint16
	if fua && c.CanFUA() {
		flags = cmdFlagFUA
	}
	if err := c.chunked(ctx, "write", cmdWrite, flags, p, off, int64(len(p))); err != nil {
		return err
	}
	if fua && flags == 0 {
		return c.Flush(ctx)
	}
	return nil
}

// Flush makes every write that completed before it was called durable.
func (c *Client) Flush(ctx context.Context) error {
	if c.flags&tflagSendFlush == 0 {
		// The server has no volatile cache to flush, or cannot say.
		return fmt.Errorf("nbd: flush: server does not accept NBD_CMD_FLUSH: %w", errors.ErrUnsupported)
	}
	call, err := c.send(cmdFlush, 0, 0, 0, nil, nil)
	if err != nil {
		return err
	}
	return c.wait(ctx, "flush", call)
}

// Trim tells the server that [off, off+length) is no longer needed. The
// range need not read as zeros afterwards (see the server's documentation).
func (c *Client) Trim(ctx context.Context, off, length int64) error {
	if err := c.checkRange("trim", off, length); err != nil {
		return err
	}
	if c.ReadOnly() {
		return &Error{Op: "trim", Errno: errPerm}
	}
	if !c.CanTrim() {
		return fmt.Errorf("nbd: trim: server does not accept NBD_CMD_TRIM: %w", errors.ErrUnsupported)
	}
	return c.chunked(ctx, "trim", cmdTrim, 0, nil, off, length)
}

// ReadAt implements io.ReaderAt: a read past Size returns what there is and
// io.EOF.
func (c *Client) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("nbd: read at negative offset %d", off)
	}
	if off >= c.size {
		return 0, io.EOF
	}
	var eof error
	if rem := c.size - off; int64(len(p)) > rem {
		p, eof = p[:rem], io.EOF
	}
	if err := c.Read(context.Background(), p, off); err != nil {
		return 0, err
	}
	return len(p), eof
}

// WriteAt implements io.WriterAt (without FUA).
func (c *Client) WriteAt(p []byte, off int64) (int, error) {
	if err := c.Write(context.Background(), p, off, false); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Close sends NBD_CMD_DISC and closes the connection. Requests still in
// flight fail with ErrClientClosed; their effect on the export is unknown.
func (c *Client) Close() error {
	c.mu.Lock()
	alive := c.err == nil
	c.mu.Unlock()
	if alive {
		var h [requestSize]byte
		putRequest(h[:], cmdDisc, 0, 0, 0, 0)
		c.wmu.Lock()
		c.nc.SetWriteDeadline(time.Now().Add(time.Second))
		c.nc.Write(h[:]) // best effort
		c.wmu.Unlock()
	}
	c.fail(ErrClientClosed)
	<-c.done
	return nil
}

func (c *Client) checkRange(op string, off, n int64) error {
	if off < 0 || n < 0 || off > c.size || n > c.size-off {
		return fmt.Errorf("nbd: %s of [%d, +%d) is outside the export of %d bytes: %w", op, off, n, c.size, syscall.EINVAL)
	}
	return nil
}

// chunked sends [off, off+n) as requests of at most maxBlock bytes (1 GiB
// for trims, which carry no payload) and waits for all of them. p is the
// read destination or write payload.
func (c *Client) chunked(ctx context.Context, op string, typ, flags uint16, p []byte, off, n int64) error {
	step := int64(c.maxBlock)
	if typ == cmdTrim {
		step = 1 << 30
	}
	var calls []*clientCall
	var err error
	for done := int64(0); done < n; done += step {
		m := min(step, n-done)
		var buf, payload []byte
		switch typ {
		case cmdRead:
			buf = p[done : done+m]
		case cmdWrite:
			payload = p[done : done+m]
		}
		var call *clientCall
		call, err = c.send(typ, flags, uint64(off+done), uint32(m), buf, payload)
		if err != nil {
			break
		}
		calls = append(calls, call)
	}
	for _, call := range calls {
		if werr := c.wait(ctx, op, call); err == nil {
			err = werr
		}
	}
	return err
}

// send registers a request and writes it to the connection.
func (c *Client) send(typ, flags uint16, off uint64, length uint32, buf, payload []byte) (*clientCall, error) {
	call := &clientCall{buf: buf, reply: make(chan error, 1)}
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return nil, err
	}
	c.cookie++
	cookie := c.cookie
	c.pending[cookie] = call
	c.mu.Unlock()

	var h [requestSize]byte
	putRequest(h[:], typ, flags, cookie, off, length)
	bufs := net.Buffers{h[:]}
	if len(payload) > 0 {
		bufs = append(bufs, payload)
	}
	c.wmu.Lock()
	_, err := bufs.WriteTo(c.nc)
	c.wmu.Unlock()
	if err != nil {
		// A partial request desynchronises the stream: give up on it.
		c.fail(fmt.Errorf("nbd: sending %s request: %w", cmdName(typ), err))
	}
	return call, nil // the reply channel reports any failure
}

// wait waits for call's reply. If ctx ends first the connection is closed.
func (c *Client) wait(ctx context.Context, op string, call *clientCall) error {
	select {
	case err := <-call.reply:
		if e, ok := err.(*Error); ok {
			e.Op = op
		}
		return err
	case <-ctx.Done():
		c.fail(fmt.Errorf("nbd: %s abandoned, connection closed: %w", op, ctx.Err()))
		// The reader may be filling call.buf: wait until it has let go.
		return errors.Join(ctx.Err(), <-call.reply)
	}
}

// readReplies reads simple replies and completes their requests until the
// connection fails or is closed.
func (c *Client) readReplies(br *bufio.Reader) {
	defer close(c.done)
	var h [simpleReplySize]byte
	for {
		if _, err := io.ReadFull(br, h[:]); err != nil {
			c.fail(fmt.Errorf("nbd: reading reply: %w", err))
			return
		}
		if m := binary.BigEndian.Uint32(h[0:]); m != simpleReplyMagic {
			c.fail(fmt.Errorf("nbd: bad reply magic %#x", m))
			return
		}
		errno, cookie := binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:])
		c.mu.Lock()
		call := c.pending[cookie]
		delete(c.pending, cookie)
		c.mu.Unlock()
		if call == nil {
			c.fail(fmt.Errorf("nbd: reply for unknown cookie %d", cookie))
			return
		}
		if errno != 0 {
			call.reply <- &Error{Errno: errno}
			continue
		}
		if call.buf != nil {
			if _, err := io.ReadFull(br, call.buf); err != nil {
				err = fmt.Errorf("nbd: reading read payload: %w", err)
				call.reply <- err
				c.fail(err)
				return
			}
		}
		call.reply <- nil
	}
}

// fail makes the connection unusable: it records err (the first error wins),
// closes the connection and fails every outstanding request.
func (c *Client) fail(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil {
		c.err = err
		c.nc.Close()
	}
	for cookie, call := range c.pending {
		// A read the reader is filling is not pending any more; it
		// completes (or fails) on the reader's side.
		call.reply <- c.err
		delete(c.pending, cookie)
	}
}

// putRequest encodes a request header into b[:requestSize].
func putRequest(b []byte, typ, flags uint16, cookie, off uint64, length uint32) {
	binary.BigEndian.PutUint32(b[0:], requestMagic)
	binary.BigEndian.PutUint16(b[4:], flags)
	binary.BigEndian.PutUint16(b[6:], typ)
	binary.BigEndian.PutUint64(b[8:], cookie)
	binary.BigEndian.PutUint64(b[16:], off)
	binary.BigEndian.PutUint32(b[24:], length)
}
