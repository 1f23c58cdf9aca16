package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Wire constants from the NBD protocol specification (doc/proto.md in the
// NetworkBlockDevice project). All integers are big-endian on the wire.

// Magic numbers.
const (
	nbdMagic             = 0x4e42444d41474943 // "NBDMAGIC"
	optMagic             = 0x49484156454f5054 // "IHAVEOPT"
	optReplyMagic        = 0x0003e889045565a9
	requestMagic         = 0x25609513
	simpleReplyMagic     = 0x67446698
	structuredReplyMagic = 0x668e33ef
)

// Handshake flags (server) and client flags.
const (
	flagFixedNewstyle = 1 << 0
	flagNoZeroes      = 1 << 1

	clientFlagFixedNewstyle = 1 << 0
	clientFlagNoZeroes      = 1 << 1
)

// Transmission flags.
const (
	tflagHasFlags        = 1 << 0
	tflagReadOnly        = 1 << 1
	tflagSendFlush       = 1 << 2
	tflagSendFUA         = 1 << 3
	tflagSendTrim        = 1 << 5
	tflagSendWriteZeroes = 1 << 6
	tflagSendDF          = 1 << 7
	tflagCanMultiConn    = 1 << 8
	tflagSendFastZero    = 1 << 11
)

// Option types.
const (
	optExportName      = 1
	optAbort           = 2
	optList            = 3
	optStartTLS        = 5
	optInfo            = 6
	optGo              = 7
	optStructuredReply = 8
	optListMetaContext = 9
	optSetMetaContext  = 10
)

// Option reply types.
const (
	repAck         = 1
	repServer      = 2
	repInfo        = 3
	repMetaContext = 4

	repErrUnsup   = 1<<31 + 1
	repErrPolicy  = 1<<31 + 2
	repErrInvalid = 1<<31 + 3
	repErrUnknown = 1<<31 + 6
	repErrTooBig  = 1<<31 + 9
)

// NBD_INFO types carried in NBD_REP_INFO.
const (
	infoExport      = 0
	infoName        = 1
	infoDescription = 2
	infoBlockSize   = 3
)

// Command types.
const (
	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdCache       = 5
	cmdWriteZeroes = 6
	cmdBlockStatus = 7
)

// Command flags.
const (
	cmdFlagFUA      = 1 << 0
	cmdFlagNoHole   = 1 << 1
	cmdFlagDF       = 1 << 2
	cmdFlagReqOne   = 1 << 3
	cmdFlagFastZero = 1 << 4
)

// Structured reply flags and chunk types.
const (
	replyFlagDone = 1 << 0

	replyTypeNone        = 0
	replyTypeOffsetData  = 1
	replyTypeOffsetHole  = 2
	replyTypeBlockStatus = 5
	replyTypeError       = 1<<15 + 1
)

// Error values for the reply error field.
const (
	errPerm     = 1
	errIO       = 5
	errInval    = 22
	errNoSpc    = 28
	errOverflow = 75
	errNotSup   = 95
	errShutdown = 108
)

// base:allocation status flags.
const (
	stateHole = 1 << 0
	stateZero = 1 << 1
)

// Sizes and limits.
const (
	requestSize      = 28 // request header
	simpleReplySize  = 16 // simple reply header
	chunkHeaderSize  = 20 // structured reply chunk header
	optHeaderSize    = 16 // option request header
	optReplyHdrSize  = 20 // option reply header
	maxStringLen     = 4096
	maxOptionLen     = 64 << 10 // larger option payloads are discarded unread
	maxPayload       = 32 << 20 // advertised maximum payload
	preferredBlock   = 4096
	maxExtents       = 1 << 16 // per BLOCK_STATUS reply; the spec allows fewer than 2^20
	allocationCtxID  = 1       // metadata context ID of base:allocation
	allocationCtx    = "base:allocation"
	maxMinBlockSize  = 64 << 10
	defaultMinBlock  = 1
	defaultWorkers   = 16
	defaultInFlight  = 64 << 20
	exportNameZeroes = 124
)

// request is a parsed transmission-phase request header.
type request struct {
	flags  uint16
	typ    uint16
	cookie uint64
	offset uint64
	length uint32
}

// errBadMagic reports a request header that does not start with
// NBD_REQUEST_MAGIC. The stream cannot be resynchronized after it.
var errBadMagic = errors.New("bad request magic")

// parseRequest decodes a request header. It only fails on a short buffer or
// a bad magic number; semantic checks are export.check's job.
func parseRequest(b []byte) (request, error) {
	if len(b) < requestSize {
		return request{}, fmt.Errorf("short request header: %d bytes", len(b))
	}
	if m := binary.BigEndian.Uint32(b[0:]); m != requestMagic {
		return request{}, fmt.Errorf("%w %#08x", errBadMagic, m)
	}
	return request{
		flags:  binary.BigEndian.Uint16(b[4:]),
		typ:    binary.BigEndian.Uint16(b[6:]),
		cookie: binary.BigEndian.Uint64(b[8:]),
		offset: binary.BigEndian.Uint64(b[16:]),
		length: binary.BigEndian.Uint32(b[24:]),
	}, nil
}

// putSimpleReply encodes a simple reply header into b[:simpleReplySize].
func putSimpleReply(b []byte, errno uint32, cookie uint64) []byte {
	binary.BigEndian.PutUint32(b[0:], simpleReplyMagic)
	binary.BigEndian.PutUint32(b[4:], errno)
	binary.BigEndian.PutUint64(b[8:], cookie)
	return b[:simpleReplySize]
}

// putChunkHeader encodes a structured reply chunk header into
// b[:chunkHeaderSize]; length is the payload length that follows.
func putChunkHeader(b []byte, flags, typ uint16, cookie uint64, length uint32) []byte {
	binary.BigEndian.PutUint32(b[0:], structuredReplyMagic)
	binary.BigEndian.PutUint16(b[4:], flags)
	binary.BigEndian.PutUint16(b[6:], typ)
	binary.BigEndian.PutUint64(b[8:], cookie)
	binary.BigEndian.PutUint32(b[16:], length)
	return b[:chunkHeaderSize]
}

// cmdName names a command type for logs.
func cmdName(typ uint16) string {
	switch typ {
	case cmdRead:
		return "READ"
	case cmdWrite:
		return "WRITE"
	case cmdDisc:
		return "DISC"
	case cmdFlush:
		return "FLUSH"
	case cmdTrim:
		return "TRIM"
	case cmdCache:
		return "CACHE"
	case cmdWriteZeroes:
		return "WRITE_ZEROES"
	case cmdBlockStatus:
		return "BLOCK_STATUS"
	}
	return fmt.Sprintf("CMD(%d)", typ)
}

// export is what a connection negotiated: the backend, its size and the
// features both sides agreed on. It is read-only during transmission.
type export struct {
	backend  Backend
	trimmer  Trimmer       // nil unless the backend implements it
	zeroer   Zeroer        // nil unless the backend implements it
	statuser BlockStatuser // nil unless the backend implements it

	size       uint64
	flags      uint16 // transmission flags sent to the client
	minBlock   uint32
	structured bool // NBD_OPT_STRUCTURED_REPLY negotiated
	metaAlloc  bool // base:allocation selected for this export
}

// check validates a request against the export and returns 0 if it may be
// served or the NBD error value to reply with. It must stay cheap and total:
// the fuzz test feeds it arbitrary headers.
func (x *export) check(r *request) uint32 {
	valid := uint16(cmdFlagFUA) // FUA is valid on every command
	switch r.typ {
	case cmdRead:
		if x.structured {
			valid |= cmdFlagDF
		}
	case cmdWrite, cmdFlush, cmdCache:
	case cmdTrim:
		if x.flags&tflagSendTrim == 0 {
			return errInval
		}
	case cmdWriteZeroes:
		if x.flags&tflagSendWriteZeroes == 0 {
			return errInval
		}
		valid |= cmdFlagNoHole | cmdFlagFastZero
	case cmdBlockStatus:
		if !x.metaAlloc {
			return errInval
		}
		valid |= cmdFlagReqOne
	default:
		return errInval
	}
	if r.flags&^valid != 0 {
		return errInval
	}
	if x.flags&tflagReadOnly != 0 {
		switch r.typ {
		case cmdWrite, cmdTrim, cmdWriteZeroes:
			return errPerm
		}
	}
	if r.typ == cmdFlush {
		if r.offset != 0 || r.length != 0 {
			return errInval
		}
		return 0
	}
	if (r.typ == cmdRead || r.typ == cmdWrite) && r.length > maxPayload {
		if r.typ == cmdRead && x.structured {
			return errOverflow // permitted for reads: the client may retry smaller
		}
		return errInval // a write this large makes the reader disconnect first
	}
	if end := r.offset + uint64(r.length); end < r.offset || end > x.size {
		if r.typ == cmdWrite || r.typ == cmdWriteZeroes {
			return errNoSpc
		}
		return errInval
	}
	switch r.typ {
	case cmdRead, cmdWrite, cmdTrim, cmdWriteZeroes:
		if m := uint64(x.minBlock); m > 1 && (r.offset%m != 0 || uint64(r.length)%m != 0) {
			return errInval
		}
	}
	if r.typ == cmdBlockStatus && r.length == 0 {
		return errInval // a reply needs at least one nonzero extent
	}
	return 0
}
