// Package audit owns the agent's decision log: every decision the agent
// makes, allowed or refused, is appended to a hash-chained, append-only file
// before the agent acts on it, and the agent signs the chain's head with its
// host key so that the server and tenants can check the log end to end.
//
// # Line format
//
// The log is a file of lines, each ending in a newline. A line is a JSON
// object whose first two members are always, byte for byte,
//
//	{"seq":N,"prev":"<64 lowercase hex>",
//
// where N is the entry's sequence number (decimal, no leading zeros, 1 for
// the first entry) and prev is the entry hash of entry N-1 (all zeros for
// entry 1). The rest of the line, from the byte after that comma to the
// closing brace included, is the body. A full entry's body holds the event:
//
//	"time":"<RFC 3339>","host":"…","actor":"…","vm":"…","op":"…","decision":"…","reason":"…","request":"…","salt":"<32 hex>"}
//
// (vm, reason and request are omitted when empty; salt is 16 random bytes).
// A redacted entry's body is only the SHA-256 of the full entry's body:
//
//	"redacted":"<64 hex>"}
//
// The entry hash of entry N is
//
//	SHA-256("vmbond-audit-v1\n" || uint64be(N) || prev || SHA-256(body))
//
// with prev as 32 raw bytes and, for a redacted entry, the given body hash in
// place of SHA-256(body). Because the hash covers seq and prev directly, a
// redacted entry proves what it chains to without revealing its event, and
// the salt keeps its body hash from being matched against guessed events.
// The chain fields can be found without decoding JSON, which is what makes
// verification fast: lines are hashed in parallel, then linked in order.
//
// # Heads, segments and views
//
// A Head is the host's Ed25519 signature over (host, seq, entry hash of seq,
// time); see Log.SignHead. A verifier (Verifier, VerifyLog) checks the chain
// and every head and names the first entry that was altered, dropped,
// reordered or forged; entries past the last signed head are reported as an
// unsigned tail. The server collects a log in segments (Log.Export: the
// entries after a sequence number and a head signed at the last of them; a
// segment is verified with Verifier.From set to the last entry the server
// already has). A tenant gets a view (Log.Redacted, Redact) in which other
// tenants' entries are redacted and verifies it like a full log.
//
// # Durability
//
// Append returns only when the entry is on disk: concurrent appends are
// written and synced together (group commit). After a failed write or sync
// the Log fails closed: every later Append returns an error wrapping
// ErrNotWritable, and the agent refuses to act, until the log is reopened.
package audit

import (
	"bufio"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
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
	Prev     string    `json:"prev"`              // hex entry hash of the previous entry
	Hash     string    `json:"-"`                 // hex entry hash of this entry
}

// ErrNotWritable is returned (wrapped) by Append when the log cannot be
// written: the caller must refuse the action.
var ErrNotWritable = errors.New("audit log not writable: refusing to act")

// ErrClosed is returned (wrapped) by methods of a closed Log.
var ErrClosed = errors.New("audit log closed")

// indexStride is the distance in sequence numbers between the entries whose
// file offsets a Log remembers, to find ranges without reading from the start.
const indexStride = 1024

// gatherWait bounds how long the flusher waits for appenders to join a
// batch much smaller than the last one.
const gatherWait = 200 * time.Microsecond

// syncWriter is what a Log writes to: its file, or a failing one in tests.
type syncWriter interface {
	io.Writer
	Sync() error
}

// logFile is a log's file, synced with fdatasync where there is one.
type logFile struct{ *os.File }

func (f logFile) Sync() error { return dataSync(f.File) }

// Log is an open audit log. It is safe for concurrent use.
type Log struct {
	path    string
	f       *os.File
	w       syncWriter
	wake    chan struct{} // to the flusher: there is something to write
	stopped chan struct{} // closed when the flusher has exited

	mu     sync.Mutex
	seq    uint64         // last assigned sequence number
	prev   [hashSize]byte // its entry hash
	cur    *batch         // entries waiting for the flusher
	spare  []byte         // a written batch's buffer, for reuse
	err    error          // sticky write failure
	closed bool

	// The durable end of the log, under mu.
	dSeq  uint64
	dHash [hashSize]byte
	dHost string
	dSize int64
	index []int64 // index[i] is the offset of entry i*indexStride+1
}

