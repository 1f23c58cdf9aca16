package xts

// AES key expansion (FIPS-197 section 5.2) for the assembly paths, which take
// raw round keys rather than a crypto/aes cipher.Block.
//
// The S-box is computed arithmetically (inverse in GF(2⁸) followed by the
// affine map) instead of looked up in a table, so that expanding a key does
// not index memory by secret bytes.

// maxRounds is the number of rounds of AES-256; AES-128 uses 10.
const maxRounds = 14

// roundKeys holds up to maxRounds+1 round keys, 16 bytes each, in the byte
// order AESENC/AESDEC expect (the FIPS-197 byte order of the state).
type roundKeys [(maxRounds + 1) * 16]byte

// gfMul multiplies a and b in GF(2⁸) modulo x⁸+x⁴+x³+x+1, in constant time.
func gfMul(a, b byte) byte {
	var p byte
	for range 8 {
		p ^= a & -(b & 1)
		a = a<<1 ^ 0x1b&-(a>>7)
		b >>= 1
	}
	return p
}

// gfInv returns the multiplicative inverse of x (0 for 0) as x²⁵⁴.
func gfInv(x byte) byte {
	x3 := gfMul(gfMul(x, x), x)       // x³
	x7 := gfMul(gfMul(x3, x3), x)     // x⁷
	x15 := gfMul(gfMul(x7, x7), x)    // x¹⁵
	x31 := gfMul(gfMul(x15, x15), x)  // x³¹
	x63 := gfMul(gfMul(x31, x31), x)  // x⁶³
	x127 := gfMul(gfMul(x63, x63), x) // x¹²⁷
	return gfMul(x127, x127)          // x²⁵⁴
}

func rotl8(b byte, n uint) byte { return b<<n | b>>(8-n) }

// subByte is the AES S-box.
func subByte(x byte) byte {
	b := gfInv(x)
	return b ^ rotl8(b, 1) ^ rotl8(b, 2) ^ rotl8(b, 3) ^ rotl8(b, 4) ^ 0x63
}

func subWord(w uint32) uint32 {
	return uint32(subByte(byte(w>>24)))<<24 | uint32(subByte(byte(w>>16)))<<16 |
		uint32(subByte(byte(w>>8)))<<8 | uint32(subByte(byte(w)))
}

// expandKey fills enc with the encryption round keys of a 16- or 32-byte AES
// key and returns the number of rounds.
func expandKey(enc *roundKeys, key []byte) int {
	nk := len(key) / 4
	nr := nk + 6
	var w [4 * (maxRounds + 1)]uint32
	for i := range nk {
		w[i] = uint32(key[4*i])<<24 | uint32(key[4*i+1])<<16 | uint32(key[4*i+2])<<8 | uint32(key[4*i+3])
	}
	rcon := uint32(1)
	for i := nk; i < 4*(nr+1); i++ {
		t := w[i-1]
		switch {
		case i%nk == 0:
			t = subWord(t<<8|t>>24) ^ rcon<<24
			rcon = uint32(gfMul(byte(rcon), 2))
		case nk > 6 && i%nk == 4:
			t = subWord(t)
		}
		w[i] = w[i-nk] ^ t
	}
	for i := range 4 * (nr + 1) {
		enc[4*i] = byte(w[i] >> 24)
		enc[4*i+1] = byte(w[i] >> 16)
		enc[4*i+2] = byte(w[i] >> 8)
		enc[4*i+3] = byte(w[i])
	}
	return nr
}

// decryptKeys derives the round keys of the equivalent inverse cipher
// (FIPS-197 section 5.3.5), the form AESDEC expects: the encryption keys in
// reverse order, with InvMixColumns applied to all but the first and last.
func decryptKeys(dec, enc *roundKeys, nr int) {
	copy(dec[0:16], enc[nr*16:nr*16+16])
	copy(dec[nr*16:nr*16+16], enc[0:16])
	for r := 1; r < nr; r++ {
		src := enc[(nr-r)*16 : (nr-r)*16+16]
		dst := dec[r*16 : r*16+16]
		for c := 0; c < 16; c += 4 {
			a0, a1, a2, a3 := src[c], src[c+1], src[c+2], src[c+3]
			dst[c] = gfMul(a0, 14) ^ gfMul(a1, 11) ^ gfMul(a2, 13) ^ gfMul(a3, 9)
			dst[c+1] = gfMul(a0, 9) ^ gfMul(a1, 14) ^ gfMul(a2, 11) ^ gfMul(a3, 13)
			dst[c+2] = gfMul(a0, 13) ^ gfMul(a1, 9) ^ gfMul(a2, 14) ^ gfMul(a3, 11)
			dst[c+3] = gfMul(a0, 11) ^ gfMul(a1, 13) ^ gfMul(a2, 9) ^ gfMul(a3, 14)
		}
	}
}
