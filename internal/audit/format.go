package audit

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"time"
	"unicode/utf8"
)

// hashSize is the size of an entry hash (SHA-256).
const hashSize = sha256.Size

// maxLine bounds the length of one line, so that a hostile log cannot make a
// reader buffer without limit.
const maxLine = 1 << 20

// entryDomain separates entry hashes from every other use of SHA-256.
const entryDomain = "vmbond-audit-v1\n"

// Line prefixes. Every line starts with linePrefix, the decimal sequence
// number, prevField, 64 lowercase hex digits and `",`.
const (
	linePrefix    = `{"seq":`
	prevField     = `,"prev":"`
	redactedField = `"redacted":"`
)

var errBadPrefix = errors.New("not an audit entry: line does not start with {\"seq\":N,\"prev\":\"<64 hex>\",")

// entryHash is the hash that the next entry's prev field and signed heads
// refer to. It covers the sequence number, the previous hash and the hash of
// the rest of the line (the body), so that a redacted entry, which shows only
// seq, prev and the body hash, still proves what it chains to.
func entryHash(seq uint64, prev, body *[hashSize]byte) [hashSize]byte {
	var buf [len(entryDomain) + 8 + 2*hashSize]byte
	n := copy(buf[:], entryDomain)
	binary.BigEndian.PutUint64(buf[n:], seq)
	n += 8
	n += copy(buf[n:], prev[:])
	copy(buf[n:], body[:])
	return sha256.Sum256(buf[:])
}

// appendPrefix appends `{"seq":N,"prev":"<hex>",` to b.
func appendPrefix(b []byte, seq uint64, prev *[hashSize]byte) []byte {
	b = append(b, linePrefix...)
	b = appendUint(b, seq)
	b = append(b, prevField...)
	b = hex.AppendEncode(b, prev[:])
	return append(b, '"', ',')
}

func appendUint(b []byte, v uint64) []byte {
	var d [20]byte
	i := len(d)
	for {
		i--
		d[i] = byte('0' + v%10)
		v /= 10
		if v == 0 {
			break
		}
	}
	return append(b, d[i:]...)
}

// appendBody appends the body of e (everything after the prefix, closing
// brace included) to b. Field order is fixed; salt is random and makes the
// body hash of a redacted entry useless for guessing its content.
func appendBody(b []byte, e *Event, salt *[16]byte) []byte {
	b = append(b, `"time":"`...)
	b = e.Time.UTC().AppendFormat(b, time.RFC3339Nano)
	b = append(b, `","host":`...)
	b = appendString(b, e.Host)
	b = append(b, `,"actor":`...)
	b = appendString(b, e.Actor)
	if e.VM != "" {
		b = append(b, `,"vm":`...)
		b = appendString(b, e.VM)
	}
	b = append(b, `,"op":`...)
	b = appendString(b, e.Op)
	b = append(b, `,"decision":`...)
	b = appendString(b, e.Decision)
	if e.Reason != "" {
		b = append(b, `,"reason":`...)
		b = appendString(b, e.Reason)
	}
	if e.Request != "" {
		b = append(b, `,"request":`...)
		b = appendString(b, e.Request)
	}
	b = append(b, `,"salt":"`...)
	b = hex.AppendEncode(b, salt[:])
	return append(b, '"', '}')
}

