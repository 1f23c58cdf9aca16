package xts

import (
	"crypto/subtle"
	"encoding/binary"
)

const blockSize = 16

// mulAlpha multiplies the tweak (lo, hi), a little-endian 128-bit value, by
// α = x in GF(2¹²⁸) modulo x¹²⁸+x⁷+x²+x+1, in constant time.
func mulAlpha(lo, hi uint64) (uint64, uint64) {
	carry := hi >> 63
	hi = hi<<1 | lo>>63
	lo = lo<<1 ^ 0x87&-carry
	return lo, hi
}

// cryptGeneric is the portable path. Per sector it lays out all 32 tweaks
// first so that the XORs before and after the block cipher run over the whole
// sector at once with crypto/subtle's vectorised XORBytes.
func (c *Cipher) cryptGeneric(dst, src []byte, sector uint64, decrypt bool) {
	var tweaks [SectorSize]byte
	crypt := c.k1.Encrypt
	if decrypt {
		crypt = c.k1.Decrypt
	}
	for off := 0; off < len(src); off += SectorSize {
		var t [blockSize]byte
		binary.LittleEndian.PutUint64(t[:8], sector)
		c.k2.Encrypt(t[:], t[:])
		lo, hi := binary.LittleEndian.Uint64(t[:8]), binary.LittleEndian.Uint64(t[8:])
		for i := 0; i < SectorSize; i += blockSize {
			binary.LittleEndian.PutUint64(tweaks[i:], lo)
			binary.LittleEndian.PutUint64(tweaks[i+8:], hi)
			lo, hi = mulAlpha(lo, hi)
		}

		d := dst[off : off+SectorSize]
		subtle.XORBytes(d, src[off:off+SectorSize], tweaks[:])
		for i := 0; i < SectorSize; i += blockSize {
			b := d[i : i+blockSize]
			crypt(b, b)
		}
		subtle.XORBytes(d, d, tweaks[:])
		sector++
	}
}
