package qmp

import (
	"bytes"
	"context"
	"errors"
	"net"
	"testing"
	"time"
)

var fuzzSeeds = []string{
	greeting,
	`{"return": {}, "id": 1}`,
	`{"return": {"status": "running", "singlestep": false, "running": true}, "id": 18446744073709551615}`,
	`{"error": {"class": "GenericError", "desc": "x"}, "id": 2}`,
	`{"error": null, "id": 2}`,
	`{"timestamp": {"seconds": 1700000000, "microseconds": 1}, "event": "STOP"}`,
	`{"event": "BLOCK_IO_ERROR", "data": {"device": "d0"}, "timestamp": null}`,
	`{"event": ""}`,
	`{"QMP": null}`,
	`{"return": {}, "error": {}}`,
	`{"id": "1", "return": [1, 2, {"a": null}]}`,
	`[]`, `null`, `"QMP"`, `{`, `{"return": {}, "id": -1}`,
}

// FuzzDecodeReply feeds arbitrary lines to the decoder of QEMU's messages.
func FuzzDecodeReply(f *testing.F) {
	for _, s := range fuzzSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		r, err := decodeReply(line)
		if err != nil {
			if !errors.Is(err, ErrProtocol) {
				t.Fatalf("error %v does not wrap ErrProtocol", err)
			}
			return
		}
		switch r.kind {
		case kindGreeting:
		case kindReturn:
			if r.ret == nil || r.err != nil {
				t.Fatalf("return without value or with error: %+v", r)
			}
			var v any
			r.decode(&v)
		case kindError:
			if r.err == nil {
				t.Fatalf("error response without error: %+v", r)
			}
			if r.decode(nil) == nil {
				t.Fatal("error response decodes to success")
			}
		case kindEvent:
			if r.event.Name == "" {
				t.Fatal("event without a name")
			}
		default:
			t.Fatalf("no kind: %+v", r)
		}
	})
}

// streamConn is a net.Conn whose peer sends a fixed byte stream and then
// EOF, and ignores what it receives.
type streamConn struct {
	net.Conn // nil; unused methods
	r        *bytes.Reader
}

func (c *streamConn) Read(p []byte) (int, error)       { return c.r.Read(p) }
func (c *streamConn) Write(p []byte) (int, error)      { return len(p), nil }
func (c *streamConn) Close() error                     { return nil }
func (c *streamConn) SetWriteDeadline(time.Time) error { return nil }
func (c *streamConn) SetReadDeadline(time.Time) error  { return nil }
func (c *streamConn) SetDeadline(time.Time) error      { return nil }

// FuzzMonitorStream runs a whole session against an arbitrary byte stream
// from QEMU: whatever it holds, every call returns once the stream ends.
func FuzzMonitorStream(f *testing.F) {
	f.Add([]byte(greeting + "\r\n" + `{"return": {}, "id": 1}` + "\r\n" + `{"event": "STOP"}` + "\r\n" + `{"return": {"status": "paused", "running": false}, "id": 2}` + "\r\n"))
	f.Add([]byte(greeting + "\n" + `{"error": {"class": "GenericError", "desc": "no"}, "id": 1}`))
	f.Add([]byte(greeting + "\n\n\n" + `{"return": {}, "id": 1}` + "\n" + greeting))
	f.Add([]byte("{\"QMP\": {}}\n" + string(bytes.Repeat([]byte("x"), 1<<16))))
	f.Fuzz(func(t *testing.T, stream []byte) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		d := Dialer{EventBuffer: 1}
		m, err := d.NewMonitor(ctx, &streamConn{r: bytes.NewReader(stream)})
		if errors.Is(err, context.DeadlineExceeded) {
			t.Fatal("handshake hung")
		}
		if err != nil {
			return
		}
		_, err = m.Status(ctx)
		if errors.Is(err, context.DeadlineExceeded) {
			t.Fatal("command hung")
		}
		select {
		case <-m.Done():
		case <-ctx.Done():
			t.Fatal("Monitor outlived its stream")
		}
		if m.Err() == nil {
			t.Fatal("ended Monitor has no error")
		}
		for range m.Events() {
		}
		m.Close()
	})
}
