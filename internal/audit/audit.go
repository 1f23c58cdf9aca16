// Package audit owns the agent's decision log: an append-only file of JSON
// lines, each entry carrying the SHA-256 of the previous one, so that an
// altered, dropped or reordered entry breaks the chain. The agent refuses to
// act when it cannot write the log.
package audit

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"
)

// Decisions.
const (
	Allowed = "allowed"
	Refused = "refused"
)

// Event is one decision of the agent.
type Event struct {
	Seq      uint64    `json:"seq"`
	Time     time.Time `json:"time"`
	Host     string    `json:"host"`
	Actor    string    `json:"actor"` // "tenant:alice", "admin:bob", "server"
	VM       string    `json:"vm,omitempty"`
	Op       string    `json:"op"`
	Decision string    `json:"decision"`
	Reason   string    `json:"reason,omitempty"`
	Request  string    `json:"request,omitempty"` // hex SHA-256 of the request body
	Prev     string    `json:"prev"`              // hex SHA-256 of the previous entry's line
}

// Log is an open audit log. It is safe for concurrent use.
type Log struct {
	mu   sync.Mutex
	f    *os.File
	seq  uint64
	prev string
}

const genesis = "0000000000000000000000000000000000000000000000000000000000000000"

// Open opens or creates the log at path and checks its chain, so that an agent
// never appends to a log that was tampered with while it was down.
func Open(path string) (*Log, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open audit log %s: %w", path, err)
	}
	events, err := Verify(f)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open audit log %s: %w", path, err)
	}
	l := &Log{f: f, prev: genesis}
	if n := len(events); n > 0 {
		l.seq = events[n-1].Seq
		l.prev = events[n-1].hash
	}
	return l, nil
}

// Append writes e durably and returns it as written (with Seq, Time and Prev
// filled in).
func (l *Log) Append(e Event) (Event, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	e.Seq = l.seq + 1
	if e.Time.IsZero() {
		e.Time = time.Now().UTC()
	}
	e.Prev = l.prev
	line, err := json.Marshal(e)
	if err != nil {
		return e, fmt.Errorf("append audit event: %w", err)
	}
	line = append(line, '\n')
	if _, err := l.f.Write(line); err != nil {
		return e, fmt.Errorf("append audit event: %w", err)
	}
	if err := l.f.Sync(); err != nil {
		return e, fmt.Errorf("append audit event: %w", err)
	}
	l.seq = e.Seq
	l.prev = lineHash(line)
	return e, nil
}

// Close closes the log file.
func (l *Log) Close() error { return l.f.Close() }

// Path returns the file name of the log.
func (l *Log) Path() string { return l.f.Name() }

type verified struct {
	Event
	hash string
}

func lineHash(line []byte) string {
	h := sha256.Sum256(bytes.TrimRight(line, "\n"))
	return hex.EncodeToString(h[:])
}

// Verify reads a whole log from the start and checks its chain. It returns the
// events, or an error naming the first entry that breaks the chain.
func Verify(r io.ReadSeeker) ([]verified, error) {
	if _, err := r.Seek(0, io.SeekStart); err != nil {
		return nil, err
	}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	prev, seq := genesis, uint64(0)
	var out []verified
	for line := 1; sc.Scan(); line++ {
		var e Event
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			return nil, fmt.Errorf("entry at line %d is not valid JSON: %w", line, err)
		}
		if e.Prev != prev {
			return nil, fmt.Errorf("entry %d (line %d) does not chain to the entry before it: altered, dropped or reordered", e.Seq, line)
		}
		if e.Seq != seq+1 {
			return nil, fmt.Errorf("entry at line %d has sequence %d, want %d", line, e.Seq, seq+1)
		}
		seq, prev = e.Seq, lineHash(sc.Bytes())
		out = append(out, verified{Event: e, hash: prev})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read audit log: %w", err)
	}
	if _, err := r.Seek(0, io.SeekEnd); err != nil {
		return nil, err
	}
	return out, nil
}

// ReadAll returns every event of the log at path after checking its chain.
func ReadAll(path string) ([]Event, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read audit log %s: %w", path, err)
	}
	defer f.Close()
	vs, err := Verify(f)
	if err != nil {
		return nil, fmt.Errorf("read audit log %s: %w", path, err)
	}
	out := make([]Event, len(vs))
	for i, v := range vs {
		out[i] = v.Event
	}
	return out, nil
}

// ErrNotWritable is returned through the agent when the log cannot be written.
var ErrNotWritable = errors.New("audit log not writable: refusing to act")
