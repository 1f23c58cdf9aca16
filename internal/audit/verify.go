package audit

import (
	"bytes"
	"crypto/ed25519"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
)

// A Kind says how an entry, or a head, is wrong.
type Kind int

const (
	// Altered: the entry's content changed after it was written: its hash no
	// longer matches the next entry's prev field or the signed head at its
	// sequence number.
	Altered Kind = iota + 1
	// Dropped: entries are missing (a gap in sequence numbers).
	Dropped
	// Reordered: an entry is out of sequence order.
	Reordered
	// Forged: an entry was inserted, or the chain rewritten, by someone
	// without the host key: a signed head does not match, or two entries
	// claim the same place in the chain.
	Forged
	// Truncated: the log ends before the last entry a signed head covers.
	Truncated
	// Malformed: a line is not an audit entry, or is redacted where full
	// entries are required.
	Malformed
	// BadHead: a head's signature is not the host's, or it is for another
	// host (a forged or replayed head).
	BadHead
	// Forked: two heads validly signed by the host key disagree about an
	// entry; the host key signed two histories.
	Forked
	// UnsignedTail: entries past the last signed head. A warning unless
	// Verifier.RequireSigned: anyone with write access to the log could have
	// appended them.
	UnsignedTail
	// TornTail: the input ends with an incomplete line (an append in
	// progress, or a crash during one). It is ignored; a warning.
	TornTail
)

var kindNames = [...]string{
	Altered:      "altered",
	Dropped:      "dropped",
	Reordered:    "reordered",
	Forged:       "forged",
	Truncated:    "truncated",
	Malformed:    "malformed",
	BadHead:      "bad head",
	Forked:       "forked",
	UnsignedTail: "unsigned tail",
	TornTail:     "torn tail",
}

func (k Kind) String() string {
	if k > 0 && int(k) < len(kindNames) {
		return kindNames[k]
	}
	return fmt.Sprintf("Kind(%d)", int(k))
}

// A Problem names an entry (or head) that is wrong and how.
type Problem struct {
	Kind   Kind
	Seq    uint64 // the entry's sequence number (for BadHead and Forked, the head's)
	Line   int    // 1-based line number in the input, 0 if none
	Detail string
}

func (p *Problem) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "audit entry %d", p.Seq)
	if p.Kind == BadHead || p.Kind == Forked {
		fmt.Fprintf(&b, " head")
	}
	if p.Line > 0 {
		fmt.Fprintf(&b, " (line %d)", p.Line)
	}
	fmt.Fprintf(&b, ": %s", p.Kind)
	if p.Detail != "" {
		fmt.Fprintf(&b, ": %s", p.Detail)
	}
	return b.String()
}

// A Report is the result of verifying a log or a segment of one.
type Report struct {
	Entries  int    // entries read and chained (redacted ones included)
	Redacted int    // of which redacted
	First    uint64 // sequence number of the first entry, 0 if none
	Last     uint64 // sequence number of the last chained entry (the anchor's if none)
	LastHash string // its entry hash, hex
	Signed   uint64 // highest sequence number confirmed by a valid signed head
	Heads    int    // valid heads that were matched against an entry

	// Problems lists what is wrong, the first bad entry first; empty if the
	// log is intact. Chain checking stops at the first bad entry: what
	// follows it is not verified.
	Problems []Problem
	// Warnings lists what does not make the log wrong but limits what was
	// proved: an unsigned tail, a torn last line.
	Warnings []Problem
}

// Err returns the first problem, as a *Problem, or nil if there is none.
func (r *Report) Err() error {
	if len(r.Problems) == 0 {
		return nil
	}
	return &r.Problems[0]
}

// An Anchor is a verified point in a chain: entry Seq has entry hash Hash
// (hex). The zero Anchor is the start of a log.
type Anchor struct {
	Seq  uint64
	Hash string
}

