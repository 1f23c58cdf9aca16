//go:build !amd64 || purego

package xts

func bestImpl() impl { return implGeneric }

func availableImpls() []impl { return []impl{implGeneric} }

func (c *Cipher) cryptAsm(dst, src []byte, sector uint64, decrypt bool) {
	panic("xts: no assembly on this platform")
}
