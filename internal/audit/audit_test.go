package audit

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func testKey(t testing.TB) ed25519.PrivateKey {
	t.Helper()
	_, priv, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	return priv
}

func pub(priv ed25519.PrivateKey) ed25519.PublicKey { return priv.Public().(ed25519.PublicKey) }

func openLog(t testing.TB, path string) *Log {
	t.Helper()
	l, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// event returns the i-th test event; its VM cycles through three tenants.
func event(i int) Event {
	vm := []string{"vm-a", "vm-b", "vm-c"}[i%3]
	return Event{Host: "host1", Actor: "tenant:" + vm, VM: vm, Op: fmt.Sprintf("op%d", i), Decision: Allowed, Reason: "because"}
}

// newTestLog returns the path of a log of n entries (events 1..n).
func newTestLog(t testing.TB, n int) (string, *Log) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "audit.log")
	l := openLog(t, path)
	for i := 1; i <= n; i++ {
		if _, err := l.Append(event(i)); err != nil {
			t.Fatal(err)
		}
	}
	return path, l
}

func TestRoundTrip(t *testing.T) {
	path, l := newTestLog(t, 0)
	odd := []string{"", "plain", "quote\" backslash\\ newline\n tab\t nul\x00", "bad utf8 \xff\xfe", "unicode é 世界 \u2028", strings.Repeat("x", 5000), "<html>&amp;"}
	var want []Event
	for i, s := range odd {
		e := Event{Time: time.Date(2024, 1, 2, 3, 4, 5, 6, time.FixedZone("x", 3600)), Host: "host1", Actor: s, VM: s, Op: "op", Decision: Refused, Reason: s, Request: s}
		if i == 0 {
			e.Time = time.Time{}
		}
		got, err := l.Append(e)
		if err != nil {
			t.Fatal(err)
		}
		if got.Seq != uint64(i+1) || got.Hash == "" || len(got.Prev) != 64 || got.Time.IsZero() {
			t.Fatalf("append returned %+v", got)
		}
		want = append(want, got)
	}
	evs, err := ReadAll(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(evs) != len(want) {
		t.Fatalf("read %d events, want %d", len(evs), len(want))
	}
	for i, got := range evs {
		w := want[i]
		clean := func(s string) string { return strings.Map(func(r rune) rune { return r }, s) }
		if !got.Time.Equal(w.Time) || got.Seq != w.Seq || got.Prev != w.Prev || got.Hash != w.Hash ||
			got.Actor != clean(w.Actor) || got.VM != clean(w.VM) || got.Reason != clean(w.Reason) || got.Request != clean(w.Request) ||
			got.Op != w.Op || got.Decision != w.Decision || got.Host != w.Host {
			t.Errorf("event %d:\n got %+v\nwant %+v", i+1, got, w)
		}
	}
	ranged, err := l.Events(2, 4)
	if err != nil || len(ranged) != 2 || ranged[0].Seq != 3 || ranged[1].Hash != want[3].Hash {
		t.Fatalf("Events(2, 4) = %d events, %v", len(ranged), err)
	}
	data, _ := os.ReadFile(path)
	for i, line := range bytes.Split(bytes.TrimSuffix(data, []byte("\n")), []byte("\n")) {
		if !bytes.HasPrefix(line, fmt.Appendf(nil, `{"seq":%d,"prev":"%s",`, i+1, want[i].Prev)) {
			t.Fatalf("line %d does not start with the fixed prefix: %.80s", i+1, line)
		}
	}
}

func TestReopenContinuesChain(t *testing.T) {
	path, l := newTestLog(t, 5)
	seq, hash := l.Last()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Append(event(6)); !errors.Is(err, ErrClosed) {
		t.Fatalf("append after close: %v", err)
	}
	l = openLog(t, path)
	if s, h := l.Last(); s != seq || h != hash {
		t.Fatalf("reopened at %d %s, want %d %s", s, h, seq, hash)
	}
	e, err := l.Append(event(6))
	if err != nil {
		t.Fatal(err)
	}
	if e.Seq != 6 || e.Prev != hash {
		t.Fatalf("appended %d after %s, want 6 after %s", e.Seq, e.Prev, hash)
	}
	priv := testKey(t)
	head, err := l.SignHead(priv)
	if err != nil {
		t.Fatal(err)
	}
	if head.Seq != 6 || head.Hash != e.Hash || head.Host != "host1" {
		t.Fatalf("head %+v", head)
	}
	f, _ := os.Open(path)
	defer f.Close()
	rep, err := VerifyLog(f, pub(priv), []Head{head})
	if err != nil || rep.Entries != 6 || rep.Signed != 6 || len(rep.Warnings) != 0 {
		t.Fatalf("verify: %v %+v", err, rep)
	}
}

func TestConcurrentAppends(t *testing.T) {
	const workers, each = 64, 100
	path, l := newTestLog(t, 0)
	var mu sync.Mutex
	got := map[uint64]Event{}
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := range each {
				e, err := l.Append(event(w*each + i))
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				if _, dup := got[e.Seq]; dup {
					t.Errorf("seq %d returned twice", e.Seq)
				}
				got[e.Seq] = e
				mu.Unlock()
				// Durable: the entry is in the file as soon as Append returns.
				if s, _ := l.Last(); s < e.Seq {
					t.Errorf("append %d returned before it was durable (durable %d)", e.Seq, s)
				}
			}
		})
	}
	wg.Wait()
	evs, err := ReadAll(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(evs) != workers*each {
		t.Fatalf("%d events in the log, want %d", len(evs), workers*each)
	}
	for i, e := range evs {
		g := got[uint64(i+1)]
		if e.Seq != uint64(i+1) || e.Hash != g.Hash || e.Op != g.Op {
			t.Fatalf("entry %d is %+v, append returned %+v", i+1, e, g)
		}
	}
}

