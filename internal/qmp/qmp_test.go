package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"
)

const greeting = `{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2"}, "capabilities": ["oob"]}}`

// peer is the QEMU side of a test connection. Its methods return errors
// instead of failing the test so that they can run in goroutines.
type peer struct {
	conn net.Conn
	r    *bufio.Reader
}

func newPeer(conn net.Conn) *peer { return &peer{conn: conn, r: bufio.NewReader(conn)} }

// send writes each line with QEMU's "\r\n" terminator.
func (p *peer) send(lines ...string) error {
	for _, l := range lines {
		if _, err := io.WriteString(p.conn, l+"\r\n"); err != nil {
			return fmt.Errorf("peer send: %w", err)
		}
	}
	return nil
}

type testRequest struct {
	Execute   string          `json:"execute"`
	Arguments json.RawMessage `json:"arguments"`
	ID        json.RawMessage `json:"id"`
	raw       string
}

func (p *peer) recv() (testRequest, error) {
	line, err := p.r.ReadString('\n')
	if err != nil {
		return testRequest{}, fmt.Errorf("peer recv: %w", err)
	}
	var req testRequest
	if err := json.Unmarshal([]byte(line), &req); err != nil {
		return testRequest{}, fmt.Errorf("peer recv %q: %w", line, err)
	}
	req.raw = line
	return req, nil
}

// expect receives a request for command and returns its id.
func (p *peer) expect(command string) (string, error) {
	req, err := p.recv()
	if err != nil {
		return "", err
	}
	if req.Execute != command {
		return "", fmt.Errorf("peer got command %q, want %q", req.Execute, command)
	}
	return string(req.ID), nil
}

// answer receives a request for command and sends the response lines, with
// every "ID" replaced by the request's id.
func (p *peer) answer(command string, lines ...string) error {
	id, err := p.expect(command)
	if err != nil {
		return err
	}
	for _, l := range lines {
		if err := p.send(strings.ReplaceAll(l, "ID", id)); err != nil {
			return err
		}
	}
	return nil
}

func (p *peer) handshake() error {
	if err := p.send(greeting); err != nil {
		return err
	}
	return p.answer("qmp_capabilities", `{"return": {}, "id": ID}`)
}

// goPeer runs f on the peer in a goroutine; wait returns its error.
func goPeer(p *peer, f func(*peer) error) (wait func() error) {
	errc := make(chan error, 1)
	go func() { errc <- f(p) }()
	return func() error {
		select {
		case err := <-errc:
			return err
		case <-time.After(20 * time.Second):
			return errors.New("peer script did not finish")
		}
	}
}

// connect returns a Monitor that has completed the handshake with a peer.
func connect(t *testing.T, d *Dialer) (*Monitor, *peer) {
	t.Helper()
	client, server := net.Pipe()
	p := newPeer(server)
	wait := goPeer(p, (*peer).handshake)
	m, err := d.NewMonitor(testContext(t), client)
	if err != nil {
		t.Fatalf("NewMonitor: %v", err)
	}
	if err := wait(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		m.Close()
		server.Close()
	})
	return m, p
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestHandshake(t *testing.T) {
	tests := []struct {
		name   string
		script func(*peer) error
		check  func(*testing.T, *Monitor, error)
	}{
		{
			name:   "ok",
			script: (*peer).handshake,
			check: func(t *testing.T, m *Monitor, err error) {
				if err != nil {
					t.Fatal(err)
				}
				want := Version{Major: 7, Minor: 2, Micro: 22, Package: "Debian 1:7.2"}
				if got := m.Version(); got != want {
					t.Errorf("Version() = %+v, want %+v", got, want)
				}
			},
		},
		{
			name: "capabilities request has no arguments",
			script: func(p *peer) error {
				p.send(greeting)
				req, err := p.recv()
				if err != nil {
					return err
				}
				if req.Execute != "qmp_capabilities" || req.Arguments != nil || string(req.ID) != "1" {
					return fmt.Errorf("unexpected first request %s", req.raw)
				}
				return p.send(`{"return": {}, "id": 1}`)
			},
			check: wantErr(nil),
		},
		{
			name:   "EOF before greeting",
			script: func(p *peer) error { return p.conn.Close() },
			check:  wantErr(ErrDisconnected, io.EOF),
		},
		{
			name:   "response before greeting",
			script: func(p *peer) error { return p.send(`{"return": {}, "id": 1}`) },
			check:  wantErr(ErrProtocol),
		},
		{
			name:   "not JSON",
			script: func(p *peer) error { return p.send("QEMU says hello") },
			check:  wantErr(ErrProtocol),
		},
		{
			name:   "greeting is not an object",
			script: func(p *peer) error { return p.send(`{"QMP": null}`) },
			check:  wantErr(ErrProtocol),
		},
		{
			name: "capabilities refused",
			script: func(p *peer) error {
				p.send(greeting)
				return p.answer("qmp_capabilities", `{"error": {"class": "GenericError", "desc": "no"}, "id": ID}`)
			},
			check: func(t *testing.T, _ *Monitor, err error) {
				var qe *Error
				if !errors.As(err, &qe) || qe.Class != "GenericError" || qe.Desc != "no" {
					t.Fatalf("got %v, want *Error GenericError", err)
				}
			},
		},
		{
			name: "EOF instead of capabilities response",
			script: func(p *peer) error {
				p.send(greeting)
				p.expect("qmp_capabilities")
				return p.conn.Close()
			},
			check: wantErr(ErrDisconnected, io.EOF),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			client, server := net.Pipe()
			defer server.Close()
			wait := goPeer(newPeer(server), tt.script)
			var d Dialer
			m, err := d.NewMonitor(testContext(t), client)
			if m != nil {
				defer m.Close()
			}
			if err == nil && m == nil {
				t.Fatal("NewMonitor returned neither Monitor nor error")
			}
			tt.check(t, m, err)
			server.Close()
			wait()
		})
	}
}

