//go:build amd64 && !purego

package xts

import (
	"encoding/binary"

	"golang.org/x/sys/cpu"
)

var (
	haveAESNI = cpu.X86.HasAES
	// The ZMM path also needs AVX512BW for the per-lane byte shifts
	// (VPSLLDQ/VPSRLDQ) and VPCLMULQDQ to reduce the shifted tweaks.
	haveVAES = haveAESNI && cpu.X86.HasAVX512F && cpu.X86.HasAVX512BW &&
		cpu.X86.HasAVX512VAES && cpu.X86.HasAVX512VPCLMULQDQ
)

func bestImpl() impl {
	switch {
	case haveVAES:
		return implVAES
	case haveAESNI:
		return implAESNI
	}
	return implGeneric
}

// availableImpls lists every implementation that runs on this machine.
func availableImpls() []impl {
	ims := []impl{implGeneric}
	if haveAESNI {
		ims = append(ims, implAESNI)
	}
	if haveVAES {
		ims = append(ims, implVAES)
	}
	return ims
}

// Implemented in xts_amd64.s. rk points to nr+1 round keys; tweaks to one
// encrypted initial tweak per sector; nsec is the number of 512-byte sectors.
//
//go:noescape
func encryptBlocksAESNI(nr int, rk *byte, dst, src *byte, n int)

//go:noescape
func xtsEncAESNI(nr int, rk *byte, dst, src, tweaks *byte, nsec int)

//go:noescape
func xtsDecAESNI(nr int, rk *byte, dst, src, tweaks *byte, nsec int)

//go:noescape
func xtsEncVAES(nr int, rk *byte, dst, src, tweaks *byte, nsec int)

//go:noescape
func xtsDecVAES(nr int, rk *byte, dst, src, tweaks *byte, nsec int)

// tweakBatch is the number of sectors whose initial tweaks are encrypted
// together; doing it eight blocks at a time keeps the AES units busy instead
// of paying a full AES latency at the start of every sector.
const tweakBatch = 32

func (c *Cipher) cryptAsm(dst, src []byte, sector uint64, decrypt bool) {
	var tw [tweakBatch * blockSize]byte
	for len(src) > 0 {
		n := min(len(src)/SectorSize, tweakBatch)
		for i := range n {
			binary.LittleEndian.PutUint64(tw[i*blockSize:], sector+uint64(i))
			binary.LittleEndian.PutUint64(tw[i*blockSize+8:], 0)
		}
		encryptBlocksAESNI(c.rounds, &c.tweak[0], &tw[0], &tw[0], n)
		switch {
		case c.impl == implVAES && !decrypt:
			xtsEncVAES(c.rounds, &c.enc[0], &dst[0], &src[0], &tw[0], n)
		case c.impl == implVAES:
			xtsDecVAES(c.rounds, &c.dec[0], &dst[0], &src[0], &tw[0], n)
		case !decrypt:
			xtsEncAESNI(c.rounds, &c.enc[0], &dst[0], &src[0], &tw[0], n)
		default:
			xtsDecAESNI(c.rounds, &c.dec[0], &dst[0], &src[0], &tw[0], n)
		}
		sector += uint64(n)
		src = src[n*SectorSize:]
		dst = dst[n*SectorSize:]
	}
}