// lines splits a log file into lines, newlines included.
func lines(data []byte) [][]byte {
	var out [][]byte
	for len(data) > 0 {
		i := bytes.IndexByte(data, '\n')
		if i < 0 {
			out = append(out, data)
			break
		}
		out = append(out, data[:i+1])
		data = data[i+1:]
	}
	return out
}

// forge returns a well-formed entry line with the given seq and prev, and
// its entry hash: what someone without the host key can write.
func forge(seq uint64, prev string, op string) ([]byte, string) {
	var p [hashSize]byte
	hex.Decode(p[:], []byte(prev))
	e := Event{Time: time.Now(), Host: "host1", Actor: "admin:mallory", VM: "vm-a", Op: op, Decision: Allowed}
	body := appendBody(nil, &e, &[16]byte{})
	bh := sha256.Sum256(body)
	h := entryHash(seq, &p, &bh)
	line := appendPrefix(nil, seq, &p)
	line = append(append(line, body...), '\n')
	return line, hex.EncodeToString(h[:])
}

// rechain rewrites ls from index i on so that seq and prev are consistent,
// as an attacker who rewrites the chain would.
func rechain(ls [][]byte, i int) [][]byte {
	prev := "0000000000000000000000000000000000000000000000000000000000000000"
	for j := range ls {
		seq, p, body, err := splitLine(bytes.TrimSuffix(ls[j], []byte("\n")))
		if err != nil {
			panic(err)
		}
		if j >= i {
			seq = uint64(j + 1)
			hex.Decode(p[:], []byte(prev))
			l := appendPrefix(nil, seq, &p)
			ls[j] = append(append(l, body...), '\n')
		}
		bh := sha256.Sum256(body)
		h := entryHash(seq, &p, &bh)
		prev = hex.EncodeToString(h[:])
	}
	return ls
}