// A Verifier checks a log, a segment of one or a redacted view of one. The
// zero Verifier checks the chain of a whole log without heads.
type Verifier struct {
	// HostKey is the host's Ed25519 signing key; required if Heads is set.
	HostKey ed25519.PublicKey
	// Host, if set, is the host the log belongs to; heads for any other host
	// are reported as BadHead (replayed).
	Host string
	// Heads are signed heads to check the chain against, in any order.
	Heads []Head
	// From is where the input continues a chain: its first entry must be
	// From.Seq+1 and chain to From.Hash. The zero value is the start of a log.
	From Anchor
	// RequireSigned makes entries past the last signed head a problem rather
	// than a warning.
	RequireSigned bool
	// NoRedacted makes redacted entries a problem (for a host's own log).
	NoRedacted bool
	// Visit, if set, is called for each full (not redacted) entry in order,
	// decoded, with Seq, Prev and Hash set. It is called as the entry is read,
	// before the rest of the input is checked: trust what it saw only if
	// Verify returns no error. An error from Visit stops verification and is
	// returned.
	Visit func(Event) error

	// entry, if set, sees every chained line (used by Open).
	entry func(*entryLine)
}

// VerifyLog checks a whole log against heads signed by hostKey. It returns a
// Report and, if the log is not intact, the first Problem as the error.
func VerifyLog(r io.Reader, hostKey ed25519.PublicKey, heads []Head) (*Report, error) {
	v := Verifier{HostKey: hostKey, Heads: heads}
	return v.Verify(r)
}

// Verify reads the whole input and checks it: every line must be an entry
// (full or redacted) with the next sequence number whose prev field is the
// entry hash of the one before, and every valid head must match the entry at
// its sequence number. The returned error is a read error, an error from
// Visit, or the first Problem; the Report is returned in every case but a
// bad configuration.
func (v *Verifier) Verify(r io.Reader) (*Report, error) {
	var from [hashSize]byte
	if v.From.Hash != "" {
		if b, err := hex.DecodeString(v.From.Hash); err != nil || len(b) != hashSize {
			return nil, fmt.Errorf("verify audit log: anchor hash %q is not %d hex bytes", v.From.Hash, hashSize)
		} else {
			copy(from[:], b)
		}
	} else if v.From.Seq != 0 {
		return nil, errors.New("verify audit log: anchor without a hash")
	}
	if len(v.Heads) > 0 && len(v.HostKey) != ed25519.PublicKeySize {
		return nil, errors.New("verify audit log: heads given without a valid host key")
	}
	rep := &Report{Last: v.From.Seq, LastHash: hex.EncodeToString(from[:])}
	heads := v.checkHeads(rep)

	c := &cursor{lr: newLineReader(r)}
	s := state{v: v, rep: rep, c: c, expect: v.From.Seq + 1, prev: from}
	for len(heads) > 0 && heads[0].seq <= v.From.Seq {
		if heads[0].seq == v.From.Seq && heads[0].hash != from {
			rep.Problems = append(rep.Problems, Problem{Kind: Forged, Seq: v.From.Seq,
				Detail: "the anchor the input continues from does not match the signed head at its sequence number"})
		}
		heads = heads[1:]
	}
	err := s.run(heads)
	if err == nil && c.err != nil {
		err = c.err
	}
	if err != nil {
		return rep, err
	}
	return rep, rep.Err()
}

// validHead is a head whose signature checked, decoded.
type validHead struct {
	seq  uint64
	hash [hashSize]byte
}

// checkHeads verifies the heads' signatures and hosts, reports the bad ones
// and returns the good ones sorted by sequence number, without duplicates.
func (v *Verifier) checkHeads(rep *Report) []validHead {
	var good []validHead
	for i := range v.Heads {
		h := &v.Heads[i]
		if v.Host != "" && h.Host != v.Host {
			rep.Problems = append(rep.Problems, Problem{Kind: BadHead, Seq: h.Seq,
				Detail: fmt.Sprintf("head is for host %q, not %q (replayed from another host)", h.Host, v.Host)})
			continue
		}
		if err := h.Verify(v.HostKey); err != nil {
			rep.Problems = append(rep.Problems, Problem{Kind: BadHead, Seq: h.Seq, Detail: err.Error()})
			continue
		}
		var g validHead
		g.seq = h.Seq
		hex.Decode(g.hash[:], []byte(h.Hash))
		good = append(good, g)
	}
	slices.SortFunc(good, func(a, b validHead) int {
		if a.seq != b.seq {
			return cmpUint(a.seq, b.seq)
		}
		return bytes.Compare(a.hash[:], b.hash[:])
	})
	good = slices.Compact(good)
	out := good[:0]
	for i, g := range good {
		if i > 0 && good[i-1].seq == g.seq {
			rep.Problems = append(rep.Problems, Problem{Kind: Forked, Seq: g.seq,
				Detail: "two heads validly signed by the host key give different hashes for this entry"})
			continue
		}
		out = append(out, g)
	}
	return out
}

