// Package qmp owns the host agent's private channel to QEMU: a small client
// for the QEMU Machine Protocol, spoken over the unix socket the agent hands
// to QEMU with -qmp. Only the agent holds that socket; nothing outside the
// agent (tenants, the management server, the guest) may reach it, and the
// agent only runs fixed sequences of commands through it.
//
// A Monitor matches responses to requests by id, so commands may be issued
// concurrently and asynchronous events arriving between them never confuse a
// reply. QEMU is not trusted to be well-formed: lines longer than MaxLineSize
// and anything that is not a QMP message end the session with ErrProtocol.
package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// MaxLineSize is the longest line, in bytes and without its line terminator,
// that a Monitor accepts from QEMU.
const MaxLineSize = 16 << 20

// DefaultEventBuffer is the capacity of the events channel when
// Dialer.EventBuffer is zero.
const DefaultEventBuffer = 64

// Errors that end a Monitor. Every error a Monitor returns after it ended
// wraps one of them.
var (
	// ErrClosed: Close was called.
	ErrClosed = errors.New("monitor closed")
	// ErrDisconnected: QEMU closed the connection (wrapping io.EOF) or it
	// failed (wrapping the I/O error).
	ErrDisconnected = errors.New("QEMU disconnected")
	// ErrProtocol: QEMU sent something that is not QMP.
	ErrProtocol = errors.New("QMP protocol violation")
)

// Error is an error response from QEMU, such as
// {"class": "CommandNotFound", "desc": "The command foo has not been found"}.
type Error struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

func (e *Error) Error() string { return e.Class + ": " + e.Desc }

// Event is an asynchronous message from QEMU, such as STOP or SHUTDOWN.
type Event struct {
	Name string
	Data json.RawMessage // the "data" member as sent; nil if absent
	Time time.Time       // QEMU's timestamp; zero if absent
}

// Version is QEMU's version as its greeting announced it.
type Version struct {
	Major, Minor, Micro int
	Package             string
}

// A Dialer holds the options for connecting to QEMU. The zero value is ready
// to use.
type Dialer struct {
	// Logger receives debug records of commands and warnings about
	// dropped events and unmatched responses. Nil discards them.
	Logger *slog.Logger

	// EventBuffer is the capacity of the channel Events returns;
	// DefaultEventBuffer if zero. Events arriving while it is full are
	// dropped (and counted by DroppedEvents) rather than stalling replies.
	EventBuffer int
}

// Dial connects to the QMP unix socket at socketPath with a zero Dialer.
func Dial(ctx context.Context, socketPath string) (*Monitor, error) {
	var d Dialer
	return d.Dial(ctx, socketPath)
}

// Dial connects to the QMP unix socket at socketPath, reads QEMU's greeting
// and leaves capabilities negotiation mode. ctx bounds the connection and the
// handshake, not the Monitor's life.
func (d *Dialer) Dial(ctx context.Context, socketPath string) (*Monitor, error) {
	var nd net.Dialer
	conn, err := nd.DialContext(ctx, "unix", socketPath)
	if err != nil {
		return nil, fmt.Errorf("qmp: dial: %w", err)
	}
	return d.NewMonitor(ctx, conn)
}

// NewMonitor runs the QMP handshake over an established connection: it reads
// the greeting and sends qmp_capabilities. The Monitor owns conn, also when
// NewMonitor fails. ctx bounds the handshake only.
func (d *Dialer) NewMonitor(ctx context.Context, conn net.Conn) (*Monitor, error) {
	log := d.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	n := d.EventBuffer
	if n <= 0 {
		n = DefaultEventBuffer
	}
	m := &Monitor{
		conn:     conn,
		log:      log,
		events:   make(chan Event, n),
		writeSem: make(chan struct{}, 1),
		pending:  make(map[uint64]chan reply),
		greeted:  make(chan struct{}),
		done:     make(chan struct{}),
	}
	go m.readLoop()

	select {
	case <-m.greeted:
	case <-m.done:
		// The greeting may have been read just before the end.
		select {
		case <-m.greeted:
		default:
			return nil, fmt.Errorf("qmp: waiting for greeting: %w", m.terminalErr())
		}
	case <-ctx.Done():
		m.Close()
		return nil, fmt.Errorf("qmp: waiting for greeting: %w", ctx.Err())
	}
	if err := m.Execute(ctx, "qmp_capabilities", nil, nil); err != nil {
		m.Close()
		return nil, err
	}
	return m, nil
}