// batch is a group of entries written and synced together.
type batch struct {
	buf   []byte
	n     int // entries
	last  uint64
	hash  [hashSize]byte
	host  string
	marks []int64 // offsets in buf of entries that go in the index
	done  chan struct{}
	err   error
}

func newBatch(buf []byte) *batch {
	return &batch{buf: buf[:0], done: make(chan struct{})}
}

// Open opens or creates the log at path and checks its chain, so that an
// agent never appends to a log that was tampered with while it was down. An
// incomplete last line (a crash during an append, never acknowledged) is cut
// off.
func Open(path string) (*Log, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open audit log %s: %w", path, err)
	}
	l, err := open(path, f)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open audit log %s: %w", path, err)
	}
	go l.flush()
	return l, nil
}

func open(path string, f *os.File) (*Log, error) {
	l := &Log{path: path, f: f, w: logFile{f}, wake: make(chan struct{}, 1), stopped: make(chan struct{}), cur: newBatch(nil)}
	var lastOff int64
	v := Verifier{NoRedacted: true, entry: func(e *entryLine) {
		if (e.seq-1)%indexStride == 0 {
			l.index = append(l.index, e.off)
		}
		lastOff = e.off
		l.dSize = e.off + int64(len(e.line)) + 1
	}}
	rep, err := v.Verify(f)
	if err != nil {
		return nil, err
	}
	if len(rep.Warnings) > 0 { // a torn last line
		if err := f.Truncate(l.dSize); err != nil {
			return nil, fmt.Errorf("cut off incomplete last line: %w", err)
		}
		if err := f.Sync(); err != nil {
			return nil, fmt.Errorf("cut off incomplete last line: %w", err)
		}
	}
	if rep.Entries > 0 {
		line := make([]byte, l.dSize-lastOff)
		if _, err := f.ReadAt(line, lastOff); err != nil {
			return nil, fmt.Errorf("read entry %d: %w", rep.Last, err)
		}
		ev, err := decodeLine(line)
		if err != nil {
			return nil, fmt.Errorf("entry %d: %w", rep.Last, err)
		}
		l.dHost = ev.Host
	}
	l.dSeq = rep.Last
	hex.Decode(l.dHash[:], []byte(rep.LastHash))
	l.seq, l.prev = l.dSeq, l.dHash
	return l, nil
}

// Append writes e durably and returns it as written, with Seq, Time (if it
// was zero), Prev and Hash filled in. Concurrent calls are written together.
// If the log cannot be written the error wraps ErrNotWritable and the Log
// stays failed.
func (l *Log) Append(e Event) (Event, error) {
	if e.Time.IsZero() {
		e.Time = time.Now()
	}
	e.Time = e.Time.Round(0).UTC()
	var salt [16]byte
	rand.Read(salt[:])
	var tmp [512]byte
	body := appendBody(tmp[:0], &e, &salt)
	bodyHash := sha256.Sum256(body)

	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return e, fmt.Errorf("append audit event: %w: %w", ErrNotWritable, ErrClosed)
	}
	if l.err != nil {
		err := l.err
		l.mu.Unlock()
		return e, fmt.Errorf("append audit event: %w", err)
	}
	e.Seq = l.seq + 1
	prev := l.prev
	hash := entryHash(e.Seq, &prev, &bodyHash)
	b := l.cur
	if (e.Seq-1)%indexStride == 0 {
		b.marks = append(b.marks, int64(len(b.buf)))
	}
	b.buf = appendPrefix(b.buf, e.Seq, &prev)
	b.buf = append(b.buf, body...)
	b.buf = append(b.buf, '\n')
	b.last, b.hash, b.host = e.Seq, hash, e.Host
	b.n++
	l.seq, l.prev = e.Seq, hash
	l.mu.Unlock()
	select {
	case l.wake <- struct{}{}:
	default:
	}

	e.Prev = hex.EncodeToString(prev[:])
	e.Hash = hex.EncodeToString(hash[:])
	<-b.done
	if b.err != nil {
		return e, fmt.Errorf("append audit event %d: %w", e.Seq, b.err)
	}
	return e, nil
}