// appendString appends s as a JSON string. Control characters (so never a
// newline), quotes and backslashes are escaped and invalid UTF-8 becomes
// U+FFFD, as encoding/json does.
func appendString(b []byte, s string) []byte {
	const hexDigits = "0123456789abcdef"
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i++
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hexDigits[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}

// entryLine is one parsed line: the chain fields found without a JSON
// decode, and the hashes computed from the line.
type entryLine struct {
	line     []byte // without the newline
	num      int    // 1-based line number in the input
	off      int64  // offset of the line in the input
	err      error  // the line is not an entry
	seq      uint64
	prev     [hashSize]byte
	hash     [hashSize]byte // entry hash
	redacted bool           // a redacted stub: body hash given, not computed
}

// parseLine fills in the chain fields of l.line and computes its hash.
func (l *entryLine) parse() {
	seq, prev, body, err := splitLine(l.line)
	if err != nil {
		l.err = err
		return
	}
	l.seq = seq
	l.prev = prev
	var bh [hashSize]byte
	if isStub(body) {
		decodeHex(bh[:], body[len(redactedField):len(redactedField)+2*hashSize])
		l.redacted = true
	} else {
		bh = sha256.Sum256(body)
	}
	l.hash = entryHash(seq, &l.prev, &bh)
}

// splitLine parses the fixed prefix of line and returns the chain fields and
// the body (the rest of the line).
func splitLine(line []byte) (seq uint64, prev [hashSize]byte, body []byte, err error) {
	if !bytes.HasPrefix(line, []byte(linePrefix)) {
		return 0, prev, nil, errBadPrefix
	}
	p := line[len(linePrefix):]
	i := 0
	for ; i < len(p) && i < 20 && p[i] >= '0' && p[i] <= '9'; i++ {
		d := uint64(p[i] - '0')
		if seq > (1<<64-1-d)/10 {
			return 0, prev, nil, errors.New("not an audit entry: sequence number overflows")
		}
		seq = seq*10 + d
	}
	if i == 0 || (p[0] == '0' && i > 1) {
		return 0, prev, nil, errBadPrefix
	}
	p = p[i:]
	if !bytes.HasPrefix(p, []byte(prevField)) {
		return 0, prev, nil, errBadPrefix
	}
	p = p[len(prevField):]
	if len(p) < 2*hashSize+2 || p[2*hashSize] != '"' || p[2*hashSize+1] != ',' || !decodeHex(prev[:], p[:2*hashSize]) {
		return 0, prev, nil, errBadPrefix
	}
	body = p[2*hashSize+2:]
	if len(body) == 0 || body[len(body)-1] != '}' {
		return 0, prev, nil, errors.New("not an audit entry: line does not end with }")
	}
	return seq, prev, body, nil
}

// isStub reports whether body is that of a redacted entry:
// `"redacted":"<64 hex>"}`.
func isStub(body []byte) bool {
	return len(body) == len(redactedField)+2*hashSize+2 &&
		bytes.HasPrefix(body, []byte(redactedField)) &&
		lowerHex(body[len(redactedField):len(redactedField)+2*hashSize]) &&
		body[len(body)-2] == '"' && body[len(body)-1] == '}'
}

// lowerHex reports whether b is lowercase hex digits only.
func lowerHex(b []byte) bool {
	for _, c := range b {
		if hexValue(c) > 0xf {
			return false
		}
	}
	return true
}

// hexValue returns the value of a lowercase hex digit, or 0xff.
func hexValue(c byte) byte { return hexTable[c] }

// hexTable maps lowercase hex digits to their values and other bytes to 0xff.
const hexTable = "\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x0a\x0b\x0c\x0d\x0e\x0f\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"

// decodeHex decodes len(dst)*2 lowercase hex digits from src into dst.
func decodeHex(dst, src []byte) bool {
	var bad byte
	for i := range dst {
		hi, lo := hexValue(src[2*i]), hexValue(src[2*i+1])
		bad |= hi | lo
		dst[i] = hi<<4 | lo&0xf
	}
	return bad <= 0xf
}

// stubLine returns the redacted form of a full entry line.
func stubLine(b []byte, line []byte) ([]byte, error) {
	seq, prev, body, err := splitLine(line)
	if err != nil {
		return b, err
	}
	var bh [hashSize]byte
	if isStub(body) {
		return append(b, line...), nil
	}
	bh = sha256.Sum256(body)
	b = appendPrefix(b, seq, &prev)
	b = append(b, redactedField...)
	b = hex.AppendEncode(b, bh[:])
	return append(b, '"', '}'), nil
}