// A Monitor is a QMP session with one QEMU process. It is safe for
// concurrent use.
type Monitor struct {
	conn     net.Conn
	log      *slog.Logger
	events   chan Event // sent to and closed by readLoop only
	dropped  atomic.Uint64
	writeSem chan struct{} // held while writing a request
	version  Version       // written by readLoop before greeted is closed
	greeted  chan struct{}
	done     chan struct{} // closed when readLoop has exited; err is set

	mu      sync.Mutex
	nextID  uint64
	pending map[uint64]chan reply // requests awaiting a response, by id
	err     error                 // why the Monitor ended; set once

	closeOnce sync.Once
	closeErr  error
}

// Version returns QEMU's version from its greeting.
func (m *Monitor) Version() Version { return m.version }

// Events returns the channel of QEMU's asynchronous events, in arrival order.
// It is closed when the Monitor ends. Events that find it full are dropped.
func (m *Monitor) Events() <-chan Event { return m.events }

// DroppedEvents returns how many events were dropped because the events
// channel was full.
func (m *Monitor) DroppedEvents() uint64 { return m.dropped.Load() }

// Done returns a channel that is closed when the Monitor has ended, by Close
// or because the connection to QEMU ended. Err then says why.
func (m *Monitor) Done() <-chan struct{} { return m.done }

// Err returns nil while the Monitor is live, and then why it ended.
func (m *Monitor) Err() error {
	select {
	case <-m.done:
		return m.terminalErr()
	default:
		return nil
	}
}

// Close ends the session and closes the connection; commands waiting for a
// response return an error wrapping ErrClosed. It does not stop QEMU (see
// Quit). Close is idempotent.
func (m *Monitor) Close() error {
	m.end(ErrClosed)
	<-m.done
	if m.closeErr != nil {
		return fmt.Errorf("qmp: close: %w", m.closeErr)
	}
	return nil
}

// Execute sends the command with args (marshalled to a JSON object; nil for
// none) and waits for its response, whose return value is unmarshalled into
// reply unless reply is nil. A QMP error response is returned as an *Error.
//
// If ctx ends first, Execute returns ctx.Err() wrapped. The command may have
// run anyway; its late response is discarded and the Monitor stays usable,
// unless cancellation cut a request in half, which ends the Monitor.
func (m *Monitor) Execute(ctx context.Context, command string, args, reply any) error {
	if err := m.execute(ctx, command, args, reply); err != nil {
		return fmt.Errorf("qmp: %s: %w", command, err)
	}
	return nil
}

type request struct {
	Execute   string `json:"execute"`
	Arguments any    `json:"arguments,omitempty"`
	ID        uint64 `json:"id"`
}

func (m *Monitor) execute(ctx context.Context, command string, args, v any) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	m.mu.Lock()
	if m.err != nil {
		m.mu.Unlock()
		return m.err
	}
	m.nextID++
	id := m.nextID
	m.mu.Unlock()

	b, err := json.Marshal(request{Execute: command, Arguments: args, ID: id})
	if err != nil {
		return fmt.Errorf("encoding request: %w", err)
	}
	b = append(b, '\n')

	ch := make(chan reply, 1)
	m.mu.Lock()
	if m.err != nil {
		m.mu.Unlock()
		return m.err
	}
	m.pending[id] = ch
	m.mu.Unlock()

	m.log.Debug("qmp: execute", "command", command, "id", id)
	if err := m.write(ctx, b); err != nil {
		m.forget(id)
		return err
	}

	select {
	case r := <-ch:
		return r.decode(v)
	case <-m.done:
		select {
		case r := <-ch: // delivered just before the end
			return r.decode(v)
		default:
			return m.terminalErr()
		}
	case <-ctx.Done():
		m.forget(id)
		select {
		case r := <-ch:
			return r.decode(v)
		default:
			return ctx.Err()
		}
	}
}