func TestTamper(t *testing.T) {
	const n = 10
	priv, other := testKey(t), testKey(t)
	path, l := newTestLog(t, n)
	head10, err := l.SignHead(priv)
	if err != nil {
		t.Fatal(err)
	}
	ev, _ := l.Events(0, n)
	signAt := func(k ed25519.PrivateKey, host string, seq int) Head {
		h := Head{Host: host, Seq: uint64(seq), Hash: ev[seq-1].Hash, Time: time.Now()}
		if err := h.Sign(k); err != nil {
			t.Fatal(err)
		}
		return h
	}
	head4 := signAt(priv, "host1", 4)
	orig, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	alter := func(i int, from, to string) func([][]byte) [][]byte {
		return func(ls [][]byte) [][]byte {
			if !bytes.Contains(ls[i-1], []byte(from)) {
				panic("no " + from)
			}
			ls[i-1] = bytes.Replace(ls[i-1], []byte(from), []byte(to), 1)
			return ls
		}
	}
	for _, tc := range []struct {
		name     string
		edit     func([][]byte) [][]byte
		heads    []Head
		host     string
		strict   bool
		kind     Kind // 0: intact
		seq      uint64
		line     int
		warnKind Kind
		warnSeq  uint64
		detail   string
	}{
		{name: "intact", heads: []Head{head10}},
		{name: "intact, two heads", heads: []Head{head4, head10}},
		{name: "intact, no heads"},
		{name: "alter a field", edit: alter(4, `"op":"op4"`, `"op":"opX"`), heads: []Head{head10}, kind: Altered, seq: 4, line: 4},
		{name: "alter a field, no heads", edit: alter(4, `"decision":"allowed"`, `"decision":"refused"`), kind: Altered, seq: 4, line: 4},
		{name: "alter the first entry", edit: alter(1, `"op":"op1"`, `"op":"opX"`), heads: []Head{head10}, kind: Altered, seq: 1, line: 1},
		{name: "alter the signed last entry", edit: alter(10, `"op":"op10"`, `"op":"opX"`), heads: []Head{head10}, kind: Altered, seq: 10, line: 10},
		{name: "alter the unsigned last entry", edit: alter(10, `"op":"op10"`, `"op":"opX"`), heads: []Head{head4}, warnKind: UnsignedTail, warnSeq: 5},
		{name: "alter a prev field", edit: alter(5, ev[3].Hash, ev[2].Hash), heads: []Head{head10}, kind: Altered, seq: 5, line: 5},
		{name: "alter a prev field after a signed entry", edit: alter(5, ev[3].Hash, ev[2].Hash), heads: []Head{head4, head10}, kind: Altered, seq: 5, line: 5},
		{name: "alter a sequence number", edit: alter(5, `{"seq":5,`, `{"seq":50,`), kind: Altered, seq: 5, line: 5},
		{name: "drop an entry", edit: func(ls [][]byte) [][]byte { return append(ls[:3], ls[4:]...) }, heads: []Head{head10}, kind: Dropped, seq: 4, line: 4},
		{name: "drop the first entry", edit: func(ls [][]byte) [][]byte { return ls[1:] }, kind: Dropped, seq: 1, line: 1},
		{name: "drop three entries", edit: func(ls [][]byte) [][]byte { return append(ls[:3], ls[6:]...) }, kind: Dropped, seq: 4, line: 4, detail: "entries 4 to 6 are missing"},
		{name: "swap two entries", edit: func(ls [][]byte) [][]byte { ls[3], ls[4] = ls[4], ls[3]; return ls }, kind: Reordered, seq: 5, line: 4},
		{name: "swap distant entries", edit: func(ls [][]byte) [][]byte { ls[2], ls[7] = ls[7], ls[2]; return ls }, kind: Reordered, seq: 3, line: 8},
		{name: "move an entry to the end", edit: func(ls [][]byte) [][]byte { return append(append(ls[:2:2], ls[3:]...), ls[2]) }, kind: Reordered, seq: 3, line: 10},
		{name: "insert a forged entry", edit: func(ls [][]byte) [][]byte {
			f, _ := forge(5, ev[3].Hash, "forged")
			return append(ls[:4], append([][]byte{f}, ls[4:]...)...)
		}, heads: []Head{head10}, kind: Forged, seq: 5, line: 5},
		{name: "insert a forged entry after the genuine one", edit: func(ls [][]byte) [][]byte {
			f, _ := forge(5, ev[3].Hash, "forged")
			return append(ls[:5], append([][]byte{f}, ls[5:]...)...)
		}, heads: []Head{head10}, kind: Forged, seq: 5, line: 6},
		{name: "insert a forged entry with a bad prev", edit: func(ls [][]byte) [][]byte {
			f, _ := forge(5, ev[0].Hash, "forged")
			return append(ls[:4], append([][]byte{f}, ls[4:]...)...)
		}, heads: []Head{head10}, kind: Forged, seq: 5, line: 5},
		{name: "insert a forged entry and rewrite the chain", edit: func(ls [][]byte) [][]byte {
			f, _ := forge(5, ev[3].Hash, "forged")
			return rechain(append(ls[:4], append([][]byte{f}, ls[4:]...)...), 4)
		}, heads: []Head{head4, head10}, kind: Forged, seq: 10, line: 10, detail: "rewritten after entry 4"},
		{name: "rewrite the chain without a head", edit: func(ls [][]byte) [][]byte {
			ls[5] = bytes.Replace(ls[5], []byte(`"op":"op6"`), []byte(`"op":"opX"`), 1)
			return rechain(ls, 5)
		}, heads: []Head{head4}, warnKind: UnsignedTail, warnSeq: 5},
		{name: "append a forged tail", edit: func(ls [][]byte) [][]byte {
			f1, h := forge(11, ev[9].Hash, "forged")
			f2, _ := forge(12, h, "forged")
			return append(ls, f1, f2)
		}, heads: []Head{head10}, warnKind: UnsignedTail, warnSeq: 11},
		{name: "append a forged tail, signed heads required", edit: func(ls [][]byte) [][]byte {
			f1, _ := forge(11, ev[9].Hash, "forged")
			return append(ls, f1)
		}, heads: []Head{head10}, strict: true, kind: UnsignedTail, seq: 11},
		{name: "truncate", edit: func(ls [][]byte) [][]byte { return ls[:7] }, heads: []Head{head10}, kind: Truncated, seq: 8},
		{name: "truncate mid-line", edit: func(ls [][]byte) [][]byte { ls[9] = ls[9][:40]; return ls }, heads: []Head{head10}, kind: Truncated, seq: 10, warnKind: TornTail, warnSeq: 10},
		{name: "truncate everything", edit: func(ls [][]byte) [][]byte { return nil }, heads: []Head{head4}, kind: Truncated, seq: 1},
		{name: "truncate past the last head", edit: func(ls [][]byte) [][]byte { return ls[:8] }, heads: []Head{head4}, warnKind: UnsignedTail, warnSeq: 5},
		{name: "garbage line", edit: func(ls [][]byte) [][]byte { ls[6] = []byte("hello\n"); return ls }, kind: Malformed, seq: 7, line: 7},
		{name: "empty line", edit: func(ls [][]byte) [][]byte { ls[6] = []byte("\n"); return ls }, kind: Malformed, seq: 7, line: 7},
		{name: "head signed by another key", heads: []Head{signAt(other, "host1", 10)}, kind: BadHead, seq: 10},
		{name: "head replayed from another host", heads: []Head{signAt(other, "host2", 10)}, host: "host1", kind: BadHead, seq: 10, detail: "replayed"},
		{name: "head with a changed seq", heads: []Head{func() Head { h := head10; h.Seq = 9; return h }()}, kind: BadHead, seq: 9},
		{name: "head with a changed time", heads: []Head{func() Head { h := head10; h.Time = h.Time.Add(time.Second); return h }()}, kind: BadHead, seq: 10},
		{name: "forked heads", heads: []Head{head10, func() Head { h := signAt(priv, "host1", 9); h.Seq = 10; h.Sign(priv); return h }()}, kind: Forked, seq: 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			data := orig
			if tc.edit != nil {
				ls := tc.edit(lines(bytes.Clone(orig)))
				data = bytes.Join(ls, nil)
			}
			v := Verifier{HostKey: pub(priv), Heads: tc.heads, Host: tc.host, RequireSigned: tc.strict}
			rep, err := v.Verify(bytes.NewReader(data))
			if rep == nil {
				t.Fatalf("no report: %v", err)
			}
			if tc.kind == 0 {
				if err != nil {
					t.Fatalf("intact log: %v", err)
				}
			} else {
				var p *Problem
				if !errors.As(err, &p) {
					t.Fatalf("error %v, want a %s problem", err, tc.kind)
				}
				if p.Kind != tc.kind || p.Seq != tc.seq || (tc.line != 0 && p.Line != tc.line) || !strings.Contains(p.Error(), tc.detail) {
					t.Fatalf("problem %q (kind %s seq %d line %d), want kind %s seq %d line %d %q", p, p.Kind, p.Seq, p.Line, tc.kind, tc.seq, tc.line, tc.detail)
				}
				t.Logf("%v", p)
			}
			if tc.warnKind != 0 {
				found := false
				for _, w := range rep.Warnings {
					found = found || w.Kind == tc.warnKind && w.Seq == tc.warnSeq
				}
				if !found {
					t.Fatalf("warnings %v, want %s at %d", rep.Warnings, tc.warnKind, tc.warnSeq)
				}
			} else if len(rep.Warnings) > 0 && tc.heads != nil && tc.kind == 0 {
				t.Fatalf("unexpected warnings %v", rep.Warnings)
			}
		})
	}
}

