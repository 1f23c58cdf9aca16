package nbd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/bits"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Server serves one Backend as an NBD export over fixed-newstyle NBD.
//
// Set the exported fields before the first call to Serve or ServeConn and do
// not change or copy the Server afterwards.
//
// Backends may return errors wrapping syscall errno values (ENOSPC, EDQUOT,
// EFBIG, EPERM, EROFS, EACCES, EINVAL) to choose the NBD error the client
// sees; anything else is reported as EIO. A Trimmer, Zeroer or BlockStatuser
// may return an error wrapping errors.ErrUnsupported to decline a particular
// request: a trim is then ignored (trims are hints), zeroes are written as
// data, and the range is reported as allocated data.
type Server struct {
	// Backend is the device to export. It is required.
	Backend Backend

	// Name is the export's name. Clients may ask for it or for the default
	// export "", which is the same export.
	Name string

	// Description is an optional human-readable description sent with
	// NBD_INFO_DESCRIPTION and NBD_OPT_LIST.
	Description string

	// ReadOnly makes the export read-only: writes, trims and write-zeroes
	// fail with EPERM.
	ReadOnly bool

	// MinBlockSize is the advertised minimum block size; requests that are
	// not multiples of it fail with EINVAL. It must be a power of two no
	// larger than 64 KiB. Zero means 1 (any alignment).
	MinBlockSize uint32

	// MaxWorkers bounds the requests one connection runs in parallel.
	// Zero means 16.
	MaxWorkers int

	// MaxInFlight bounds the payload bytes (read and write buffers) one
	// connection holds at once, so memory stays bounded under load. Zero
	// means 64 MiB; values below the 32 MiB maximum payload are raised to it.
	MaxInFlight int64

	// HandshakeTimeout bounds option negotiation. Zero means 10 seconds.
	HandshakeTimeout time.Duration

	// Logger receives connection and error logs. Nil discards them.
	Logger *slog.Logger

	connID   atomic.Uint64
	bufs     bufPool
	ops      sync.Pool // of *op
	zeroOnce sync.Once
	zeroBuf  []byte // read-only zeros for emulated WRITE_ZEROES and hole detection
}

// shutdownGrace is how long in-flight replies may take to drain once the
// server's context is done.
const shutdownGrace = 5 * time.Second

// Serve accepts connections on l and serves each with ServeConn until ctx is
// done. It then closes l, stops every connection (in-flight requests are
// completed first) and returns ctx.Err(). It returns early with the Accept
// error if l fails permanently, also stopping its connections.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	if err := s.validate(); err != nil {
		return err
	}
	var wg sync.WaitGroup
	defer wg.Wait() // runs after cancel below
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()

	var backoff time.Duration
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			// Like net/http: ride out EMFILE and friends instead of dying.
			var te interface{ Temporary() bool }
			if errors.As(err, &te) && te.Temporary() {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.logger().Warn("nbd: accept failed; retrying", "err", err, "backoff", backoff)
				select {
				case <-time.After(backoff):
				case <-ctx.Done():
					return ctx.Err()
				}
				continue
			}
			return fmt.Errorf("nbd: accepting connection: %w", err)
		}
		backoff = 0
		wg.Go(func() {
			if err := s.ServeConn(ctx, c); err != nil && ctx.Err() == nil {
				s.logger().Warn("nbd: connection ended with error", "err", err)
			}
		})
	}
}

// ServeConn runs the handshake and then the transmission phase on c, and
// closes c before returning. It returns nil when the client disconnects
// cleanly (NBD_OPT_ABORT, NBD_CMD_DISC or EOF between requests) and
// ctx.Err() when ctx ends the connection; in-flight requests are completed
// first in both cases.
func (s *Server) ServeConn(ctx context.Context, c net.Conn) error {
	defer c.Close()
	if err := s.validate(); err != nil {
		return err
	}
	log := s.logger().With("conn", s.connID.Add(1))
	if addr := c.RemoteAddr(); addr != nil && addr.String() != "" {
		log = log.With("remote", addr.String())
	}
	log.Debug("nbd: connection opened")

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	timeout := s.HandshakeTimeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	c.SetDeadline(time.Now().Add(timeout))
	stopHS := context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
	cn := newConn(s, c, log)
	x, err := cn.negotiate()
	if !stopHS() || ctx.Err() != nil {
		return ctx.Err()
	}
	if err != nil {
		log.Debug("nbd: handshake failed", "err", err)
		return fmt.Errorf("nbd: handshake: %w", err)
	}
	if x == nil {
		log.Debug("nbd: client aborted negotiation")
		return nil
	}
	c.SetDeadline(time.Time{})
	log.Debug("nbd: entering transmission", "size", x.size, "flags", fmt.Sprintf("%#x", x.flags),
		"structured", x.structured, "base_allocation", x.metaAlloc)

	// On shutdown stop reading new requests at once, but give in-flight
	// replies a bounded time to drain.
	stopTX := context.AfterFunc(ctx, func() {
		c.SetReadDeadline(time.Now())
		c.SetWriteDeadline(time.Now().Add(shutdownGrace))
	})
	defer stopTX()
	err = cn.transmit(ctx, x)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if err != nil {
		log.Debug("nbd: transmission ended", "err", err)
		return fmt.Errorf("nbd: transmission: %w", err)
	}
	log.Debug("nbd: connection closed")
	return nil
}

