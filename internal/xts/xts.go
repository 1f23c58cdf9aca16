// Package xts owns the sector cipher of vmbond's encrypted disks: AES-XTS with
// plain64 sector numbering, byte-identical to dm-crypt's aes-xts-plain64 and to
// golang.org/x/crypto/xts. It runs only on trusted machines (the agent and the
// tenant's client); the management server must never link it.
package xts

import (
	"crypto/aes"
	"fmt"

	"golang.org/x/crypto/xts"
)

// SectorSize is the size of one encrypted unit, as dm-crypt and LUKS1 use it.
const SectorSize = 512

// Cipher encrypts and decrypts whole 512-byte sectors. It is safe for
// concurrent use.
type Cipher struct {
	c *xts.Cipher
}

// New returns a Cipher for a 64-byte (AES-256-XTS) or 32-byte (AES-128-XTS) key.
func New(key []byte) (*Cipher, error) {
	if len(key) != 64 && len(key) != 32 {
		return nil, fmt.Errorf("xts: key is %d bytes, want 32 or 64", len(key))
	}
	c, err := xts.NewCipher(aes.NewCipher, key)
	if err != nil {
		return nil, fmt.Errorf("xts: %w", err)
	}
	return &Cipher{c: c}, nil
}

// Encrypt encrypts src into dst, sector by sector, numbering the first sector
// of src as sector. len(src) must be a multiple of SectorSize and dst at least
// as long; dst and src may be the same slice. Callers validate lengths; a
// misuse panics as crypto/cipher does.
func (c *Cipher) Encrypt(dst, src []byte, sector uint64) {
	checkLen(dst, src)
	for off := 0; off < len(src); off += SectorSize {
		c.c.Encrypt(dst[off:off+SectorSize], src[off:off+SectorSize], sector)
		sector++
	}
}

// Decrypt is the inverse of Encrypt.
func (c *Cipher) Decrypt(dst, src []byte, sector uint64) {
	checkLen(dst, src)
	for off := 0; off < len(src); off += SectorSize {
		c.c.Decrypt(dst[off:off+SectorSize], src[off:off+SectorSize], sector)
		sector++
	}
}

func checkLen(dst, src []byte) {
	if len(src)%SectorSize != 0 {
		panic("xts: input not a multiple of the sector size")
	}
	if len(dst) < len(src) {
		panic("xts: output smaller than input")
	}
}
