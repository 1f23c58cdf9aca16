// Package bond owns UVBond's cryptography: sealing a tenant's disk key to a
// host's HPKE key, the keys derived from a disk key, VM descriptors, command
// MACs, sealed replies and key-verification proofs.
//
// It runs only on trusted machines: the host agent and the tenant's client.
// The management server must never link it (a test in internal/server checks).
package bond

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/vmbond/vmbond/internal/proto"
)

// DiskKeySize is the size of a disk key: the AES-256-XTS volume key of the
// VM's LUKS image (two 256-bit AES keys).
const DiskKeySize = 64

// NewDiskKey returns a fresh random disk key.
func NewDiskKey() []byte {
	k := make([]byte, DiskKeySize)
	rand.Read(k) // crypto/rand.Read never fails
	return k
}

// Keys are the keys derived from one disk key for one tenant's VM. Binding the
// tenant and VM into every derivation means a disk key registered for another
// VM yields unrelated keys.
type Keys struct {
	spec, cmd, reply, desc, verify []byte
	luksPassphrase                 []byte
}

// Derive computes the keys of a VM from its disk key.
func Derive(diskKey []byte, tenant, vm string) (*Keys, error) {
	if len(diskKey) != DiskKeySize {
		return nil, fmt.Errorf("derive keys for %s/%s: disk key is %d bytes, want %d", tenant, vm, len(diskKey), DiskKeySize)
	}
	prk, err := hkdf.Extract(sha256.New, diskKey, []byte(proto.Version))
	if err != nil {
		return nil, fmt.Errorf("derive keys for %s/%s: %w", tenant, vm, err)
	}
	expand := func(label string) []byte {
		k, err := hkdf.Expand(sha256.New, prk, label+"\x00"+tenant+"\x00"+vm, 32)
		if err != nil {
			panic(err) // only fails for lengths over 255*32 bytes
		}
		return k
	}
	pass := expand("luks-passphrase")
	return &Keys{
		spec:           expand("spec-mac"),
		cmd:            expand("command-mac"),
		reply:          expand("reply-aead"),
		desc:           expand("descriptor-aead"),
		verify:         expand("key-verification"),
		luksPassphrase: []byte(hex.EncodeToString(pass)),
	}, nil
}

// LUKSPassphrase is the passphrase of the image's LUKS key slot. It is a
// function of the disk key, so the tenant needs to keep only the disk key, and
// `vmbond key export` gives standard tools what they need.
func (k *Keys) LUKSPassphrase() []byte { return append([]byte(nil), k.luksPassphrase...) }

func mac(key []byte, parts ...[]byte) []byte {
	m := hmac.New(sha256.New, key)
	for _, p := range parts {
		var n [8]byte
		for i := range 8 {
			n[i] = byte(uint64(len(p)) >> (56 - 8*i))
		}
		m.Write(n[:]) // length-prefixed so part boundaries cannot shift
		m.Write(p)
	}
	return m.Sum(nil)
}

// SpecMAC authenticates a VM spec's exact bytes.
func (k *Keys) SpecMAC(spec []byte) []byte { return mac(k.spec, []byte("spec"), spec) }

// CheckSpecMAC verifies a spec MAC in constant time.
func (k *Keys) CheckSpecMAC(spec, tag []byte) bool { return hmac.Equal(k.SpecMAC(spec), tag) }

// CommandMAC authenticates a command body, bound to the VM's current
// descriptor ID, which only the key holder and the agent know.
func (k *Keys) CommandMAC(descriptorID, body []byte) []byte {
	return mac(k.cmd, []byte("command"), descriptorID, body)
}

// CheckCommandMAC verifies a command MAC in constant time.
func (k *Keys) CheckCommandMAC(descriptorID, body, tag []byte) bool {
	return hmac.Equal(k.CommandMAC(descriptorID, body), tag)
}

// VerifyProof answers a key-verification challenge for a given host.
func (k *Keys) VerifyProof(host string, challenge []byte) []byte {
	return mac(k.verify, []byte("verify"), []byte(host), challenge)
}

func seal(key []byte, aad string, v any) (nonce, box []byte, err error) {
	pt, err := json.Marshal(v)
	if err != nil {
		return nil, nil, err
	}
	aead, err := newGCM(key)
	if err != nil {
		return nil, nil, err
	}
	nonce = make([]byte, aead.NonceSize())
	rand.Read(nonce)
	return nonce, aead.Seal(nil, nonce, pt, []byte(aad)), nil
}

func open(key []byte, aad string, nonce, box []byte, v any) error {
	aead, err := newGCM(key)
	if err != nil {
		return err
	}
	if len(nonce) != aead.NonceSize() {
		return errors.New("bad nonce length")
	}
	pt, err := aead.Open(nil, nonce, box, []byte(aad))
	if err != nil {
		return errors.New("authentication failed")
	}
	return proto.DecodeStrict(pt, v)
}

func newGCM(key []byte) (cipher.AEAD, error) {
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(b)
}

func descriptorAAD(vm, host string) string { return "descriptor\x00" + vm + "\x00" + host }
func replyAAD(vm, host string) string      { return "reply\x00" + vm + "\x00" + host }

// SealDescriptor seals a descriptor so that only the key holder can open it.
func (k *Keys) SealDescriptor(d *proto.Descriptor) (*proto.DescriptorBox, error) {
	nonce, box, err := seal(k.desc, descriptorAAD(d.VM, d.Host), d)
	if err != nil {
		return nil, fmt.Errorf("seal descriptor for %s: %w", d.VM, err)
	}
	return &proto.DescriptorBox{VM: d.VM, Host: d.Host, Nonce: nonce, Box: box}, nil
}

// OpenDescriptor opens a descriptor box and checks it names the VM and host
// inside the authenticated content as well as outside.
func (k *Keys) OpenDescriptor(b *proto.DescriptorBox) (*proto.Descriptor, error) {
	var d proto.Descriptor
	if err := open(k.desc, descriptorAAD(b.VM, b.Host), b.Nonce, b.Box, &d); err != nil {
		return nil, fmt.Errorf("open descriptor for %s on %s: %w", b.VM, b.Host, err)
	}
	if d.VM != b.VM || d.Host != b.Host || len(d.ID) != 32 {
		return nil, fmt.Errorf("open descriptor for %s on %s: content names %s on %s", b.VM, b.Host, d.VM, d.Host)
	}
	return &d, nil
}

// SealReply seals an agent's reply to the tenant.
func (k *Keys) SealReply(r *proto.ReplyBody) (*proto.SealedReply, error) {
	nonce, box, err := seal(k.reply, replyAAD(r.VM, r.Host), r)
	if err != nil {
		return nil, fmt.Errorf("seal reply for %s: %w", r.VM, err)
	}
	return &proto.SealedReply{VM: r.VM, Host: r.Host, Nonce: nonce, Box: box}, nil
}

// OpenReply opens a sealed reply.
func (k *Keys) OpenReply(s *proto.SealedReply) (*proto.ReplyBody, error) {
	var r proto.ReplyBody
	if err := open(k.reply, replyAAD(s.VM, s.Host), s.Nonce, s.Box, &r); err != nil {
		return nil, fmt.Errorf("open reply for %s from %s: %w", s.VM, s.Host, err)
	}
	if r.VM != s.VM || r.Host != s.Host {
		return nil, fmt.Errorf("open reply for %s from %s: content names %s on %s", s.VM, s.Host, r.VM, r.Host)
	}
	return &r, nil
}

// RequestHash identifies the request a reply answers.
func RequestHash(body []byte) []byte {
	h := sha256.Sum256(body)
	return h[:]
}
