package nbd

import (
	"bytes"
	"encoding/binary"
	"testing"
	"time"
)

func TestHandshake(t *testing.T) {
	const size = 1 << 20
	tests := []struct {
		name    string
		backend Backend
		srv     func(*Server)
		run     func(t *testing.T, c *client)
	}{
		{
			name: "refuses client without fixed newstyle",
			run: func(t *testing.T, c *client) {
				c.greet(0)
				c.expectClosed()
			},
		},
		{
			name: "refuses unknown client flags",
			run: func(t *testing.T, c *client) {
				c.greet(clientFlagFixedNewstyle | 1<<7)
				c.expectClosed()
			},
		},
		{
			name: "export name with zeroes",
			run: func(t *testing.T, c *client) {
				c.greet(clientFlagFixedNewstyle)
				c.sendOpt(optExportName, []byte("disk"))
				b := c.readFull(10 + exportNameZeroes)
				if got := binary.BigEndian.Uint64(b); got != size {
					t.Errorf("size = %d", got)
				}
				if !bytes.Equal(b[10:], make([]byte, exportNameZeroes)) {
					t.Errorf("padding not zero")
				}
				c.structured = false
				if errno := c.do(cmdFlush, 0, 0, 0); errno != 0 {
					t.Errorf("flush errno %d", errno)
				}
			},
		},
		{
			name: "export name without zeroes, default export",
			run: func(t *testing.T, c *client) {
				c.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
				c.sendOpt(optExportName, nil)
				b := c.readFull(10)
				if f := binary.BigEndian.Uint16(b[8:]); f&tflagHasFlags == 0 || f&tflagSendDF != 0 {
					t.Errorf("flags %#x: want HAS_FLAGS, no DF without structured replies", f)
				}
				if errno := c.do(cmdFlush, 0, 0, 0); errno != 0 {
					t.Errorf("flush errno %d", errno)
				}
			},
		},
		{
			name: "export name unknown hangs up",
			run: func(t *testing.T, c *client) {
				c.greet(clientFlagFixedNewstyle)
				c.sendOpt(optExportName, []byte("nope"))
				c.expectClosed()
			},
		},
		{
			name: "info then go",
			srv:  func(s *Server) { s.Description = "test disk" },
			run: func(t *testing.T, c *client) {
				c.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
				got := c.info(optInfo, "disk", infoName, infoDescription, infoBlockSize, 99)
				bs := got[infoBlockSize]
				if len(bs) != 12 || binary.BigEndian.Uint32(bs) != 1 ||
					binary.BigEndian.Uint32(bs[4:]) != 4096 || binary.BigEndian.Uint32(bs[8:]) != 32<<20 {
					t.Errorf("block size info % x", bs)
				}
				if string(got[infoName]) != "disk" || string(got[infoDescription]) != "test disk" {
					t.Errorf("name %q description %q", got[infoName], got[infoDescription])
				}
				if c.size != size {
					t.Errorf("size %d", c.size)
				}
				c.info(optGo, "disk")
				if errno := c.do(cmdFlush, 0, 0, 0); errno != 0 {
					t.Errorf("flush errno %d", errno)
				}
			},
		},
		{
			name: "go unknown export then retry",
			run: func(t *testing.T, c *client) {
				c.greet(clientFlagFixedNewstyle)
				c.sendOpt(optGo, infoData("other"))
				c.expectReply(optGo, repErrUnknown)
				c.info(optGo, "")
				if errno := c.do(cmdFlush, 0, 0, 0); errno != 0 {
					t.Errorf("flush errno %d", errno)
				}
			},
		},
		{
			name: "malformed info requests",
			run: func(t *testing.T, c *client) {
				c.greet(clientFlagFixedNewstyle)
				for _, d := range [][]byte{
					nil,
					{0, 0, 0, 9, 'd', 0, 0},  // name longer than data
					{0, 0, 0, 0, 0, 2, 0, 1}, // 2 requests, 1 present
					{0, 0, 0, 0, 0, 0, 7},    // trailing byte
					{0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0}, // huge name length
				} {
					c.sendOpt(optInfo, d)
					c.expectReply(optInfo, repErrInvalid)
				}
			},
		},
		{
			name: "list",
			srv:  func(s *Server) { s.Description = "d" },
			run: func(t *testing.T, c *client) {
				c.greet(clientFlagFixedNewstyle)
				c.sendOpt(optList, nil)
				r := c.expectReply(optList, repServer)
				if want := append([]byte{0, 0, 0, 4}, "diskd"...); !bytes.Equal(r.data, want) {
					t.Errorf("server reply %q, want %q", r.data, want)
				}
				c.expectReply(optList, repAck)
				c.sendOpt(optList, []byte{1})
				c.expectReply(optList, repErrInvalid)
			},
		},
		{
			name: "abort",
			run: func(t *testing.T, c *client) {
				c.greet(clientFlagFixedNewstyle)
				c.sendOpt(optAbort, nil)
				c.expectReply(optAbort, repAck)
				c.expectClosed()
			},
		},
		{
			name: "unsupported options",
			run: func(t *testing.T, c *client) {
				c.greet(clientFlagFixedNewstyle)
				for _, o := range []uint32{optStartTLS, 4, 11, 99, 1 << 31} {
					c.sendOpt(o, []byte("junk"))
					c.expectReply(o, repErrUnsup)
				}
				c.info(optGo, "")
			},
		},
		{
			name: "oversized option is skipped",
			run: func(t *testing.T, c *client) {
				c.greet(clientFlagFixedNewstyle)
				c.sendOpt(optInfo, make([]byte, maxOptionLen+1))
				c.expectReply(optInfo, repErrTooBig)
				c.info(optGo, "")
			},
		},
		{
			name: "oversized export name hangs up",
			run: func(t *testing.T, c *client) {
				c.greet(clientFlagFixedNewstyle)
				c.sendOpt(optExportName, make([]byte, maxOptionLen+1))
				c.expectClosed()
			},
		},
		{
			name: "bad option magic hangs up",
			run: func(t *testing.T, c *client) {
				c.greet(clientFlagFixedNewstyle)
				c.write(make([]byte, 16))
				c.expectClosed()
			},
		},
		{
			name: "structured reply with data",
			run: func(t *testing.T, c *client) {
				c.greet(clientFlagFixedNewstyle)
				c.sendOpt(optStructuredReply, []byte{1})
				c.expectReply(optStructuredReply, repErrInvalid)
				c.info(optGo, "")
				if c.flags&tflagSendDF != 0 {
					t.Errorf("DF advertised without structured replies")
				}
			},
		},
		{
			name: "meta context",
			run: func(t *testing.T, c *client) {
				c.greet(clientFlagFixedNewstyle)
				c.sendOpt(optSetMetaContext, metaData("", allocationCtx))
				c.expectReply(optSetMetaContext, repErrInvalid) // structured replies first
				c.sendOpt(optStructuredReply, nil)
				c.expectReply(optStructuredReply, repAck)

				want := append(binary.BigEndian.AppendUint32(nil, allocationCtxID), allocationCtx...)
				for _, q := range [][]string{nil, {"base:"}, {allocationCtx}, {"qemu:dirty-bitmap:x", allocationCtx}} {
					c.sendOpt(optListMetaContext, metaData("disk", q...))
					if r := c.expectReply(optListMetaContext, repMetaContext); !bytes.Equal(r.data, want) {
						t.Errorf("list %q: %q", q, r.data)
					}
					c.expectReply(optListMetaContext, repAck)
				}
				for _, q := range [][]string{{"base:"}, {"base:nope"}, {"x-foo:bar"}, nil} {
					c.sendOpt(optSetMetaContext, metaData("", q...))
					c.expectReply(optSetMetaContext, repAck) // selects nothing
				}
				c.sendOpt(optSetMetaContext, metaData("", "nocolon"))
				c.expectReply(optSetMetaContext, repErrInvalid)
				c.sendOpt(optSetMetaContext, metaData("other", allocationCtx))
				c.expectReply(optSetMetaContext, repErrUnknown)
				c.sendOpt(optSetMetaContext, []byte{0, 0, 0, 0, 0, 0, 0, 5}) // 5 queries, none sent
				c.expectReply(optSetMetaContext, repErrInvalid)
				c.sendOpt(optSetMetaContext, metaData("", allocationCtx))
				c.expectReply(optSetMetaContext, repMetaContext)
				c.expectReply(optSetMetaContext, repAck)
				c.info(optGo, "disk")
				c.structured = true
				if errno := c.do(cmdBlockStatus, 0, 0, 4096); errno != 0 {
					t.Errorf("block status errno %d", errno)
				}
			},
		},
		{
			name: "block status needs a selected context",
			run: func(t *testing.T, c *client) {
				c.greet(clientFlagFixedNewstyle)
				c.sendOpt(optStructuredReply, nil)
				c.expectReply(optStructuredReply, repAck)
				c.sendOpt(optSetMetaContext, metaData("", allocationCtx))
				c.expectReply(optSetMetaContext, repMetaContext)
				c.expectReply(optSetMetaContext, repAck)
				c.sendOpt(optSetMetaContext, metaData("", "base:")) // replaces the selection
				c.expectReply(optSetMetaContext, repAck)
				c.info(optGo, "")
				c.structured = true
				if errno := c.do(cmdBlockStatus, 0, 0, 4096); errno != errInval {
					t.Errorf("block status errno %d, want EINVAL", errno)
				}
			},
		},
		{
			name:    "transmission flags, read-only",
			backend: newSparse(size),
			srv:     func(s *Server) { s.ReadOnly = true },
			run: func(t *testing.T, c *client) {
				c.greet(clientFlagFixedNewstyle)
				c.info(optGo, "")
				want := uint16(tflagHasFlags | tflagReadOnly | tflagSendFlush | tflagCanMultiConn)
				if c.flags != want {
					t.Errorf("flags %#x, want %#x", c.flags, want)
				}
			},
		},
		{
			name:    "transmission flags, full backend, structured",
			backend: newSparse(size),
			run: func(t *testing.T, c *client) {
				c.greet(clientFlagFixedNewstyle)
				c.sendOpt(optStructuredReply, nil)
				c.expectReply(optStructuredReply, repAck)
				c.info(optGo, "")
				want := uint16(tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim | tflagSendWriteZeroes |
					tflagSendDF | tflagCanMultiConn | tflagSendFastZero)
				if c.flags != want {
					t.Errorf("flags %#x, want %#x", c.flags, want)
				}
			},
		},
		{
			name: "transmission flags, plain backend",
			run: func(t *testing.T, c *client) {
				c.greet(clientFlagFixedNewstyle)
				c.info(optGo, "")
				want := uint16(tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendWriteZeroes |
					tflagCanMultiConn | tflagSendFastZero)
				if c.flags != want {
					t.Errorf("flags %#x, want %#x", c.flags, want)
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := tt.backend
			if b == nil {
				b = newMem(size)
			}
			s := &Server{Backend: b, Name: "disk"}
			if tt.srv != nil {
				tt.srv(s)
			}
			tt.run(t, dial(t, serve(t, s)))
		})
	}
}

func TestHandshakeTimeout(t *testing.T) {
	s := &Server{Backend: newMem(4096), HandshakeTimeout: 100 * time.Millisecond}
	c := dial(t, serve(t, s))
	c.readFull(18) // then say nothing
	c.expectClosed()
}

func TestServerValidate(t *testing.T) {
	for _, s := range []*Server{
		{},
		{Backend: newMem(4096), MinBlockSize: 3},
		{Backend: newMem(4096), MinBlockSize: 1 << 17},
	} {
		if err := s.validate(); err == nil {
			t.Errorf("validate(%+v) = nil, want error", s)
		}
	}
}