// forget drops a request that will not wait for its response.
func (m *Monitor) forget(id uint64) {
	m.mu.Lock()
	delete(m.pending, id)
	m.mu.Unlock()
}

// write sends one whole request. Requests are written one at a time; ctx
// interrupts both waiting for the turn and a write QEMU is not reading.
func (m *Monitor) write(ctx context.Context, b []byte) error {
	select {
	case m.writeSem <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	case <-m.done:
		return m.terminalErr()
	}
	defer func() { <-m.writeSem }()

	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		m.conn.SetWriteDeadline(time.Unix(1, 0)) // unblocks Write
		close(fired)
	})
	n, err := m.conn.Write(b)
	if !stop() {
		<-fired
		m.conn.SetWriteDeadline(time.Time{})
	}
	if err == nil {
		return nil
	}
	switch {
	case n == 0 && ctx.Err() != nil && errors.Is(err, os.ErrDeadlineExceeded):
		return ctx.Err() // nothing sent; the stream is intact
	case ctx.Err() != nil && errors.Is(err, os.ErrDeadlineExceeded):
		m.end(fmt.Errorf("request cut off after %d of %d bytes: %w", n, len(b), ctx.Err()))
	default:
		m.end(fmt.Errorf("%w: writing request: %w", ErrDisconnected, err))
	}
	return m.terminalErr()
}

// end records why the Monitor ends, unless that is already known, and closes
// the connection, which makes readLoop exit.
func (m *Monitor) end(err error) {
	m.mu.Lock()
	if m.err == nil {
		m.err = err
	}
	m.mu.Unlock()
	m.closeOnce.Do(func() { m.closeErr = m.conn.Close() })
}

func (m *Monitor) terminalErr() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.err
}

// readLoop is the only reader of conn. It runs until the connection ends or
// QEMU violates the protocol, and never blocks on anything but reading.
func (m *Monitor) readLoop() {
	sc := bufio.NewScanner(m.conn)
	// Room for a MaxLineSize line and its "\r\n"; longer lines fail.
	sc.Buffer(make([]byte, 0, 4096), MaxLineSize+2)
	err := m.dispatch(sc)
	if err == nil {
		switch err = sc.Err(); {
		case errors.Is(err, bufio.ErrTooLong):
			err = fmt.Errorf("%w: line longer than %d bytes", ErrProtocol, MaxLineSize)
		case err == nil:
			err = fmt.Errorf("%w: %w", ErrDisconnected, io.EOF)
		default:
			err = fmt.Errorf("%w: %w", ErrDisconnected, err)
		}
	}
	m.end(err)
	if e := m.terminalErr(); !errors.Is(e, ErrClosed) {
		m.log.Debug("qmp: monitor ended", "err", e)
	}
	close(m.events)
	close(m.done)
}

// dispatch reads lines until the connection ends (nil) or a protocol error.
func (m *Monitor) dispatch(sc *bufio.Scanner) error {
	greeted := false
	for sc.Scan() {
		line := sc.Bytes()
		if len(line) > MaxLineSize {
			return fmt.Errorf("%w: line longer than %d bytes", ErrProtocol, MaxLineSize)
		}
		if len(line) == 0 {
			continue
		}
		r, err := decodeReply(line)
		if err != nil {
			return err
		}
		if !greeted {
			if r.kind != kindGreeting {
				return fmt.Errorf("%w: first message is not a greeting", ErrProtocol)
			}
			m.version = r.version
			greeted = true
			close(m.greeted)
			continue
		}
		switch r.kind {
		case kindGreeting:
			return fmt.Errorf("%w: second greeting", ErrProtocol)
		case kindEvent:
			select {
			case m.events <- r.event:
			default:
				m.dropped.Add(1)
				m.log.Warn("qmp: events channel full, dropping event", "event", r.event.Name)
			}
		case kindReturn, kindError:
			var ch chan reply
			if r.hasID {
				m.mu.Lock()
				ch = m.pending[r.id]
				delete(m.pending, r.id)
				m.mu.Unlock()
			}
			if ch == nil {
				// Usually the late response to a cancelled command.
				m.log.Debug("qmp: discarding response that matches no waiting command", "id", r.id, "has_id", r.hasID)
				continue
			}
			ch <- r // buffered; never blocks
		}
	}
	return nil
}