// wantErr returns a check that err wraps all of targets (nil: no error).
func wantErr(targets ...error) func(*testing.T, *Monitor, error) {
	return func(t *testing.T, _ *Monitor, err error) {
		t.Helper()
		if len(targets) == 1 && targets[0] == nil {
			if err != nil {
				t.Fatalf("unexpected error: %v", err)
			}
			return
		}
		for _, target := range targets {
			if !errors.Is(err, target) {
				t.Fatalf("error %v does not wrap %v", err, target)
			}
		}
	}
}

func TestHandshakeCancel(t *testing.T) {
	client, server := net.Pipe()
	defer server.Close()
	go io.Copy(io.Discard, server) // a QEMU that never greets
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	start := time.Now()
	var d Dialer
	_, err := d.NewMonitor(ctx, client)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v, want deadline exceeded", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("NewMonitor took %v after cancellation", d)
	}
}

// shortTempDir returns a directory whose path fits in a sockaddr_un.
func shortTempDir(t *testing.T) string {
	dir, err := os.MkdirTemp("", "qmp")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func TestDialUnixSocket(t *testing.T) {
	sock := filepath.Join(shortTempDir(t), "qmp.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan error, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		defer conn.Close()
		p := newPeer(conn)
		if err := p.handshake(); err != nil {
			done <- err
			return
		}
		if err := p.answer("query-status", `{"return": {"status": "prelaunch", "singlestep": false, "running": false}, "id": ID}`); err != nil {
			done <- err
			return
		}
		_, err = p.recv() // EOF when the client closes
		if errors.Is(err, io.EOF) {
			err = nil
		}
		done <- err
	}()

	m, err := Dial(testContext(t), sock)
	if err != nil {
		t.Fatal(err)
	}
	st, err := m.Status(testContext(t))
	if err != nil {
		t.Fatal(err)
	}
	if want := (StatusInfo{Status: "prelaunch"}); st != want {
		t.Errorf("Status() = %+v, want %+v", st, want)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	if _, err := Dial(testContext(t), filepath.Join(shortTempDir(t), "absent.sock")); err == nil {
		t.Fatal("Dial to a missing socket succeeded")
	}
}

func TestExecute(t *testing.T) {
	tests := []struct {
		name   string
		script func(*peer) error
		call   func(context.Context, *Monitor) (any, error)
		want   any
		check  func(*testing.T, error)
		// events are the events the script sends, in order.
		events []Event
	}{
		{
			name: "return value",
			script: func(p *peer) error {
				return p.answer("query-status", `{"return": {"status": "paused", "singlestep": false, "running": false}, "id": ID}`)
			},
			call: func(ctx context.Context, m *Monitor) (any, error) { return m.Status(ctx) },
			want: StatusInfo{Status: "paused"},
		},
		{
			name: "arguments",
			script: func(p *peer) error {
				req, err := p.recv()
				if err != nil {
					return err
				}
				var args map[string]any
				json.Unmarshal(req.Arguments, &args)
				if req.Execute != "human-monitor-command" || !reflect.DeepEqual(args, map[string]any{"command-line": "info version"}) {
					return fmt.Errorf("unexpected request %s", req.raw)
				}
				return p.send(fmt.Sprintf(`{"return": "7.2.22\r\n", "id": %s}`, req.ID))
			},
			call: func(ctx context.Context, m *Monitor) (any, error) {
				var s string
				err := m.Execute(ctx, "human-monitor-command", map[string]string{"command-line": "info version"}, &s)
				return s, err
			},
			want: "7.2.22\r\n",
		},
		{
			name: "QMP error",
			script: func(p *peer) error {
				return p.answer("frobnicate", `{"id": ID, "error": {"class": "CommandNotFound", "desc": "The command frobnicate has not been found"}}`)
			},
			call: func(ctx context.Context, m *Monitor) (any, error) { return nil, m.Execute(ctx, "frobnicate", nil, nil) },
			check: func(t *testing.T, err error) {
				var qe *Error
				if !errors.As(err, &qe) {
					t.Fatalf("got %v, want *Error", err)
				}
				if *qe != (Error{Class: "CommandNotFound", Desc: "The command frobnicate has not been found"}) {
					t.Errorf("got %+v", *qe)
				}
				if !strings.Contains(err.Error(), "frobnicate") {
					t.Errorf("error %q does not name the command", err)
				}
			},
		},
		{
			name: "events and stray responses before the reply",
			script: func(p *peer) error {
				return p.answer("stop",
					`{"timestamp": {"seconds": 1700000000, "microseconds": 250}, "event": "STOP"}`,
					`{"return": {}, "id": 999}`,
					`{"return": {}}`,
					`{"return": {}, "id": "ID"}`,
					`{"error": {"class": "GenericError", "desc": "not yours"}, "id": 1000}`,
					`{"event": "BLOCK_IO_ERROR", "data": {"device": "d0", "nospace": true}}`,
					`{"return": {}, "id": ID}`,
				)
			},
			call: func(ctx context.Context, m *Monitor) (any, error) { return nil, m.Stop(ctx) },
			events: []Event{
				{Name: "STOP", Time: time.Unix(1700000000, 250000)},
				{Name: "BLOCK_IO_ERROR", Data: json.RawMessage(`{"device": "d0", "nospace": true}`)},
			},
		},
		{
			name: "unknown members ignored",
			script: func(p *peer) error {
				return p.answer("cont", `{"id": ID, "return": {}, "future": [1, 2]}`)
			},
			call: func(ctx context.Context, m *Monitor) (any, error) { return nil, m.Cont(ctx) },
		},
		{
			name: "return value of the wrong type",
			script: func(p *peer) error {
				return p.answer("query-status", `{"return": [], "id": ID}`)
			},
			call: func(ctx context.Context, m *Monitor) (any, error) { return m.Status(ctx) },
			check: func(t *testing.T, err error) {
				var qe *Error
				if err == nil || errors.As(err, &qe) || errors.Is(err, ErrProtocol) {
					t.Fatalf("got %v, want a decoding error", err)
				}
			},
		},
		{
			name: "EOF while waiting",
			script: func(p *peer) error {
				p.expect("system_powerdown")
				return p.conn.Close()
			},
			call:  func(ctx context.Context, m *Monitor) (any, error) { return nil, m.SystemPowerdown(ctx) },
			check: func(t *testing.T, err error) { wantErr(ErrDisconnected, io.EOF)(t, nil, err) },
		},
		{
			name: "garbage while waiting",
			script: func(p *peer) error {
				return p.answer("system_reset", `{"return": {}, "id": ID`)
			},
			call:  func(ctx context.Context, m *Monitor) (any, error) { return nil, m.SystemReset(ctx) },
			check: func(t *testing.T, err error) { wantErr(ErrProtocol)(t, nil, err) },
		},
		{
			name: "second greeting",
			script: func(p *peer) error {
				return p.answer("stop", greeting)
			},
			call:  func(ctx context.Context, m *Monitor) (any, error) { return nil, m.Stop(ctx) },
			check: func(t *testing.T, err error) { wantErr(ErrProtocol)(t, nil, err) },
		},
		{
			name: "ambiguous message",
			script: func(p *peer) error {
				return p.answer("stop", `{"return": {}, "error": {"class": "x", "desc": "y"}, "id": ID}`)
			},
			call:  func(ctx context.Context, m *Monitor) (any, error) { return nil, m.Stop(ctx) },
			check: func(t *testing.T, err error) { wantErr(ErrProtocol)(t, nil, err) },
		},
		{
			name: "line of MaxLineSize bytes",
			script: func(p *peer) error {
				id, err := p.expect("big")
				if err != nil {
					return err
				}
				head, tail := `{"return": "`, `", "id": `+id+`}`
				return p.send(head + strings.Repeat("x", MaxLineSize-len(head)-len(tail)) + tail)
			},
			call: func(ctx context.Context, m *Monitor) (any, error) {
				var s string
				err := m.Execute(ctx, "big", nil, &s)
				return len(s), err
			},
			want: MaxLineSize - len(`{"return": "", "id": 2}`),
		},
		{
			name: "line longer than MaxLineSize",
			script: func(p *peer) error {
				id, err := p.expect("big")
				if err != nil {
					return err
				}
				head, tail := `{"return": "`, `", "id": `+id+`}`
				err = p.send(head + strings.Repeat("x", MaxLineSize+1-len(head)-len(tail)) + tail)
				if errors.Is(err, io.ErrClosedPipe) {
					err = nil // the client stopped reading
				}
				return err
			},
			call:  func(ctx context.Context, m *Monitor) (any, error) { return nil, m.Execute(ctx, "big", nil, nil) },
			check: func(t *testing.T, err error) { wantErr(ErrProtocol)(t, nil, err) },
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, p := connect(t, &Dialer{})
			wait := goPeer(p, tt.script)
			got, err := tt.call(testContext(t), m)
			if tt.check != nil {
				tt.check(t, err)
			} else if err != nil {
				t.Fatal(err)
			} else if tt.want != nil && !reflect.DeepEqual(got, tt.want) {
				t.Errorf("got %#v, want %#v", got, tt.want)
			}
			if err := wait(); err != nil {
				t.Fatal(err)
			}
			for i, want := range tt.events {
				select {
				case ev := <-m.Events():
					if ev.Name != want.Name || !ev.Time.Equal(want.Time) || string(ev.Data) != string(want.Data) {
						t.Errorf("event %d = %+v, want %+v", i, ev, want)
					}
				default:
					t.Fatalf("event %d (%s) missing", i, want.Name)
				}
			}
			if errors.Is(err, ErrProtocol) || errors.Is(err, ErrDisconnected) {
				// The Monitor has ended: later commands fail the same way
				// and the events channel is closed.
				if err2 := m.Stop(testContext(t)); !errors.Is(err2, ErrProtocol) && !errors.Is(err2, ErrDisconnected) {
					t.Errorf("command after end: %v", err2)
				}
				if _, ok := <-m.Events(); ok {
					t.Error("events channel open after end")
				}
				if m.Err() == nil {
					t.Error("Err() is nil after end")
				}
				return
			}
			// The Monitor is still usable.
			w := goPeer(p, func(p *peer) error { return p.answer("cont", `{"return": {}, "id": ID}`) })
			if err := m.Cont(testContext(t)); err != nil {
				t.Fatalf("command after %s: %v", tt.name, err)
			}
			if err := w(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestHelpersSendCommands(t *testing.T) {
	tests := []struct {
		command string
		call    func(*Monitor, context.Context) error
	}{
		{"stop", (*Monitor).Stop},
		{"cont", (*Monitor).Cont},
		{"system_reset", (*Monitor).SystemReset},
		{"system_powerdown", (*Monitor).SystemPowerdown},
		{"query-status", func(m *Monitor, ctx context.Context) error { _, err := m.Status(ctx); return err }},
	}
	m, p := connect(t, &Dialer{})
	for _, tt := range tests {
		t.Run(tt.command, func(t *testing.T) {
			wait := goPeer(p, func(p *peer) error {
				req, err := p.recv()
				if err != nil {
					return err
				}
				if req.Execute != tt.command || req.Arguments != nil {
					return fmt.Errorf("got request %s, want %s without arguments", req.raw, tt.command)
				}
				return p.send(fmt.Sprintf(`{"return": {}, "id": %s}`, req.ID))
			})
			if err := tt.call(m, testContext(t)); err != nil {
				t.Fatal(err)
			}
			if err := wait(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestConcurrentOutOfOrder checks that concurrent commands each get their
// own response when QEMU answers in another order, with events between.
func TestConcurrentOutOfOrder(t *testing.T) {
	const n = 16
	m, p := connect(t, &Dialer{EventBuffer: 1})
	wait := goPeer(p, func(p *peer) error {
		var reqs []testRequest
		for range n {
			req, err := p.recv()
			if err != nil {
				return err
			}
			reqs = append(reqs, req)
		}
		for i := len(reqs) - 1; i >= 0; i-- {
			err := p.send(
				`{"event": "TICK", "data": {"i": `+fmt.Sprint(i)+`}}`,
				fmt.Sprintf(`{"return": %s, "id": %s}`, reqs[i].Arguments, reqs[i].ID),
			)
			if err != nil {
				return err
			}
		}
		return nil
	})
	var eventsSeen int
	eventsDone := make(chan struct{})
	go func() {
		defer close(eventsDone)
		for range m.Events() {
			eventsSeen++
		}
	}()
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			var got struct{ I int }
			if err := m.Execute(testContext(t), "echo", map[string]int{"i": i}, &got); err != nil {
				t.Error(err)
			} else if got.I != i {
				t.Errorf("command %d got the response for %d", i, got.I)
			}
		})
	}
	wg.Wait()
	if err := wait(); err != nil {
		t.Fatal(err)
	}
	m.Close()
	<-eventsDone
	if got := uint64(eventsSeen) + m.DroppedEvents(); got != n {
		t.Errorf("events seen %d + dropped %d != %d sent", eventsSeen, m.DroppedEvents(), n)
	}
}

func TestEOFUnblocksAllWaiters(t *testing.T) {
	const n = 4
	m, p := connect(t, &Dialer{})
	wait := goPeer(p, func(p *peer) error {
		for range n {
			if _, err := p.recv(); err != nil {
				return err
			}
		}
		return p.conn.Close()
	})
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			if err := m.Stop(testContext(t)); !errors.Is(err, ErrDisconnected) || !errors.Is(err, io.EOF) {
				t.Errorf("got %v, want ErrDisconnected wrapping EOF", err)
			}
		})
	}
	wg.Wait()
	if err := wait(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-m.Done():
	default:
		t.Fatal("Done not closed after EOF")
	}
}

func TestEventsDroppedWhenFull(t *testing.T) {
	m, p := connect(t, &Dialer{EventBuffer: 2})
	wait := goPeer(p, func(p *peer) error {
		return p.answer("stop",
			`{"event": "E0"}`, `{"event": "E1"}`, `{"event": "E2"}`, `{"event": "E3"}`, `{"event": "E4"}`,
			`{"return": {}, "id": ID}`)
	})
	if err := m.Stop(testContext(t)); err != nil {
		t.Fatal(err)
	}
	if err := wait(); err != nil {
		t.Fatal(err)
	}
	if got := m.DroppedEvents(); got != 3 {
		t.Errorf("DroppedEvents() = %d, want 3", got)
	}
	for _, want := range []string{"E0", "E1"} {
		if ev := <-m.Events(); ev.Name != want {
			t.Errorf("got event %s, want %s", ev.Name, want)
		}
	}
}

func TestCancel(t *testing.T) {
	t.Run("already cancelled", func(t *testing.T) {
		m, _ := connect(t, &Dialer{})
		ctx, cancel := context.WithCancel(t.Context())
		cancel()
		// The peer reads nothing: a request sent would block forever.
		if err := m.Stop(ctx); !errors.Is(err, context.Canceled) {
			t.Fatalf("got %v, want context.Canceled", err)
		}
	})

	t.Run("waiting for the response", func(t *testing.T) {
		m, p := connect(t, &Dialer{})
		got := make(chan string, 1)
		wait := goPeer(p, func(p *peer) error {
			id, err := p.expect("stop")
			if err != nil {
				return err
			}
			got <- id
			// The late response, then the next command's.
			return p.answer("cont", `{"return": {}, "id": `+id+`}`, `{"return": {}, "id": ID}`)
		})
		ctx, cancel := context.WithCancel(t.Context())
		go func() { <-got; cancel() }()
		if err := m.Stop(ctx); !errors.Is(err, context.Canceled) {
			t.Fatalf("got %v, want context.Canceled", err)
		}
		if err := m.Cont(testContext(t)); err != nil {
			t.Fatalf("command after cancellation: %v", err)
		}
		if err := wait(); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("blocked writing", func(t *testing.T) {
		m, p := connect(t, &Dialer{})
		// net.Pipe is unbuffered, so Write blocks until the peer reads.
		ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
		defer cancel()
		if err := m.Stop(ctx); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("got %v, want deadline exceeded", err)
		}
		// Nothing was sent, so the stream is intact.
		wait := goPeer(p, func(p *peer) error { return p.answer("cont", `{"return": {}, "id": ID}`) })
		if err := m.Cont(testContext(t)); err != nil {
			t.Fatalf("command after cancelled write: %v", err)
		}
		if err := wait(); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("write cut in half", func(t *testing.T) {
		m, p := connect(t, &Dialer{})
		wait := goPeer(p, func(p *peer) error {
			_, err := io.ReadFull(p.conn, make([]byte, 5))
			return err
		})
		ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
		defer cancel()
		if err := m.Stop(ctx); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("got %v, want deadline exceeded", err)
		}
		if err := wait(); err != nil {
			t.Fatal(err)
		}
		// A half-sent request poisons the stream: the Monitor has ended.
		select {
		case <-m.Done():
		case <-time.After(10 * time.Second):
			t.Fatal("Monitor still live after a partial write")
		}
		if err := m.Cont(testContext(t)); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("command after partial write: %v", err)
		}
	})
}

func TestClose(t *testing.T) {
	m, p := connect(t, &Dialer{})
	wait := goPeer(p, func(p *peer) error {
		_, err := p.expect("stop")
		return err
	})
	errc := make(chan error, 1)
	go func() { errc <- m.Stop(context.Background()) }()
	if err := wait(); err != nil {
		t.Fatal(err)
	}
	if err := m.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := <-errc; !errors.Is(err, ErrClosed) {
		t.Errorf("waiting command got %v, want ErrClosed", err)
	}
	if err := m.Cont(context.Background()); !errors.Is(err, ErrClosed) {
		t.Errorf("command after Close got %v, want ErrClosed", err)
	}
	if _, ok := <-m.Events(); ok {
		t.Error("events channel open after Close")
	}
	if !errors.Is(m.Err(), ErrClosed) {
		t.Errorf("Err() = %v, want ErrClosed", m.Err())
	}
	if err := m.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := p.recv(); !errors.Is(err, io.EOF) {
		t.Errorf("peer read after Close: %v, want EOF", err)
	}
}

func TestQuit(t *testing.T) {
	tests := []struct {
		name    string
		script  func(*peer) error
		timeout time.Duration
		check   func(*testing.T, error)
		events  []string
	}{
		{
			name: "return then EOF",
			script: func(p *peer) error {
				p.answer("quit", `{"return": {}, "id": ID}`, `{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}}`)
				return p.conn.Close()
			},
			events: []string{"SHUTDOWN"},
		},
		{
			name: "EOF instead of return",
			script: func(p *peer) error {
				p.expect("quit")
				return p.conn.Close()
			},
		},
		{
			name: "already disconnected",
			script: func(p *peer) error {
				return p.conn.Close()
			},
		},
		{
			name: "QMP error",
			script: func(p *peer) error {
				return p.answer("quit", `{"error": {"class": "GenericError", "desc": "not now"}, "id": ID}`)
			},
			check: func(t *testing.T, err error) {
				var qe *Error
				if !errors.As(err, &qe) {
					t.Fatalf("got %v, want *Error", err)
				}
			},
		},
		{
			name: "return but connection kept open",
			script: func(p *peer) error {
				return p.answer("quit", `{"return": {}, "id": ID}`)
			},
			timeout: 100 * time.Millisecond,
			check:   func(t *testing.T, err error) { wantErr(context.DeadlineExceeded)(t, nil, err) },
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, p := connect(t, &Dialer{})
			wait := goPeer(p, tt.script)
			if tt.name == "already disconnected" {
				<-m.Done()
			}
			ctx := testContext(t)
			if tt.timeout > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, tt.timeout)
				defer cancel()
			}
			err := m.Quit(ctx)
			if tt.check != nil {
				tt.check(t, err)
			} else if err != nil {
				t.Fatalf("Quit: %v", err)
			} else if !errors.Is(m.Err(), ErrDisconnected) {
				t.Errorf("Err() after Quit = %v", m.Err())
			}
			if err := wait(); err != nil {
				t.Fatal(err)
			}
			if len(tt.events) == 0 {
				return
			}
			var got []string
			for ev := range m.Events() {
				got = append(got, ev.Name)
			}
			if !reflect.DeepEqual(got, tt.events) {
				t.Errorf("events %v, want %v", got, tt.events)
			}
		})
	}
}
