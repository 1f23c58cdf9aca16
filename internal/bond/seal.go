package bond

import (
	"crypto/hpke"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
)

// KEM is the HPKE KEM of host seal keys: hybrid ML-KEM-768 + X25519, so that
// a sealed disk key recorded today stays secret if X25519 falls later.
func KEM() hpke.KEM { return hpke.MLKEM768X25519() }

func suite() (hpke.KDF, hpke.AEAD) { return hpke.HKDFSHA256(), hpke.AES256GCM() }

// GenerateHostKey makes a new host seal key pair.
func GenerateHostKey() (hpke.PrivateKey, error) { return KEM().GenerateKey() }

// Binding is what a sealed disk key is bound to. Opening with any other
// binding fails, so a blob replayed to another tenant, VM or host, or with an
// altered spec, is refused.
type Binding struct {
	Tenant, VM, Host string
	Spec             []byte // exact spec bytes; only their hash is bound
}

func (b Binding) info() []byte {
	h := sha256.Sum256(b.Spec)
	s := "vmbond/v1 disk-key\x00" + b.Tenant + "\x00" + b.VM + "\x00" + b.Host + "\x00"
	return append([]byte(s), h[:]...)
}

// Sealed blob layout (all integers big-endian):
//
//	magic "VMBK" | version 1 (1 byte) | KEM id (2) | KDF id (2) | AEAD id (2) |
//	enc length (2) | enc | ciphertext
const (
	blobMagic   = "VMBK"
	blobVersion = 1
	blobHeader  = 4 + 1 + 2 + 2 + 2 + 2
	maxBlob     = 8 << 10
)

// SealDiskKey seals a disk key to a host's HPKE public key (its bytes as the
// host certificate carries them).
func SealDiskKey(hostKey []byte, diskKey []byte, b Binding) ([]byte, error) {
	if len(diskKey) != DiskKeySize {
		return nil, fmt.Errorf("seal disk key for %s: key is %d bytes, want %d", b.VM, len(diskKey), DiskKeySize)
	}
	pk, err := KEM().NewPublicKey(hostKey)
	if err != nil {
		return nil, fmt.Errorf("seal disk key for %s: host %s seal key: %w", b.VM, b.Host, err)
	}
	kdf, aead := suite()
	enc, sender, err := hpke.NewSender(pk, kdf, aead, b.info())
	if err != nil {
		return nil, fmt.Errorf("seal disk key for %s: %w", b.VM, err)
	}
	ct, err := sender.Seal(nil, diskKey)
	if err != nil {
		return nil, fmt.Errorf("seal disk key for %s: %w", b.VM, err)
	}
	out := make([]byte, blobHeader, blobHeader+len(enc)+len(ct))
	copy(out, blobMagic)
	out[4] = blobVersion
	binary.BigEndian.PutUint16(out[5:], KEM().ID())
	binary.BigEndian.PutUint16(out[7:], kdf.ID())
	binary.BigEndian.PutUint16(out[9:], aead.ID())
	binary.BigEndian.PutUint16(out[11:], uint16(len(enc)))
	out = append(out, enc...)
	return append(out, ct...), nil
}

// ParsedBlob is a sealed blob split into its parts, not yet opened.
type ParsedBlob struct {
	KEM, KDF, AEAD  uint16
	Enc, Ciphertext []byte
}

// ParseBlob splits a sealed blob, checking every length. It parses untrusted
// bytes: whatever the input, it returns an error or a blob, never panics.
func ParseBlob(blob []byte) (*ParsedBlob, error) {
	if len(blob) > maxBlob {
		return nil, fmt.Errorf("sealed blob is %d bytes, limit %d", len(blob), maxBlob)
	}
	if len(blob) < blobHeader || string(blob[:4]) != blobMagic {
		return nil, errors.New("not a vmbond sealed blob (bad magic or too short)")
	}
	if blob[4] != blobVersion {
		return nil, fmt.Errorf("sealed blob version %d, want %d", blob[4], blobVersion)
	}
	p := &ParsedBlob{
		KEM:  binary.BigEndian.Uint16(blob[5:]),
		KDF:  binary.BigEndian.Uint16(blob[7:]),
		AEAD: binary.BigEndian.Uint16(blob[9:]),
	}
	n := int(binary.BigEndian.Uint16(blob[11:]))
	rest := blob[blobHeader:]
	if n > len(rest) {
		return nil, fmt.Errorf("sealed blob: encapsulated key of %d bytes overruns the blob", n)
	}
	p.Enc, p.Ciphertext = rest[:n], rest[n:]
	kdf, aead := suite()
	if p.KEM != KEM().ID() || p.KDF != kdf.ID() || p.AEAD != aead.ID() {
		return nil, fmt.Errorf("sealed blob uses suite %#04x/%#04x/%#04x, want %#04x/%#04x/%#04x",
			p.KEM, p.KDF, p.AEAD, KEM().ID(), kdf.ID(), aead.ID())
	}
	return p, nil
}

// OpenDiskKey opens a sealed disk key with the host's private key. It fails if
// the blob was sealed to another host or with another binding.
func OpenDiskKey(priv hpke.PrivateKey, blob []byte, b Binding) ([]byte, error) {
	p, err := ParseBlob(blob)
	if err != nil {
		return nil, fmt.Errorf("open disk key for %s: %w", b.VM, err)
	}
	kdf, aead := suite()
	r, err := hpke.NewRecipient(p.Enc, priv, kdf, aead, b.info())
	if err != nil {
		return nil, fmt.Errorf("open disk key for %s: %w", b.VM, err)
	}
	key, err := r.Open(nil, p.Ciphertext)
	if err != nil {
		return nil, fmt.Errorf("open disk key for %s/%s on %s: not sealed to this host for this tenant, VM and spec", b.Tenant, b.VM, b.Host)
	}
	if len(key) != DiskKeySize {
		return nil, fmt.Errorf("open disk key for %s: key is %d bytes, want %d", b.VM, len(key), DiskKeySize)
	}
	return key, nil
}