// flush writes and syncs batches until the Log is closed and drained.
func (l *Log) flush() {
	defer close(l.stopped)
	last := 0 // entries in the last batch
	for {
		l.mu.Lock()
		for len(l.cur.buf) == 0 {
			if l.closed {
				l.mu.Unlock()
				return
			}
			l.mu.Unlock()
			<-l.wake
			l.mu.Lock()
		}
		// The appenders of the last batch were just released and are
		// likely to append again: give them a moment to join this batch
		// rather than syncing a handful of entries and making the rest
		// wait a whole sync.
		for deadline := time.Now().Add(gatherWait); l.cur.n < last/2 && !l.closed && time.Now().Before(deadline); {
			l.mu.Unlock()
			runtime.Gosched()
			l.mu.Lock()
		}
		b := l.cur
		last = b.n
		l.cur = newBatch(l.spare)
		l.spare = nil
		err := l.err
		base := l.dSize
		l.mu.Unlock()

		if err == nil {
			if _, werr := l.w.Write(b.buf); werr != nil {
				err = werr
			} else if serr := l.w.Sync(); serr != nil {
				err = serr
			}
			if err != nil {
				err = fmt.Errorf("%w: %s: %w", ErrNotWritable, l.path, err)
			}
		}

		l.mu.Lock()
		if err != nil {
			l.err = err
		} else {
			l.dSeq, l.dHash, l.dHost = b.last, b.hash, b.host
			for _, m := range b.marks {
				l.index = append(l.index, base+m)
			}
			l.dSize = base + int64(len(b.buf))
		}
		if cap(b.buf) <= 4<<20 {
			l.spare = b.buf
		}
		l.mu.Unlock()
		b.err = err
		close(b.done)
	}
}

// Err returns the write failure that made the log fail closed, or nil.
func (l *Log) Err() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.err
}

// Close waits for pending appends and closes the log file. Later appends
// fail.
func (l *Log) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	l.mu.Unlock()
	select {
	case l.wake <- struct{}{}:
	default:
	}
	<-l.stopped
	if err := l.f.Close(); err != nil {
		return fmt.Errorf("close audit log %s: %w", l.path, err)
	}
	return nil
}

// Path returns the file name of the log.
func (l *Log) Path() string { return l.path }

// Last returns the sequence number and entry hash (hex) of the last durable
// entry; 0 and the all-zero hash for an empty log.
func (l *Log) Last() (seq uint64, hash string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.dSeq, hex.EncodeToString(l.dHash[:])
}

// SignHead signs the head of the log, its last durable entry, with the host
// signing key. The head's host is the Host of that entry.
func (l *Log) SignHead(priv ed25519.PrivateKey) (Head, error) {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return Head{}, fmt.Errorf("sign audit head: %w", ErrClosed)
	}
	h := Head{Host: l.dHost, Seq: l.dSeq, Hash: hex.EncodeToString(l.dHash[:]), Time: time.Now().Round(0).UTC()}
	l.mu.Unlock()
	if err := h.Sign(priv); err != nil {
		return Head{}, err
	}
	return h, nil
}

// Export writes to w the entries after seq after, as they are in the file,
// and returns a head signed at the last of them: a segment the server
// appends to its copy of the log after verifying it with
// Verifier{From: <its last entry>, Heads: []Head{head}}.
func (l *Log) Export(w io.Writer, after uint64, priv ed25519.PrivateKey) (Head, error) {
	h, err := l.SignHead(priv)
	if err != nil {
		return Head{}, err
	}
	if _, err := l.WriteRange(w, after, h.Seq); err != nil {
		return Head{}, err
	}
	return h, nil
}

// WriteRange writes to w the lines of the entries with after < seq <=
// through, unchanged, and returns how many it wrote.
func (l *Log) WriteRange(w io.Writer, after, through uint64) (int, error) {
	n := 0
	err := l.scan(after, through, func(line []byte) error {
		n++
		_, err := w.Write(line)
		return err
	})
	if err != nil {
		return n, fmt.Errorf("export audit entries %d to %d: %w", after+1, through, err)
	}
	return n, nil
}

