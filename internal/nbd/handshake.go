package nbd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
)

// conn is one client connection. The handshake uses br and bw; the
// transmission phase keeps br (the client may pipeline requests right after
// NBD_OPT_GO) and writes replies through w.
type conn struct {
	s   *Server
	nc  net.Conn
	log *slog.Logger
	br  *bufio.Reader
	bw  *bufio.Writer // handshake only

	// Negotiation state.
	noZeroes   bool
	structured bool
	metaAlloc  bool // base:allocation selected by the last SET_META_CONTEXT
}

func newConn(s *Server, nc net.Conn, log *slog.Logger) *conn {
	return &conn{
		s:   s,
		nc:  nc,
		log: log,
		br:  bufio.NewReaderSize(nc, 64<<10),
		bw:  bufio.NewWriterSize(nc, 4<<10),
	}
}

// errOptionAborted ends negotiation after NBD_OPT_ABORT.
var errOptionAborted = errors.New("client sent NBD_OPT_ABORT")

// negotiate runs the fixed-newstyle handshake. It returns the export to
// serve, or (nil, nil) if the client aborted negotiation.
func (c *conn) negotiate() (*export, error) {
	var b [optReplyHdrSize]byte
	binary.BigEndian.PutUint64(b[0:], nbdMagic)
	binary.BigEndian.PutUint64(b[8:], optMagic)
	binary.BigEndian.PutUint16(b[16:], flagFixedNewstyle|flagNoZeroes)
	c.bw.Write(b[:18])
	if err := c.bw.Flush(); err != nil {
		return nil, fmt.Errorf("sending greeting: %w", err)
	}
	if _, err := io.ReadFull(c.br, b[:4]); err != nil {
		return nil, fmt.Errorf("reading client flags: %w", err)
	}
	cf := binary.BigEndian.Uint32(b[:4])
	if cf&^(clientFlagFixedNewstyle|clientFlagNoZeroes) != 0 {
		return nil, fmt.Errorf("unknown client flags %#x", cf)
	}
	if cf&clientFlagFixedNewstyle == 0 {
		// Oldstyle and plain newstyle clients cannot be told about errors.
		return nil, errors.New("client does not support fixed newstyle negotiation")
	}
	c.noZeroes = cf&clientFlagNoZeroes != 0

	for {
		if _, err := io.ReadFull(c.br, b[:optHeaderSize]); err != nil {
			return nil, fmt.Errorf("reading option header: %w", err)
		}
		if m := binary.BigEndian.Uint64(b[0:]); m != optMagic {
			return nil, fmt.Errorf("bad option magic %#x", m)
		}
		opt := binary.BigEndian.Uint32(b[8:])
		n := binary.BigEndian.Uint32(b[12:])
		if n > maxOptionLen {
			if opt == optExportName {
				return nil, fmt.Errorf("NBD_OPT_EXPORT_NAME of %d bytes", n)
			}
			// Skip without buffering so a huge length costs no memory.
			if _, err := io.CopyN(io.Discard, c.br, int64(n)); err != nil {
				return nil, fmt.Errorf("discarding option %d data: %w", opt, err)
			}
			if err := c.optError(opt, repErrTooBig, "option data too long"); err != nil {
				return nil, err
			}
			continue
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(c.br, data); err != nil {
			return nil, fmt.Errorf("reading option %d data: %w", opt, err)
		}
		x, err := c.handleOption(opt, data)
		if errors.Is(err, errOptionAborted) {
			return nil, nil
		}
		if err != nil || x != nil {
			return x, err
		}
	}
}

// handleOption answers one option. A non-nil export means transmission
// starts.
func (c *conn) handleOption(opt uint32, data []byte) (*export, error) {
	switch opt {
	case optExportName:
		name := string(data)
		if !c.s.exportMatches(name) {
			// This option cannot fail politely; the spec says to hang up.
			return nil, fmt.Errorf("NBD_OPT_EXPORT_NAME for unknown export %q", name)
		}
		x, err := c.s.newExport(c.structured, c.metaAlloc)
		if err != nil {
			return nil, err
		}
		var b [10 + exportNameZeroes]byte
		binary.BigEndian.PutUint64(b[0:], x.size)
		binary.BigEndian.PutUint16(b[8:], x.flags)
		n := len(b)
		if c.noZeroes {
			n = 10
		}
		c.bw.Write(b[:n])
		if err := c.bw.Flush(); err != nil {
			return nil, fmt.Errorf("sending export info: %w", err)
		}
		return x, nil

	case optAbort:
		// Best effort: the client may already be gone.
		c.optReply(opt, repAck, nil)
		return nil, errOptionAborted

	case optList:
		if len(data) != 0 {
			return nil, c.optError(opt, repErrInvalid, "NBD_OPT_LIST takes no data")
		}
		p := binary.BigEndian.AppendUint32(nil, uint32(len(c.s.Name)))
		p = append(p, c.s.Name...)
		p = append(p, c.s.Description...)
		if err := c.optReply(opt, repServer, p); err != nil {
			return nil, err
		}
		return nil, c.optReply(opt, repAck, nil)

	case optStartTLS:
		// vmbond serves over a private unix socket; TLS adds nothing there.
		return nil, c.optError(opt, repErrUnsup, "TLS is not supported")

	case optInfo, optGo:
		return c.handleInfo(opt, data)

	case optStructuredReply:
		if len(data) != 0 {
			return nil, c.optError(opt, repErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
		}
		c.structured = true
		return nil, c.optReply(opt, repAck, nil)

	case optListMetaContext, optSetMetaContext:
		return nil, c.handleMeta(opt, data)
	}
	return nil, c.optError(opt, repErrUnsup, fmt.Sprintf("option %d not supported", opt))
}

// handleInfo answers NBD_OPT_INFO and NBD_OPT_GO.
func (c *conn) handleInfo(opt uint32, data []byte) (*export, error) {
	name, reqs, ok := parseInfoRequest(data)
	if !ok {
		return nil, c.optError(opt, repErrInvalid, "malformed NBD_OPT_INFO/GO data")
	}
	if !c.s.exportMatches(name) {
		return nil, c.optError(opt, repErrUnknown, "unknown export")
	}
	x, err := c.s.newExport(c.structured, c.metaAlloc)
	if err != nil {
		c.optError(opt, repErrUnknown, "export unavailable") // best effort
		return nil, err
	}
	var p [14]byte
	binary.BigEndian.PutUint16(p[0:], infoExport)
	binary.BigEndian.PutUint64(p[2:], x.size)
	binary.BigEndian.PutUint16(p[10:], x.flags)
	if err := c.optReply(opt, repInfo, p[:12]); err != nil {
		return nil, err
	}
	// Always advertise size constraints; clients ignore what they did not ask for.
	binary.BigEndian.PutUint16(p[0:], infoBlockSize)
	binary.BigEndian.PutUint32(p[2:], x.minBlock)
	binary.BigEndian.PutUint32(p[6:], max(x.minBlock, preferredBlock))
	binary.BigEndian.PutUint32(p[10:], maxPayload)
	if err := c.optReply(opt, repInfo, p[:14]); err != nil {
		return nil, err
	}
	for _, r := range reqs {
		var text string
		switch r {
		case infoName:
			text = c.s.Name
		case infoDescription:
			if c.s.Description == "" {
				continue
			}
			text = c.s.Description
		default:
			continue
		}
		b := binary.BigEndian.AppendUint16(make([]byte, 0, 2+len(text)), r)
		if err := c.optReply(opt, repInfo, append(b, text...)); err != nil {
			return nil, err
		}
	}
	if err := c.optReply(opt, repAck, nil); err != nil {
		return nil, err
	}
	if opt == optGo {
		return x, nil
	}
	return nil, nil
}

// parseInfoRequest decodes NBD_OPT_INFO/GO data: name length, name, number
// of info requests, requests.
func parseInfoRequest(data []byte) (name string, reqs []uint16, ok bool) {
	if len(data) < 6 {
		return "", nil, false
	}
	nl := binary.BigEndian.Uint32(data)
	if uint64(nl) > uint64(len(data)-6) || nl > maxStringLen {
		return "", nil, false
	}
	name = string(data[4 : 4+nl])
	rest := data[4+nl:]
	nr := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*nr {
		return "", nil, false
	}
	reqs = make([]uint16, nr)
	for i := range reqs {
		reqs[i] = binary.BigEndian.Uint16(rest[2*i:])
	}
	return name, reqs, true
}

// handleMeta answers NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.
// The only context is base:allocation.
func (c *conn) handleMeta(opt uint32, data []byte) error {
	if opt == optSetMetaContext {
		c.metaAlloc = false // SET replaces the selection even when it fails
	}
	if !c.structured {
		return c.optError(opt, repErrInvalid, "negotiate structured replies first")
	}
	name, queries, ok := parseMetaRequest(data)
	if !ok {
		return c.optError(opt, repErrInvalid, "malformed meta context request")
	}
	if !c.s.exportMatches(name) {
		return c.optError(opt, repErrUnknown, "unknown export")
	}
	match := false
	if opt == optListMetaContext && len(queries) == 0 {
		match = true // zero queries lists everything
	}
	for _, q := range queries {
		switch {
		case q == allocationCtx:
			match = true
		case q == "base:" && opt == optListMetaContext:
			match = true // wildcard, for listing only
		case !strings.Contains(q, ":"):
			return c.optError(opt, repErrInvalid, "meta context query lacks a namespace")
		}
		// Unknown namespaces and leaf names are ignored, as required.
	}
	if match {
		p := binary.BigEndian.AppendUint32(nil, allocationCtxID)
		p = append(p, allocationCtx...)
		if err := c.optReply(opt, repMetaContext, p); err != nil {
			return err
		}
		if opt == optSetMetaContext {
			c.metaAlloc = true
		}
	}
	return c.optReply(opt, repAck, nil)
}

// parseMetaRequest decodes meta context option data: export name and
// queries, each prefixed by a 32-bit length.
func parseMetaRequest(data []byte) (name string, queries []string, ok bool) {
	str := func() (string, bool) {
		if len(data) < 4 {
			return "", false
		}
		n := binary.BigEndian.Uint32(data)
		if uint64(n) > uint64(len(data)-4) || n > maxStringLen {
			return "", false
		}
		s := string(data[4 : 4+n])
		data = data[4+n:]
		return s, true
	}
	if name, ok = str(); !ok || len(data) < 4 {
		return "", nil, false
	}
	nq := binary.BigEndian.Uint32(data)
	data = data[4:]
	if uint64(nq) > uint64(len(data)/4) { // each query needs a length
		return "", nil, false
	}
	queries = make([]string, 0, nq)
	for range nq {
		q, ok := str()
		if !ok {
			return "", nil, false
		}
		queries = append(queries, q)
	}
	if len(data) != 0 {
		return "", nil, false
	}
	return name, queries, true
}

// optReply sends one option reply and flushes it.
func (c *conn) optReply(opt, typ uint32, data []byte) error {
	var h [optReplyHdrSize]byte
	binary.BigEndian.PutUint64(h[0:], optReplyMagic)
	binary.BigEndian.PutUint32(h[8:], opt)
	binary.BigEndian.PutUint32(h[12:], typ)
	binary.BigEndian.PutUint32(h[16:], uint32(len(data)))
	c.bw.Write(h[:])
	c.bw.Write(data)
	if err := c.bw.Flush(); err != nil {
		return fmt.Errorf("sending reply to option %d: %w", opt, err)
	}
	return nil
}

// optError sends an error reply with a message for humans.
func (c *conn) optError(opt, typ uint32, msg string) error {
	c.log.Debug("nbd: option refused", "option", opt, "reply", fmt.Sprintf("%#x", typ), "msg", msg)
	return c.optReply(opt, typ, []byte(msg))
}