func TestOpenRefusesTamperedLog(t *testing.T) {
	path, l := newTestLog(t, 5)
	l.Close()
	data, _ := os.ReadFile(path)
	os.WriteFile(path, bytes.Replace(data, []byte(`"op":"op2"`), []byte(`"op":"opX"`), 1), 0o600)
	if _, err := Open(path); err == nil || !strings.Contains(err.Error(), "altered") {
		t.Fatalf("open of a tampered log: %v", err)
	}
}

func TestOpenCutsTornTail(t *testing.T) {
	path, l := newTestLog(t, 5)
	l.Close()
	f, _ := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	f.Write([]byte(`{"seq":6,"prev":"00`))
	f.Close()
	if evs, err := ReadAll(path); err != nil || len(evs) != 5 {
		t.Fatalf("ReadAll with a torn tail: %d events, %v", len(evs), err)
	}
	l = openLog(t, path)
	if e, err := l.Append(event(6)); err != nil || e.Seq != 6 {
		t.Fatalf("append after torn tail: %+v %v", e, err)
	}
	if evs, err := ReadAll(path); err != nil || len(evs) != 6 {
		t.Fatalf("ReadAll: %d events, %v", len(evs), err)
	}
}

type failWriter struct{ writeErr, syncErr error }

func (w failWriter) Write(p []byte) (int, error) {
	if w.writeErr != nil {
		return 0, w.writeErr
	}
	return len(p), nil
}
func (w failWriter) Sync() error { return w.syncErr }