// Events returns the decoded events with after < seq <= through.
func (l *Log) Events(after, through uint64) ([]Event, error) {
	var out []Event
	err := l.scan(after, through, func(line []byte) error {
		ev, err := decodeLine(line)
		out = append(out, ev)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("read audit entries %d to %d: %w", after+1, through, err)
	}
	return out, nil
}

// Redacted writes to w a view of the entries with after < seq <= through in
// which the entries for which keep returns false are redacted (see the
// package documentation). The view verifies like the log; pair it with a
// head from SignHead taken first, with through set to the head's Seq.
func (l *Log) Redacted(w io.Writer, after, through uint64, keep func(Event) bool) error {
	var buf []byte
	err := l.scan(after, through, func(line []byte) error {
		var err error
		if buf, err = redactLine(buf[:0], line, keep); err != nil {
			return err
		}
		_, err = w.Write(buf)
		return err
	})
	if err != nil {
		return fmt.Errorf("redact audit entries %d to %d: %w", after+1, through, err)
	}
	return nil
}

// Redact copies a log or segment from r to w, redacting the entries for
// which keep returns false. It does not verify the input.
func Redact(w io.Writer, r io.Reader, keep func(Event) bool) error {
	br := bufio.NewReaderSize(r, 64<<10)
	var buf []byte
	for {
		line, err := readLine(br)
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return fmt.Errorf("redact audit log: %w", err)
		}
		if buf, err = redactLine(buf[:0], line, keep); err != nil {
			return fmt.Errorf("redact audit log: %w", err)
		}
		if _, err := w.Write(buf); err != nil {
			return fmt.Errorf("redact audit log: %w", err)
		}
	}
}

// redactLine appends line (with its newline) to b, or its redacted form if
// keep does not want its event.
func redactLine(b, line []byte, keep func(Event) bool) ([]byte, error) {
	body := line[:len(line)-1]
	if _, _, rest, err := splitLine(body); err != nil {
		return b, err
	} else if isStub(rest) {
		return append(b, line...), nil
	}
	ev, err := decodeLine(line)
	if err != nil {
		return b, err
	}
	if keep(ev) {
		return append(b, line...), nil
	}
	b, err = stubLine(b, body)
	return append(b, '\n'), err
}

// decodeLine decodes a full entry line (newline included).
func decodeLine(line []byte) (Event, error) {
	e := entryLine{line: line[:len(line)-1]}
	e.parse()
	if e.err != nil {
		return Event{}, e.err
	}
	if e.redacted {
		return Event{}, fmt.Errorf("entry %d is redacted", e.seq)
	}
	return decodeEvent(&e)
}

// readLine reads one newline-terminated line of at most maxLine bytes.
func readLine(br *bufio.Reader) ([]byte, error) {
	var line []byte
	for {
		frag, err := br.ReadSlice('\n')
		line = append(line, frag...)
		if len(line) > maxLine+1 {
			return nil, errLineTooLong
		}
		switch {
		case err == nil:
			return line, nil
		case err == bufio.ErrBufferFull:
			continue
		case err == io.EOF && len(line) > 0:
			return nil, io.ErrUnexpectedEOF
		default:
			return nil, err
		}
	}
}

// scan calls fn with each durable line (newline included) of the entries with
// after < seq <= through, in order. fn must not keep the line.
func (l *Log) scan(after, through uint64, fn func(line []byte) error) error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return ErrClosed
	}
	size, last := l.dSize, l.dSeq
	var off int64
	if k := after / indexStride; k < uint64(len(l.index)) {
		off = l.index[k]
	}
	l.mu.Unlock()
	if through > last {
		return fmt.Errorf("only %d entries are on disk", last)
	}
	if after >= through {
		return nil
	}
	br := bufio.NewReaderSize(io.NewSectionReader(l.f, off, size-off), 64<<10)
	for {
		line, err := readLine(br)
		if err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return err
		}
		seq, _, _, err := splitLine(line[:len(line)-1])
		if err != nil {
			return err
		}
		if seq > through {
			return nil
		}
		if seq > after {
			if err := fn(line); err != nil {
				return err
			}
			if seq == through {
				return nil
			}
		}
	}
}
