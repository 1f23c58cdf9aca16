package audit

import (
	"bytes"
	"fmt"
	"io"
	"runtime"
	"sync"
)

// chunkSize is how much of a log is read, split and hashed at a time. It is
// larger than maxLine so that every complete line fits in one chunk.
const chunkSize = 4 << 20

// parallelMin is the number of lines below which a chunk is parsed on the
// calling goroutine.
const parallelMin = 512

// lineReader splits a log into lines, chunk by chunk, and parses and hashes
// the lines of each chunk in parallel. It holds at most a chunk and a partial
// line at a time.
type lineReader struct {
	r       io.Reader
	rest    []byte // start of a line continued in the next chunk
	off     int64  // offset in the input of rest
	num     int    // lines read so far
	eof     bool
	torn    []byte // an incomplete last line (no newline), once at EOF
	noHash  bool   // only parse the chain fields (lookahead after a problem)
	workers int

	// Buffers reused from chunk to chunk: the lines returned by next are
	// valid until the next call, the bytes of a line for two more calls.
	bufs  [3][]byte
	nbuf  int
	size  int // of the next chunk
	lines []entryLine
}

func newLineReader(r io.Reader) *lineReader {
	return &lineReader{r: r, workers: runtime.GOMAXPROCS(0)}
}

var errLineTooLong = fmt.Errorf("not an audit entry: line longer than %d bytes", maxLine)

// next returns the lines of the next chunk, or nil at the end of the input.
// A line longer than maxLine is returned as an entryLine with err set, after
// which the reader stops. The returned slice is reused by the next call; the
// bytes of its lines stay valid for two more calls.
func (lr *lineReader) next() ([]entryLine, error) {
	for !lr.eof {
		// Chunks start small, so that a short input costs little, and
		// double up to chunkSize; a chunk is always larger than the partial
		// line carried into it.
		lr.size = min(max(2*lr.size, 64<<10), chunkSize)
		lr.nbuf = (lr.nbuf + 1) % len(lr.bufs)
		if len(lr.bufs[lr.nbuf]) < lr.size {
			lr.bufs[lr.nbuf] = make([]byte, lr.size)
		}
		buf := lr.bufs[lr.nbuf][:lr.size]
		n := copy(buf, lr.rest)
		m, err := io.ReadFull(lr.r, buf[n:])
		n += m
		switch {
		case err == io.EOF || err == io.ErrUnexpectedEOF:
			lr.eof = true
		case err != nil:
			return nil, fmt.Errorf("read audit log: %w", err)
		}
		buf = buf[:n]
		end := bytes.LastIndexByte(buf, '\n') + 1
		if end == 0 && (lr.eof || n > maxLine) || end > 0 && !lr.eof && n-end > maxLine {
			if len(buf) == 0 {
				return nil, nil
			}
			if lr.eof && n <= maxLine {
				lr.torn = buf
				lr.rest = nil
				return nil, nil
			}
			lr.eof = true
			lr.rest = nil
			return []entryLine{{num: lr.num + 1, off: lr.off, err: errLineTooLong}}, nil
		}
		lines := lr.split(buf[:end])
		lr.rest = buf[end:]
		if lr.eof && len(lr.rest) > 0 {
			lr.torn, lr.rest = lr.rest, nil
		}
		if len(lines) > 0 {
			return lines, nil
		}
	}
	return nil, nil
}

// split cuts chunk (which ends with a newline) into parsed lines.
func (lr *lineReader) split(chunk []byte) []entryLine {
	lines := lr.lines[:0]
	for len(chunk) > 0 {
		i := bytes.IndexByte(chunk, '\n')
		lr.num++
		lines = append(lines, entryLine{line: chunk[:i], num: lr.num, off: lr.off})
		lr.off += int64(i + 1)
		chunk = chunk[i+1:]
	}
	parse := func(ls []entryLine) {
		for i := range ls {
			if lr.noHash {
				ls[i].seq, ls[i].prev, _, ls[i].err = splitLine(ls[i].line)
			} else {
				ls[i].parse()
			}
		}
	}
	lr.lines = lines
	if lr.workers <= 1 || len(lines) < parallelMin || lr.noHash {
		parse(lines)
		return lines
	}
	var wg sync.WaitGroup
	per := (len(lines) + lr.workers - 1) / lr.workers
	for lo := 0; lo < len(lines); lo += per {
		part := lines[lo:min(lo+per, len(lines))]
		wg.Go(func() { parse(part) })
	}
	wg.Wait()
	return lines
}

// cursor walks the lines of a lineReader one at a time, with lookahead. The
// bytes of the current line and the next stay valid until advance.
type cursor struct {
	lr    *lineReader
	q     []entryLine
	spare []entryLine
	i     int
	err   error // read error
}

// peek returns the k-th line from the current one, or nil past the end.
func (c *cursor) peek(k int) *entryLine {
	for c.i+k >= len(c.q) {
		if c.err != nil {
			return nil
		}
		more, err := c.lr.next()
		if err != nil {
			c.err = err
			return nil
		}
		if more == nil {
			return nil
		}
		q := append(c.spare[:0], c.q[c.i:]...)
		c.spare = c.q
		c.q = append(q, more...)
		c.i = 0
	}
	return &c.q[c.i+k]
}

func (c *cursor) advance() { c.i++ }

// find looks ahead, from the line after the current one, for a line whose
// sequence number is in [lo, hi], without hashing. It consumes the input and
// the bytes of the lines it passes may be reused: use only the parsed fields
// of the current line and of the result.
func (c *cursor) find(lo, hi uint64) *entryLine {
	c.lr.noHash = true
	for k := 1; ; k++ {
		e := c.peek(k)
		if e == nil {
			return nil
		}
		if e.err == nil && e.seq >= lo && e.seq <= hi {
			return e
		}
		if k >= 1024 {
			// Forget the lines already looked at, to bound memory.
			c.i += k
			k = 0
		}
	}
}
