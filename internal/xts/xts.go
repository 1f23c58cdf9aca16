// Package xts owns the sector cipher of vmbond's encrypted disks: AES-XTS with
// plain64 sector numbering, byte-identical to dm-crypt's aes-xts-plain64 and to
// golang.org/x/crypto/xts. It runs only on trusted machines (the agent and the
// tenant's client); the management server must never link it.
//
// On amd64 with AES-NI the work is done in assembly: 16 blocks at a time in
// four ZMM registers where VAES and AVX-512 are present, otherwise 8 blocks
// interleaved in XMM registers. Elsewhere a portable path uses crypto/aes one
// block at a time, with each sector's tweaks computed in a batch; the purego
// build tag selects it on amd64 too.
//
// Encrypt and Decrypt run on the calling goroutine. EncryptParallel and
// DecryptParallel additionally spread requests of at least ParallelThreshold
// bytes across GOMAXPROCS goroutines.
package xts

import (
	"crypto/aes"
	"crypto/cipher"
	"fmt"
	"runtime"
	"sync"
	"unsafe"
)

// SectorSize is the size of one encrypted unit, as dm-crypt and LUKS1 use it.
const SectorSize = 512

// ParallelThreshold is the smallest request that EncryptParallel and
// DecryptParallel split across goroutines, each of which gets at least
// ParallelThreshold/2 bytes. One core with VAES does about 20 GB/s, so a
// smaller request finishes in tens of microseconds, where waking goroutines
// and sharing the memory bandwidth eat most of the gain.
const ParallelThreshold = 1 << 20

// impl selects the code that does the bulk work.
type impl int

const (
	implGeneric impl = iota // crypto/aes, one block at a time
	implAESNI               // amd64 AES-NI, 8 XMM blocks interleaved
	implVAES                // amd64 VAES + AVX-512, 16 blocks in 4 ZMM registers
)

func (i impl) String() string {
	switch i {
	case implAESNI:
		return "aesni"
	case implVAES:
		return "vaes"
	}
	return "generic"
}

// Cipher encrypts and decrypts whole 512-byte sectors. It is safe for
// concurrent use.
type Cipher struct {
	impl impl

	// Portable path: data key and tweak key.
	k1, k2 cipher.Block

	// Assembly paths: round keys of the data key for encryption and
	// decryption, and of the tweak key (which is only ever encrypted with).
	rounds          int
	enc, dec, tweak roundKeys
}

// New returns a Cipher for a 64-byte (AES-256-XTS) or 32-byte (AES-128-XTS) key.
func New(key []byte) (*Cipher, error) {
	return newCipher(key, bestImpl())
}

// newCipher is New with an explicit implementation, so tests can run every
// path available on the machine against the others.
func newCipher(key []byte, im impl) (*Cipher, error) {
	if len(key) != 64 && len(key) != 32 {
		return nil, fmt.Errorf("xts: key is %d bytes, want 32 or 64", len(key))
	}
	half := len(key) / 2
	c := &Cipher{impl: im}
	var err error
	if c.k1, err = aes.NewCipher(key[:half]); err != nil {
		return nil, fmt.Errorf("xts: %w", err)
	}
	if c.k2, err = aes.NewCipher(key[half:]); err != nil {
		return nil, fmt.Errorf("xts: %w", err)
	}
	if im != implGeneric {
		c.rounds = expandKey(&c.enc, key[:half])
		decryptKeys(&c.dec, &c.enc, c.rounds)
		expandKey(&c.tweak, key[half:])
	}
	return c, nil
}

// Encrypt encrypts src into dst, sector by sector, numbering the first sector
// of src as sector (sector numbers wrap around after 2⁶⁴-1). len(src) must be a
// multiple of SectorSize and dst at least as long; dst and src must overlap
// entirely or not at all. Callers validate lengths; a misuse panics as
// crypto/cipher does.
func (c *Cipher) Encrypt(dst, src []byte, sector uint64) {
	dst = checkLen(dst, src)
	c.crypt(dst, src, sector, false)
}

// Decrypt is the inverse of Encrypt.
func (c *Cipher) Decrypt(dst, src []byte, sector uint64) {
	dst = checkLen(dst, src)
	c.crypt(dst, src, sector, true)
}

// EncryptParallel is Encrypt, except that a request of at least
// ParallelThreshold bytes is cut into runs of whole sectors that are
// encrypted on up to GOMAXPROCS goroutines. It returns once all of dst is
// written. Callers that already keep every core busy with concurrent
// requests should use Encrypt.
func (c *Cipher) EncryptParallel(dst, src []byte, sector uint64) {
	dst = checkLen(dst, src)
	c.cryptParallel(dst, src, sector, false)
}

// DecryptParallel is the inverse of EncryptParallel.
func (c *Cipher) DecryptParallel(dst, src []byte, sector uint64) {
	dst = checkLen(dst, src)
	c.cryptParallel(dst, src, sector, true)
}

func (c *Cipher) crypt(dst, src []byte, sector uint64, decrypt bool) {
	if len(src) == 0 {
		return
	}
	if c.impl == implGeneric {
		c.cryptGeneric(dst, src, sector, decrypt)
	} else {
		c.cryptAsm(dst, src, sector, decrypt)
	}
}

func (c *Cipher) cryptParallel(dst, src []byte, sector uint64, decrypt bool) {
	workers := min(runtime.GOMAXPROCS(0), len(src)/(ParallelThreshold/2))
	if len(src) < ParallelThreshold || workers < 2 {
		c.crypt(dst, src, sector, decrypt)
		return
	}
	nsec := len(src) / SectorSize
	per := (nsec + workers - 1) / workers
	var wg sync.WaitGroup
	for first := 0; first < nsec; first += per {
		n := min(per, nsec-first)
		d := dst[first*SectorSize : (first+n)*SectorSize]
		s := src[first*SectorSize : (first+n)*SectorSize]
		sec := sector + uint64(first)
		if first+n == nsec {
			// The last run goes on the calling goroutine.
			c.crypt(d, s, sec, decrypt)
			break
		}
		wg.Go(func() { c.crypt(d, s, sec, decrypt) })
	}
	wg.Wait()
}

// checkLen validates the buffers and returns dst cut to the length of src.
func checkLen(dst, src []byte) []byte {
	if len(src)%SectorSize != 0 {
		panic("xts: input not a multiple of the sector size")
	}
	if len(dst) < len(src) {
		panic("xts: output smaller than input")
	}
	dst = dst[:len(src)]
	if inexactOverlap(dst, src) {
		// Writing a sector would clobber input not yet read.
		panic("xts: invalid buffer overlap")
	}
	return dst
}

// inexactOverlap reports whether x and y share memory at different offsets.
func inexactOverlap(x, y []byte) bool {
	if len(x) == 0 || len(y) == 0 || &x[0] == &y[0] {
		return false
	}
	x0, x1 := uintptr(unsafe.Pointer(&x[0])), uintptr(unsafe.Pointer(&x[len(x)-1]))
	y0, y1 := uintptr(unsafe.Pointer(&y[0])), uintptr(unsafe.Pointer(&y[len(y)-1]))
	return x0 <= y1 && y0 <= x1
}
