package nbd

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"
)

func reqBytes(typ, flags uint16, off uint64, length uint32) []byte {
	b := binary.BigEndian.AppendUint32(nil, requestMagic)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, 42)
	b = binary.BigEndian.AppendUint64(b, off)
	return binary.BigEndian.AppendUint32(b, length)
}

// FuzzRequest drives the request header parser and validator and checks
// that anything accepted is safe to hand to a backend.
func FuzzRequest(f *testing.F) {
	f.Add(reqBytes(cmdRead, 0, 0, 4096), uint64(1<<20), uint8(0))
	f.Add(reqBytes(cmdWrite, cmdFlagFUA, 1<<20-1, 1), uint64(1<<20), uint8(1))
	f.Add(reqBytes(cmdBlockStatus, cmdFlagReqOne, 0, 1), uint64(1<<20), uint8(6))
	f.Add(reqBytes(cmdWriteZeroes, cmdFlagFastZero|cmdFlagNoHole, 1<<63, 1<<31), uint64(1<<63), uint8(7))
	f.Add(reqBytes(cmdRead, 0, 1<<64-1, 1<<32-1), uint64(1<<64-1), uint8(0xff))
	f.Add([]byte{0x25, 0x60, 0x95}, uint64(0), uint8(0))
	f.Fuzz(func(t *testing.T, b []byte, size uint64, mode uint8) {
		r, err := parseRequest(b)
		if err != nil {
			return
		}
		if len(b) >= requestSize && binary.BigEndian.Uint64(b[8:]) != r.cookie {
			t.Fatalf("cookie not preserved")
		}
		s := &Server{Backend: newMem(0), ReadOnly: mode&1 != 0, MinBlockSize: 1 << (mode >> 4 & 7)}
		x := &export{
			size:       size,
			flags:      s.transmissionFlags(mode&2 != 0),
			minBlock:   s.minBlock(),
			structured: mode&2 != 0,
			metaAlloc:  mode&6 == 6,
		}
		if mode&8 != 0 {
			x.flags |= tflagSendTrim
		}
		e := x.check(&r)
		if e == 0 {
			if r.typ > cmdBlockStatus || r.typ == cmdDisc {
				t.Fatalf("accepted command %d", r.typ)
			}
			end := r.offset + uint64(r.length)
			if r.typ != cmdFlush && (end < r.offset || end > size) {
				t.Fatalf("accepted out-of-range %+v for size %d", r, size)
			}
			if (r.typ == cmdRead || r.typ == cmdWrite) && r.length > maxPayload {
				t.Fatalf("accepted oversized %+v", r)
			}
			if x.flags&tflagReadOnly != 0 && (r.typ == cmdWrite || r.typ == cmdTrim || r.typ == cmdWriteZeroes) {
				t.Fatalf("accepted write on read-only export: %+v", r)
			}
			if r.typ == cmdBlockStatus && (!x.metaAlloc || r.length == 0) {
				t.Fatalf("accepted block status %+v without context or length", r)
			}
		}
		_ = cmdName(r.typ)
	})
}

// handshakeSeed builds a valid client byte stream: flags, options, then
// transmission requests.
func handshakeSeed(opts ...[]byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, clientFlagFixedNewstyle|clientFlagNoZeroes)
	for _, o := range opts {
		b = append(b, o...)
	}
	return b
}

func optBytes(opt uint32, data []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, optMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// FuzzHandshake feeds arbitrary client bytes through net.Pipe: the server
// must neither panic nor hang, whatever it receives.
func FuzzHandshake(f *testing.F) {
	f.Add(handshakeSeed(optBytes(optGo, infoData("", infoBlockSize)), reqBytes(cmdRead, 0, 0, 512)))
	f.Add(handshakeSeed(optBytes(optExportName, nil), reqBytes(cmdWrite, 0, 0, 4), []byte("abcd"), reqBytes(cmdDisc, 0, 0, 0)))
	f.Add(handshakeSeed(
		optBytes(optStructuredReply, nil),
		optBytes(optListMetaContext, metaData("", "base:")),
		optBytes(optSetMetaContext, metaData("", allocationCtx)),
		optBytes(optInfo, infoData("x", infoName, infoDescription)),
		optBytes(optList, nil),
		optBytes(optGo, infoData("")),
		reqBytes(cmdBlockStatus, cmdFlagReqOne, 0, 1<<20),
		reqBytes(cmdWriteZeroes, cmdFlagFastZero, 0, 1<<16),
		reqBytes(cmdRead, cmdFlagDF, 0, 0),
	))
	f.Add(handshakeSeed(optBytes(optStartTLS, nil), optBytes(99, []byte{1, 2, 3}), optBytes(optAbort, nil)))
	f.Add(handshakeSeed(optBytes(optSetMetaContext, []byte{0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff})))
	f.Add([]byte{0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, in []byte) {
		srv, cli := net.Pipe()
		s := &Server{Backend: newSparse(1 << 20), Name: "x", HandshakeTimeout: 5 * time.Second}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		done := make(chan error, 1)
		go func() { done <- s.ServeConn(ctx, srv) }()
		go io.Copy(io.Discard, cli) // net.Pipe is unbuffered: keep replies flowing
		cli.Write(in)               // fails early if the server hangs up
		cli.Close()
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			t.Fatalf("ServeConn did not return for input %q", in)
		}
	})
}