func TestFailClosed(t *testing.T) {
	for _, tc := range []struct {
		name   string
		break_ func(l *Log)
	}{
		{"write error", func(l *Log) {
			l.mu.Lock()
			l.w = failWriter{writeErr: errors.New("no space left on device")}
			l.mu.Unlock()
		}},
		{"sync error", func(l *Log) { l.mu.Lock(); l.w = failWriter{syncErr: errors.New("input/output error")}; l.mu.Unlock() }},
		{"closed file", func(l *Log) { l.f.Close() }},
		{"read-only file", func(l *Log) {
			ro, err := os.Open(l.path)
			if err != nil {
				panic(err)
			}
			l.mu.Lock()
			l.w = ro
			l.mu.Unlock()
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path, l := newTestLog(t, 3)
			tc.break_(l)
			var wg sync.WaitGroup
			for range 8 {
				wg.Go(func() {
					if _, err := l.Append(event(4)); !errors.Is(err, ErrNotWritable) {
						t.Errorf("append to a broken log: %v", err)
					}
				})
			}
			wg.Wait()
			l.mu.Lock()
			l.w = logFile{l.f} // even if the disk comes back, the log stays failed
			l.mu.Unlock()
			if _, err := l.Append(event(5)); !errors.Is(err, ErrNotWritable) {
				t.Fatalf("append after a failure: %v", err)
			}
			if l.Err() == nil {
				t.Fatal("Err() is nil after a failure")
			}
			l.Close()
			l = openLog(t, path)
			if e, err := l.Append(event(4)); err != nil || e.Seq < 4 {
				t.Fatalf("append after reopen: %+v %v", e, err)
			}
			if _, err := ReadAll(path); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestOpenUnwritable(t *testing.T) {
	dir := t.TempDir()
	if _, err := Open(filepath.Join(dir, "missing", "audit.log")); err == nil {
		t.Fatal("opened a log in a missing directory")
	}
	if os.Geteuid() == 0 {
		t.Skip("root can write to read-only directories")
	}
	os.Chmod(dir, 0o500)
	defer os.Chmod(dir, 0o700)
	if _, err := Open(filepath.Join(dir, "audit.log")); err == nil {
		t.Fatal("opened a log in a read-only directory")
	}
}

func TestSegments(t *testing.T) {
	priv := testKey(t)
	_, l := newTestLog(t, 20)
	var seg bytes.Buffer
	h1, err := l.Export(&seg, 0, priv)
	if err != nil {
		t.Fatal(err)
	}
	// The server's copy: verify the first segment from the start.
	server := bytes.Clone(seg.Bytes())
	v := Verifier{HostKey: pub(priv), Host: "host1", Heads: []Head{h1}, RequireSigned: true, NoRedacted: true}
	if _, err := v.Verify(bytes.NewReader(server)); err != nil {
		t.Fatal(err)
	}
	for i := 21; i <= 1500; i++ {
		if _, err := l.Append(event(i)); err != nil {
			t.Fatal(err)
		}
	}
	seg.Reset()
	h2, err := l.Export(&seg, h1.Seq, priv)
	if err != nil {
		t.Fatal(err)
	}
	v.From, v.Heads = Anchor{Seq: h1.Seq, Hash: h1.Hash}, []Head{h2}
	rep, err := v.Verify(bytes.NewReader(seg.Bytes()))
	if err != nil || rep.First != 21 || rep.Last != 1500 || rep.Entries != 1480 {
		t.Fatalf("segment: %v %+v", err, rep)
	}
	v.From.Hash = h2.Hash
	if _, err := v.Verify(bytes.NewReader(seg.Bytes())); err == nil {
		t.Fatal("segment verified from the wrong anchor")
	}
	server = append(server, seg.Bytes()...)
	rep, err = VerifyLog(bytes.NewReader(server), pub(priv), []Head{h1, h2})
	if err != nil || rep.Entries != 1500 || rep.Heads != 2 {
		t.Fatalf("collected log: %v %+v", err, rep)
	}
	// Ranges use the index: entries from the middle of the log.
	for _, r := range [][2]uint64{{1023, 1025}, {1024, 1024}, {0, 1}, {1499, 1500}, {2047, 2049}} {
		evs, err := l.Events(r[0], min(r[1], 1500))
		if err != nil {
			t.Fatal(err)
		}
		for i, e := range evs {
			if e.Seq != r[0]+uint64(i)+1 {
				t.Fatalf("Events(%d, %d)[%d] is entry %d", r[0], r[1], i, e.Seq)
			}
		}
	}
	if _, err := l.Events(0, 1501); err == nil {
		t.Fatal("Events past the end succeeded")
	}
}

func TestRedacted(t *testing.T) {
	priv := testKey(t)
	path, l := newTestLog(t, 30)
	head, err := l.SignHead(priv)
	if err != nil {
		t.Fatal(err)
	}
	mine := func(e Event) bool { return e.VM == "vm-a" }
	var view bytes.Buffer
	if err := l.Redacted(&view, 0, head.Seq, mine); err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(view.Bytes(), []byte("vm-b")) || bytes.Contains(view.Bytes(), []byte("vm-c")) {
		t.Fatal("the view shows other tenants' events")
	}
	// The same view can be made from a collected copy.
	f, _ := os.Open(path)
	var view2 bytes.Buffer
	if err := Redact(&view2, f, mine); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if !bytes.Equal(view.Bytes(), view2.Bytes()) {
		t.Fatal("Redact and Log.Redacted differ")
	}
	var seen []uint64
	v := Verifier{HostKey: pub(priv), Host: "host1", Heads: []Head{head}, RequireSigned: true, Visit: func(e Event) error {
		if e.VM != "vm-a" {
			t.Errorf("visited %s's event", e.VM)
		}
		seen = append(seen, e.Seq)
		return nil
	}}
	rep, err := v.Verify(bytes.NewReader(view.Bytes()))
	if err != nil {
		t.Fatal(err)
	}
	if len(seen) != 10 || rep.Redacted != 20 || rep.Entries != 30 || seen[0] != 3 {
		t.Fatalf("visited %v, report %+v", seen, rep)
	}
	if _, err := (&Verifier{NoRedacted: true}).Verify(bytes.NewReader(view.Bytes())); err == nil {
		t.Fatal("a view verified where full entries are required")
	}
	ls := lines(view.Bytes())
	for _, tc := range []struct {
		name string
		edit func([][]byte) [][]byte
		kind Kind
		seq  uint64
	}{
		{"alter a redacted hash", func(ls [][]byte) [][]byte {
			ls[0] = bytes.Replace(ls[0], []byte(`"redacted":"`), []byte(`"redacted":"0`), 1)
			ls[0] = append(ls[0][:len(ls[0])-4], '"', '}', '\n')
			return ls
		}, Altered, 1},
		{"alter my event before a redacted one", func(ls [][]byte) [][]byte {
			ls[2] = bytes.Replace(ls[2], []byte(`"op":"op3"`), []byte(`"op":"opX"`), 1)
			return ls
		}, Altered, 3},
		{"alter my event and the next stub's prev", func(ls [][]byte) [][]byte {
			ls[2] = bytes.Replace(ls[2], []byte(`"op":"op3"`), []byte(`"op":"opX"`), 1)
			e := entryLine{line: bytes.TrimSuffix(ls[2], []byte("\n"))}
			e.parse()
			old := entryLine{line: bytes.TrimSuffix(lines(view.Bytes())[2], []byte("\n"))}
			old.parse()
			ls[3] = bytes.Replace(ls[3], []byte(hex.EncodeToString(old.hash[:])), []byte(hex.EncodeToString(e.hash[:])), 1)
			return ls
		}, Altered, 4},
		{"drop my event", func(ls [][]byte) [][]byte { return append(ls[:2], ls[3:]...) }, Dropped, 3},
		{"turn my event into a stub", func(ls [][]byte) [][]byte {
			s, _ := stubLine(nil, bytes.TrimSuffix(ls[2], []byte("\n")))
			ls[2] = append(s, '\n')
			return ls
		}, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			data := bytes.Join(tc.edit(lines(bytes.Clone(view.Bytes()))), nil)
			v := Verifier{HostKey: pub(priv), Heads: []Head{head}}
			_, err := v.Verify(bytes.NewReader(data))
			var p *Problem
			if tc.kind == 0 {
				// Documented limit: the one who redacts chooses what to show.
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if !errors.As(err, &p) || p.Kind != tc.kind || p.Seq != tc.seq {
				t.Fatalf("got %v, want %s at %d", err, tc.kind, tc.seq)
			}
		})
	}
	_ = ls
}

func TestHeadSignature(t *testing.T) {
	priv := testKey(t)
	_, l := newTestLog(t, 0)
	h, err := l.SignHead(priv)
	if err != nil {
		t.Fatal(err)
	}
	if h.Seq != 0 || h.Hash != strings.Repeat("0", 64) {
		t.Fatalf("empty log head %+v", h)
	}
	if err := h.Verify(pub(priv)); err != nil {
		t.Fatal(err)
	}
	rep, err := VerifyLog(bytes.NewReader(nil), pub(priv), []Head{h})
	if err != nil || rep.Entries != 0 {
		t.Fatalf("empty log: %v %+v", err, rep)
	}
	h.Host = "host2"
	if err := h.Verify(pub(priv)); err == nil {
		t.Fatal("head with a changed host verified")
	}
	if _, err := VerifyLog(bytes.NewReader(nil), nil, []Head{h}); err == nil {
		t.Fatal("heads verified without a key")
	}
}

func FuzzVerify(f *testing.F) {
	priv := ed25519.NewKeyFromSeed(make([]byte, ed25519.SeedSize))
	var log bytes.Buffer
	prev := strings.Repeat("0", 64)
	var head Head
	for i := 1; i <= 5; i++ {
		line, h := forge(uint64(i), prev, fmt.Sprint("op", i))
		log.Write(line)
		prev = h
		head = Head{Host: "host1", Seq: uint64(i), Hash: h}
	}
	head.Sign(priv)
	f.Add(log.Bytes())
	f.Add([]byte("{\"seq\":1,\"prev\":\"" + strings.Repeat("0", 64) + "\",\"redacted\":\"" + strings.Repeat("a", 64) + "\"}\n"))
	f.Add([]byte("{\"seq\":18446744073709551615,\"prev\":\"\n\n\n"))
	f.Add([]byte("\xff\n{}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		v := Verifier{HostKey: pub(priv), Heads: []Head{head}, Visit: func(Event) error { return nil }}
		rep, err := v.Verify(bytes.NewReader(data))
		if rep == nil {
			t.Fatalf("no report: %v", err)
		}
		if err == nil && rep.Entries > 0 && rep.Last != rep.First+uint64(rep.Entries)-1 {
			t.Fatalf("inconsistent report %+v", rep)
		}
		Redact(&bytes.Buffer{}, bytes.NewReader(data), func(e Event) bool { return e.Op == "op2" })
	})
}

func TestLongLines(t *testing.T) {
	path, l := newTestLog(t, 0)
	for i, n := range []int{10, 200 << 10, 10, 900 << 10, 70 << 10} {
		if _, err := l.Append(Event{Host: "host1", Op: fmt.Sprint(i), Reason: strings.Repeat("r", n)}); err != nil {
			t.Fatal(err)
		}
	}
	evs, err := ReadAll(path)
	if err != nil || len(evs) != 5 || len(evs[3].Reason) != 900<<10 {
		t.Fatalf("%d events, %v", len(evs), err)
	}
	data, _ := os.ReadFile(path)
	long := append(bytes.Repeat([]byte("x"), maxLine+1), '\n')
	rep, err := VerifyLog(bytes.NewReader(append(data, long...)), nil, nil)
	var p *Problem
	if !errors.As(err, &p) || p.Kind != Malformed || p.Seq != 6 || rep.Entries != 5 {
		t.Fatalf("over-long line: %v", err)
	}
}
