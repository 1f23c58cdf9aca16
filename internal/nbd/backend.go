// Package nbd owns vmbond's Network Block Device server: the fixed-newstyle
// handshake, the transmission phase and its request parser. It serves any
// Backend; the agent gives it an encrypting one, so QEMU only ever sees
// plaintext over a private unix socket while storage only sees ciphertext.
package nbd

// Backend is the block device an export serves. Offsets and lengths the server
// passes are already checked against Size. Implementations must be safe for
// concurrent use: the server runs requests of one connection in parallel.
type Backend interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	// Size is the export size in bytes.
	Size() int64
	// Flush makes every completed write durable before it returns.
	Flush() error
}

// Trimmer is implemented by backends that can discard a range (NBD_CMD_TRIM).
type Trimmer interface {
	Trim(off, length int64) error
}

// Zeroer is implemented by backends that can zero a range without a data
// transfer (NBD_CMD_WRITE_ZEROES). mayTrim reports whether the client allows
// the range to be deallocated instead of written.
type Zeroer interface {
	WriteZeroes(off, length int64, mayTrim bool) error
}

// Extent is one run of a BLOCK_STATUS reply for the base:allocation context.
type Extent struct {
	Length int64
	Hole   bool // NBD_STATE_HOLE: not allocated on storage
	Zero   bool // NBD_STATE_ZERO: reads as zeros
}

// BlockStatuser is implemented by backends that know which ranges are
// allocated (NBD_CMD_BLOCK_STATUS, base:allocation).
type BlockStatuser interface {
	BlockStatus(off, length int64) ([]Extent, error)
}