func cmpUint(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// state is the sequential part of verification.
type state struct {
	v      *Verifier
	rep    *Report
	c      *cursor
	expect uint64         // next sequence number
	prev   [hashSize]byte // hash of the last chained entry (or the anchor)
	last   *entryLine     // last chained entry, nil at the anchor
	lastPP [hashSize]byte // prev field of the last chained entry
}

func (s *state) problem(k Kind, seq uint64, line int, format string, args ...any) {
	s.rep.Problems = append(s.rep.Problems, Problem{Kind: k, Seq: seq, Line: line, Detail: fmt.Sprintf(format, args...)})
}

func (s *state) run(heads []validHead) error {
	var last entryLine
	for {
		e := s.c.peek(0)
		if e == nil {
			break
		}
		if e.err != nil {
			s.problem(Malformed, s.expect, e.num, "%v", e.err)
			return nil
		}
		if e.seq != s.expect || e.prev != s.prev {
			s.classify(e)
			return nil
		}
		if e.redacted && s.v.NoRedacted {
			s.problem(Malformed, e.seq, e.num, "redacted entry where full entries are required")
			return nil
		}
		for len(heads) > 0 && heads[0].seq == e.seq {
			if heads[0].hash != e.hash {
				since := "since the start"
				if s.rep.Heads > 0 {
					since = fmt.Sprintf("after entry %d, the last one a signed head confirms", s.rep.Signed)
				}
				if n := s.c.peek(1); n != nil && n.err == nil && n.prev == e.hash {
					s.problem(Forged, e.seq, e.num, "does not match the signed head at its sequence number, yet the entries after it chain to it: the chain was rewritten %s", since)
				} else {
					s.problem(Altered, e.seq, e.num, "does not match the signed head at its sequence number: altered or replaced (or the chain before it rewritten %s)", since)
				}
				return nil
			}
			s.rep.Signed = e.seq
			s.rep.Heads++
			heads = heads[1:]
		}
		if s.rep.Entries == 0 {
			s.rep.First = e.seq
		}
		s.rep.Entries++
		if e.redacted {
			s.rep.Redacted++
		} else if s.v.Visit != nil {
			ev, err := decodeEvent(e)
			if err != nil {
				s.problem(Malformed, e.seq, e.num, "%v", err)
				return nil
			}
			if err := s.v.Visit(ev); err != nil {
				return err
			}
		}
		if s.v.entry != nil {
			s.v.entry(e)
		}
		last = *e
		s.last = &last
		s.lastPP = e.prev
		s.prev = e.hash
		s.expect++
		s.c.advance()
	}
	if s.c.err != nil {
		return nil
	}
	lastSeq := s.expect - 1
	s.rep.Last = lastSeq
	s.rep.LastHash = hex.EncodeToString(s.prev[:])
	if torn := s.c.lr.torn; len(torn) > 0 {
		s.rep.Warnings = append(s.rep.Warnings, Problem{Kind: TornTail, Seq: s.expect, Line: s.c.lr.num + 1,
			Detail: fmt.Sprintf("the input ends with an incomplete line of %d bytes (an append in progress or a torn write); ignored", len(torn))})
	}
	if len(heads) > 0 {
		h := heads[len(heads)-1]
		s.problem(Truncated, s.expect, 0, "the log ends at entry %d but a signed head covers entry %d: %s dropped", lastSeq, h.seq, span(s.expect, h.seq, "was", "were"))
		return nil
	}
	if signed := max(s.rep.Signed, s.v.From.Seq); lastSeq > signed && (len(s.v.Heads) > 0 || s.v.RequireSigned) {
		p := Problem{Kind: UnsignedTail, Seq: signed + 1,
			Detail: fmt.Sprintf("%s past the last signed head: nothing proves the host wrote them", span(signed+1, lastSeq, "is", "are"))}
		if s.v.RequireSigned {
			s.rep.Problems = append(s.rep.Problems, p)
		} else {
			s.rep.Warnings = append(s.rep.Warnings, p)
		}
	}
	return nil
}

// classify names the entry that breaks the chain at e, which either does not
// have the expected sequence number or does not chain to the entry before it.
func (s *state) classify(e *entryLine) {
	last := s.last
	lastSigned := last != nil && s.rep.Signed == last.seq && s.rep.Heads > 0
	switch {
	case e.seq == s.expect: // sequence is right, link is broken
		n := s.c.peek(1)
		switch {
		case last == nil && s.v.From.Seq == 0:
			s.problem(Altered, e.seq, e.num, "the first entry does not start a chain: its prev field is not the all-zero hash")
		case last == nil:
			s.problem(Altered, e.seq, e.num, "does not continue the chain from entry %d: its prev field is not that entry's hash", s.v.From.Seq)
		case n != nil && n.err == nil && n.seq == e.seq && n.prev == s.prev:
			s.problem(Forged, e.seq, e.num, "an entry was inserted here: the next line is entry %d again and chains to entry %d", n.seq, last.seq)
		case lastSigned:
			s.problem(Altered, e.seq, e.num, "its prev field is not the hash of entry %d, which a signed head confirms", last.seq)
		case n != nil && n.err == nil && n.seq == e.seq+1 && n.prev != e.hash:
			s.problem(Altered, e.seq, e.num, "neither its prev field nor its hash match the entries around it")
		default:
			s.problem(Altered, last.seq, last.num, "its hash no longer matches the prev field of entry %d (line %d)", e.seq, e.num)
		}
	case e.prev == s.prev: // chains correctly but has the wrong number
		s.problem(Altered, s.expect, e.num, "chains to entry %d but its sequence number was changed to %d", s.expect-1, e.seq)
	case e.seq > s.expect:
		if n := s.c.peek(1); n != nil && n.err == nil && n.seq == s.expect {
			s.problem(Reordered, e.seq, e.num, "appears before entry %d (line %d)", n.seq, n.num)
			return
		}
		num := e.num
		if f := s.c.find(s.expect, s.expect); f != nil {
			s.problem(Reordered, f.seq, f.num, "out of order: expected at line %d, before entry %d", num, e.seq)
			return
		}
		s.problem(Dropped, s.expect, num, "%s missing: entry %d follows entry %d", span(s.expect, e.seq-1, "is", "are"), e.seq, s.expect-1)
	case last != nil && e.seq == last.seq && e.prev == s.lastPP:
		// Two entries claim the same place; the one the chain continues
		// from is genuine.
		n := s.c.peek(1)
		if !lastSigned && n != nil && n.err == nil && n.prev == e.hash {
			s.problem(Forged, last.seq, last.num, "an entry was inserted here: the next line is entry %d again and the chain continues from it", e.seq)
		} else {
			s.problem(Forged, e.seq, e.num, "an entry was inserted here: it repeats entry %d (line %d), which the chain continues from", last.seq, last.num)
		}
	default:
		prev := "the start"
		if last != nil {
			prev = fmt.Sprintf("entry %d", last.seq)
		}
		s.problem(Reordered, e.seq, e.num, "appears after %s", prev)
	}
}

// span describes the entries from a to b with the verb that follows.
func span(a, b uint64, one, many string) string {
	if a == b {
		return fmt.Sprintf("entry %d %s", a, one)
	}
	return fmt.Sprintf("entries %d to %d %s", a, b, many)
}

// decodeEvent decodes a full entry line.
func decodeEvent(e *entryLine) (Event, error) {
	var ev Event
	if err := json.Unmarshal(e.line, &ev); err != nil {
		return ev, fmt.Errorf("entry is not valid JSON: %w", err)
	}
	if ev.Seq != e.seq {
		return ev, errors.New("entry has two sequence numbers")
	}
	ev.Hash = hex.EncodeToString(e.hash[:])
	return ev, nil
}

// ReadAll returns every event of the log at path after checking its chain
// (without heads). An incomplete last line, an append in progress, is
// ignored.
func ReadAll(path string) ([]Event, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read audit log %s: %w", path, err)
	}
	defer f.Close()
	var out []Event
	v := Verifier{NoRedacted: true, Visit: func(e Event) error {
		out = append(out, e)
		return nil
	}}
	if _, err := v.Verify(f); err != nil {
		return nil, fmt.Errorf("read audit log %s: %w", path, err)
	}
	return out, nil
}