func (s *Server) validate() error {
	if s.Backend == nil {
		return errors.New("nbd: Server.Backend is nil")
	}
	if m := s.MinBlockSize; m != 0 && (m&(m-1) != 0 || m > maxMinBlockSize) {
		return fmt.Errorf("nbd: MinBlockSize %d is not a power of two <= 64 KiB", m)
	}
	return nil
}

func (s *Server) logger() *slog.Logger {
	if s.Logger != nil {
		return s.Logger
	}
	return slog.New(slog.DiscardHandler)
}

func (s *Server) minBlock() uint32 {
	if s.MinBlockSize == 0 {
		return defaultMinBlock
	}
	return s.MinBlockSize
}

func (s *Server) workers() int {
	if s.MaxWorkers > 0 {
		return s.MaxWorkers
	}
	return defaultWorkers
}

func (s *Server) inFlight() int64 {
	if s.MaxInFlight <= 0 {
		return defaultInFlight
	}
	return max(s.MaxInFlight, maxPayload)
}

// zeros returns a shared 1 MiB buffer of zeros. Callers must not modify it.
func (s *Server) zeros() []byte {
	s.zeroOnce.Do(func() { s.zeroBuf = make([]byte, 1<<20) })
	return s.zeroBuf
}

// exportMatches reports whether name selects this server's export.
func (s *Server) exportMatches(name string) bool {
	return name == "" || name == s.Name
}

// transmissionFlags are the flags advertised for the export; DF depends on
// whether structured replies were negotiated.
func (s *Server) transmissionFlags(structured bool) uint16 {
	// CAN_MULTI_CONN is safe: the server keeps no cache of its own, every
	// connection shares s.Backend, and Backend.Flush covers every completed
	// write, not just this connection's.
	f := uint16(tflagHasFlags | tflagSendFlush | tflagCanMultiConn)
	if s.ReadOnly {
		f |= tflagReadOnly
	} else {
		// WRITE_ZEROES is emulated with writes when there is no Zeroer;
		// FAST_ZERO then fails fast with ENOTSUP, as the spec allows.
		f |= tflagSendFUA | tflagSendWriteZeroes | tflagSendFastZero
		if _, ok := s.Backend.(Trimmer); ok {
			f |= tflagSendTrim
		}
	}
	if structured {
		f |= tflagSendDF
	}
	return f
}

// newExport captures the negotiated state for transmission.
func (s *Server) newExport(structured, metaAlloc bool) (*export, error) {
	size := s.Backend.Size()
	if size < 0 {
		return nil, fmt.Errorf("backend reports negative size %d", size)
	}
	x := &export{
		backend:    s.Backend,
		size:       uint64(size),
		flags:      s.transmissionFlags(structured),
		minBlock:   s.minBlock(),
		structured: structured,
		metaAlloc:  metaAlloc && structured,
	}
	x.trimmer, _ = s.Backend.(Trimmer)
	x.zeroer, _ = s.Backend.(Zeroer)
	x.statuser, _ = s.Backend.(BlockStatuser)
	return x, nil
}

// bufPool hands out byte slices in power-of-two size classes from 4 KiB to
// 32 MiB so the hot path does not allocate per request.
type bufPool struct {
	classes [numBufClasses]sync.Pool // of *[]byte
}

const (
	minBufShift   = 12
	numBufClasses = 25 - minBufShift + 1 // 4 KiB .. 32 MiB
)

func bufClass(n int) int {
	if n <= 1<<minBufShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minBufShift
}

// get returns a slice of length n. Put it back with put.
func (p *bufPool) get(n int) *[]byte {
	c := bufClass(n)
	if c >= numBufClasses {
		b := make([]byte, n)
		return &b
	}
	if v, ok := p.classes[c].Get().(*[]byte); ok {
		*v = (*v)[:n]
		return v
	}
	b := make([]byte, n, 1<<(c+minBufShift))
	return &b
}

func (p *bufPool) put(b *[]byte) {
	if b == nil {
		return
	}
	c := bufClass(cap(*b))
	if c >= numBufClasses || cap(*b) != 1<<(c+minBufShift) {
		return
	}
	p.classes[c].Put(b)
}

// budget bounds a connection's in-flight requests and payload bytes. Only
// the connection's reader acquires, so a one-slot wake channel suffices.
type budget struct {
	mu    sync.Mutex
	bytes int64 // available payload bytes
	slots int   // available request slots
	wake  chan struct{}
}

func newBudget(bytes int64, slots int) *budget {
	return &budget{bytes: bytes, slots: slots, wake: make(chan struct{}, 1)}
}

// acquire takes one slot and n bytes, waiting for releases or ctx.
func (b *budget) acquire(ctx context.Context, n int64) error {
	for {
		b.mu.Lock()
		if b.slots > 0 && b.bytes >= n {
			b.slots--
			b.bytes -= n
			b.mu.Unlock()
			return nil
		}
		b.mu.Unlock()
		select {
		case <-b.wake:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (b *budget) release(n int64) {
	b.mu.Lock()
	b.slots++
	b.bytes += n
	b.mu.Unlock()
	select {
	case b.wake <- struct{}{}:
	default:
	}
}
