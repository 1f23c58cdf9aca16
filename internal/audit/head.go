package audit

import (
	"crypto/ed25519"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"time"
)

// headDomain separates head signatures from every other use of the host key.
const headDomain = "vmbond-audit-head-v1\n"

// A Head is the agent's signed statement that entry Seq of its log on Host
// has entry hash Hash: it pins every entry up to Seq, so that entries altered,
// dropped, inserted or rewritten before it, or truncated after a verifier saw
// it, are detected. Seq 0 with the all-zero hash is the empty log.
type Head struct {
	Host string    `json:"host"`
	Seq  uint64    `json:"seq"`
	Hash string    `json:"hash"` // hex entry hash of entry Seq
	Time time.Time `json:"time"` // when the head was signed
	Sig  []byte    `json:"sig"`  // Ed25519 signature by the host signing key
}

// message returns the bytes the head signature covers: a domain string, the
// host, the sequence number, the entry hash and the signing time.
func (h *Head) message() ([]byte, error) {
	hash, err := hex.DecodeString(h.Hash)
	if err != nil || len(hash) != hashSize {
		return nil, fmt.Errorf("head hash %q is not %d hex bytes", h.Hash, hashSize)
	}
	if len(h.Host) > 1<<16-1 {
		return nil, errors.New("head host name too long")
	}
	b := make([]byte, 0, len(headDomain)+2+len(h.Host)+8+hashSize+8)
	b = append(b, headDomain...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(h.Host)))
	b = append(b, h.Host...)
	b = binary.BigEndian.AppendUint64(b, h.Seq)
	b = append(b, hash...)
	b = binary.BigEndian.AppendUint64(b, uint64(h.Time.UnixNano()))
	return b, nil
}

// Sign sets h.Sig to the signature of h by priv.
func (h *Head) Sign(priv ed25519.PrivateKey) error {
	if len(priv) != ed25519.PrivateKeySize {
		return errors.New("sign audit head: bad Ed25519 private key")
	}
	m, err := h.message()
	if err != nil {
		return fmt.Errorf("sign audit head: %w", err)
	}
	h.Sig = ed25519.Sign(priv, m)
	return nil
}

// Verify checks h's signature against the host's public key. It does not
// check that the host name is the one expected; see Verifier.Host.
func (h *Head) Verify(pub ed25519.PublicKey) error {
	if len(pub) != ed25519.PublicKeySize {
		return errors.New("verify audit head: bad Ed25519 public key")
	}
	m, err := h.message()
	if err != nil {
		return fmt.Errorf("verify audit head: %w", err)
	}
	if !ed25519.Verify(pub, m, h.Sig) {
		return fmt.Errorf("verify audit head of %s at seq %d: signature is not the host's (forged, or signed by another host's key)", h.Host, h.Seq)
	}
	return nil
}
