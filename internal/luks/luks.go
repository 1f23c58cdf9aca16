// Package luks owns vmbond's LUKS1 on-disk format: writing a header with one
// key slot, parsing and validating headers read from storage, checking a
// volume key against the header's digest and recovering the volume key from
// a key slot. Disk images stay standard LUKS1 containers so a tenant can
// leave vmbond with cryptsetup or qemu-img alone.
//
// It follows the LUKS1 On-Disk Format Specification 1.2.3. It runs only on
// trusted machines (the host agent and the tenant's client); the management
// server never sees volume keys or passphrases and must not link it.
package luks

import (
	"bytes"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"unicode/utf8"

	"github.com/vmbond/vmbond/internal/xts"
)

// On-disk constants from the specification.
const (
	// SectorSize is LUKS1's fixed sector size; all offsets count in it.
	SectorSize = 512
	// NumSlots is the number of key slots in a LUKS1 header.
	NumSlots = 8
	// HeaderSize is the size of the fixed header including key slot
	// descriptors (the "phdr").
	HeaderSize = 592

	digestSize = 20
	saltSize   = 32

	slotActive   = 0x00AC71F3
	slotDisabled = 0x0000DEAD
)

// Defaults vmbond writes. Payload offset and key slot layout match what
// cryptsetup 2.x produces for a 512-bit key with default alignment.
const (
	DefaultDigestIterations = 1000
	DefaultSlotIterations   = 10000
	DefaultStripes          = 4000
	// DefaultPayloadSectors is the payload offset in sectors (2 MiB).
	DefaultPayloadSectors = 4096

	// MinIterations is the smallest PBKDF2 iteration count cryptsetup
	// accepts for LUKS1.
	MinIterations = 1000
	// MaxIterations bounds the work a hostile header can make us do: a
	// substituted disk must not be able to pin the agent's CPU for hours.
	// cryptsetup's 2 s calibration stays well below it on current CPUs.
	MaxIterations = 1 << 25
	// MaxStripes bounds the memory Unlock needs (MaxStripes*64 bytes).
	MaxStripes = 1 << 16
	// maxKeyBytes is the largest key LUKS1 tools create (AES-256-XTS).
	maxKeyBytes = 64

	keySlotAlignSectors = 8 // cryptsetup aligns key material to 4 KiB
)

var magic = [6]byte{'L', 'U', 'K', 'S', 0xba, 0xbe}

// ErrNotLUKS is returned (wrapped) by ReadHeader when the bytes do not start
// with a LUKS1 magic and version: the file is not a LUKS1 image at all.
var ErrNotLUKS = errors.New("luks: not a LUKS1 image")

// ErrWrongKey is returned when a volume key does not match the header's
// digest, or when no key slot opens with a passphrase.
var ErrWrongKey = errors.New("luks: wrong key or passphrase")

// KeySlot is one key slot descriptor.
type KeySlot struct {
	Active     bool
	Iterations uint32
	Salt       [saltSize]byte
	// KeyMaterialOffset is the start of the slot's key material, in sectors.
	KeyMaterialOffset uint32
	Stripes           uint32
}

// Header is a parsed and validated LUKS1 header.
type Header struct {
	CipherName string // e.g. "aes"
	CipherMode string // e.g. "xts-plain64"
	HashSpec   string // e.g. "sha256"
	// PayloadSectors is the start of the encrypted data, in sectors.
	PayloadSectors uint32
	KeyBytes       uint32
	MKDigest       [digestSize]byte
	MKDigestSalt   [saltSize]byte
	MKDigestIter   uint32
	UUID           string
	Slots          [NumSlots]KeySlot
}

// PayloadOffset returns the start of the encrypted data in bytes.
func (h *Header) PayloadOffset() int64 { return int64(h.PayloadSectors) * SectorSize }

// Option changes how Create writes a header.
type Option func(*config)

type config struct {
	digestIter uint32
	slotIter   uint32
	uuid       string
	rand       io.Reader
}

// WithDigestIterations sets the PBKDF2 iteration count of the volume key
// digest (default DefaultDigestIterations).
func WithDigestIterations(n uint32) Option { return func(c *config) { c.digestIter = n } }

// WithSlotIterations sets the PBKDF2 iteration count of key slot 0 (default
// DefaultSlotIterations). vmbond's passphrases are random high-entropy
// secrets, so a slow KDF buys little.
func WithSlotIterations(n uint32) Option { return func(c *config) { c.slotIter = n } }

// WithUUID sets the header UUID instead of a random one.
func WithUUID(uuid string) Option { return func(c *config) { c.uuid = uuid } }

// WithRand sets the source of salts, AF stripes and the UUID (default
// crypto/rand). Only tests should use it.
func WithRand(r io.Reader) Option { return func(c *config) { c.rand = r } }

// Create writes a LUKS1 header for aes-xts-plain64 with sha256 to w: the
// header at offset 0 and key slot 0's key material, which holds volumeKey
// (64 bytes) under passphrase, which must be valid UTF-8 as qemu requires. It does not touch the payload area, which
// starts at DefaultPayloadSectors*SectorSize, nor the areas of unused slots.
func Create(w io.WriterAt, volumeKey, passphrase []byte, opts ...Option) (*Header, error) {
	cfg := config{
		digestIter: DefaultDigestIterations,
		slotIter:   DefaultSlotIterations,
		rand:       rand.Reader,
	}
	for _, o := range opts {
		o(&cfg)
	}
	if len(volumeKey) != maxKeyBytes {
		return nil, fmt.Errorf("luks: volume key is %d bytes, want %d", len(volumeKey), maxKeyBytes)
	}
	if cfg.digestIter < MinIterations || cfg.digestIter > MaxIterations {
		return nil, fmt.Errorf("luks: digest iterations %d out of range [%d, %d]", cfg.digestIter, MinIterations, MaxIterations)
	}
	if cfg.slotIter < MinIterations || cfg.slotIter > MaxIterations {
		return nil, fmt.Errorf("luks: slot iterations %d out of range [%d, %d]", cfg.slotIter, MinIterations, MaxIterations)
	}
	// qemu refuses secrets that are not UTF-8; a passphrase only vmbond
	// can use would defeat the point of a standard container.
	if !utf8.Valid(passphrase) {
		return nil, errors.New("luks: passphrase is not valid UTF-8 (qemu could not use it)")
	}
	if cfg.uuid == "" {
		u, err := newUUID(cfg.rand)
		if err != nil {
			return nil, err
		}
		cfg.uuid = u
	}
	if len(cfg.uuid) >= 40 || bytes.IndexByte([]byte(cfg.uuid), 0) >= 0 {
		return nil, fmt.Errorf("luks: invalid UUID %q", cfg.uuid)
	}

	h := &Header{
		CipherName:     "aes",
		CipherMode:     "xts-plain64",
		HashSpec:       "sha256",
		PayloadSectors: DefaultPayloadSectors,
		KeyBytes:       uint32(len(volumeKey)),
		MKDigestIter:   cfg.digestIter,
		UUID:           cfg.uuid,
	}
	if _, err := io.ReadFull(cfg.rand, h.MKDigestSalt[:]); err != nil {
		return nil, fmt.Errorf("luks: reading random digest salt: %w", err)
	}
	dk, err := pbkdf2.Key(sha256.New, string(volumeKey), h.MKDigestSalt[:], int(cfg.digestIter), digestSize)
	if err != nil {
		return nil, fmt.Errorf("luks: deriving volume key digest: %w", err)
	}
	copy(h.MKDigest[:], dk)

	// Lay out all eight slots as cryptsetup does, so that tools adding a
	// key later find the areas they expect; only slot 0 is enabled.
	slotSectors := alignUp(afSectors(len(volumeKey), DefaultStripes), keySlotAlignSectors)
	next := uint32(keySlotAlignSectors)
	for i := range h.Slots {
		h.Slots[i] = KeySlot{KeyMaterialOffset: next, Stripes: DefaultStripes}
		next += slotSectors
	}
	if next > h.PayloadSectors {
		return nil, fmt.Errorf("luks: key slots (%d sectors) overlap payload", next)
	}

	s := &h.Slots[0]
	s.Active = true
	s.Iterations = cfg.slotIter
	if _, err := io.ReadFull(cfg.rand, s.Salt[:]); err != nil {
		return nil, fmt.Errorf("luks: reading random slot salt: %w", err)
	}
	material, err := afSplit(volumeKey, int(s.Stripes), sha256.New, cfg.rand)
	if err != nil {
		return nil, err
	}
	// Pad to whole sectors: the slot cipher works on sectors.
	material = append(material, make([]byte, int(afSectors(len(volumeKey), int(s.Stripes)))*SectorSize-len(material))...)
	slotKey, err := pbkdf2.Key(sha256.New, string(passphrase), s.Salt[:], int(s.Iterations), len(volumeKey))
	if err != nil {
		return nil, fmt.Errorf("luks: deriving slot key: %w", err)
	}
	c, err := xts.New(slotKey)
	if err != nil {
		return nil, fmt.Errorf("luks: slot cipher: %w", err)
	}
	// The IV of key material counts sectors from the start of the slot.
	c.Encrypt(material, material, 0)

	if _, err := w.WriteAt(h.marshal(), 0); err != nil {
		return nil, fmt.Errorf("luks: writing header: %w", err)
	}
	if _, err := w.WriteAt(material, int64(s.KeyMaterialOffset)*SectorSize); err != nil {
		return nil, fmt.Errorf("luks: writing key slot 0: %w", err)
	}
	return h, nil
}

// marshal encodes h in the on-disk layout.
func (h *Header) marshal() []byte {
	b := make([]byte, HeaderSize)
	copy(b[0:6], magic[:])
	binary.BigEndian.PutUint16(b[6:8], 1)
	copy(b[8:40], h.CipherName)
	copy(b[40:72], h.CipherMode)
	copy(b[72:104], h.HashSpec)
	binary.BigEndian.PutUint32(b[104:108], h.PayloadSectors)
	binary.BigEndian.PutUint32(b[108:112], h.KeyBytes)
	copy(b[112:132], h.MKDigest[:])
	copy(b[132:164], h.MKDigestSalt[:])
	binary.BigEndian.PutUint32(b[164:168], h.MKDigestIter)
	copy(b[168:208], h.UUID)
	for i, s := range h.Slots {
		o := 208 + 48*i
		state := uint32(slotDisabled)
		if s.Active {
			state = slotActive
		}
		binary.BigEndian.PutUint32(b[o:], state)
		binary.BigEndian.PutUint32(b[o+4:], s.Iterations)
		copy(b[o+8:o+40], s.Salt[:])
		binary.BigEndian.PutUint32(b[o+40:], s.KeyMaterialOffset)
		binary.BigEndian.PutUint32(b[o+44:], s.Stripes)
	}
	return b
}

// ReadHeader reads and validates a LUKS1 header from r. It treats the bytes
// as hostile: every field is bounds-checked and nothing it allocates depends
// on them.
func ReadHeader(r io.ReaderAt) (*Header, error) {
	var b [HeaderSize]byte
	if n, err := r.ReadAt(b[:], 0); n != len(b) {
		if err == nil || err == io.EOF {
			return nil, fmt.Errorf("%w (only %d bytes)", ErrNotLUKS, n)
		}
		return nil, fmt.Errorf("luks: reading header: %w", err)
	}
	return parseHeader(b[:])
}

func parseHeader(b []byte) (*Header, error) {
	if !bytes.Equal(b[0:6], magic[:]) {
		return nil, fmt.Errorf("%w (bad magic)", ErrNotLUKS)
	}
	if v := binary.BigEndian.Uint16(b[6:8]); v != 1 {
		return nil, fmt.Errorf("%w (version %d)", ErrNotLUKS, v)
	}
	h := &Header{
		PayloadSectors: binary.BigEndian.Uint32(b[104:108]),
		KeyBytes:       binary.BigEndian.Uint32(b[108:112]),
		MKDigestIter:   binary.BigEndian.Uint32(b[164:168]),
	}
	var err error
	if h.CipherName, err = cString(b[8:40], "cipher name"); err != nil {
		return nil, err
	}
	if h.CipherMode, err = cString(b[40:72], "cipher mode"); err != nil {
		return nil, err
	}
	if h.HashSpec, err = cString(b[72:104], "hash spec"); err != nil {
		return nil, err
	}
	if h.UUID, err = cString(b[168:208], "UUID"); err != nil {
		return nil, err
	}
	copy(h.MKDigest[:], b[112:132])
	copy(h.MKDigestSalt[:], b[132:164])

	if h.KeyBytes == 0 || h.KeyBytes > maxKeyBytes {
		return nil, fmt.Errorf("luks: key bytes %d out of range [1, %d]", h.KeyBytes, maxKeyBytes)
	}
	if h.MKDigestIter == 0 || h.MKDigestIter > MaxIterations {
		return nil, fmt.Errorf("luks: digest iterations %d out of range [1, %d]", h.MKDigestIter, MaxIterations)
	}
	// The payload must start after the header. A payload offset of 0 means
	// a detached header, which vmbond does not use.
	if int64(h.PayloadSectors)*SectorSize < HeaderSize {
		return nil, fmt.Errorf("luks: payload offset %d sectors overlaps header", h.PayloadSectors)
	}

	type span struct{ start, end uint64 }
	var used []span
	for i := range h.Slots {
		o := 208 + 48*i
		s := &h.Slots[i]
		switch state := binary.BigEndian.Uint32(b[o:]); state {
		case slotActive:
			s.Active = true
		case slotDisabled:
		default:
			return nil, fmt.Errorf("luks: key slot %d has invalid state %#x", i, state)
		}
		s.Iterations = binary.BigEndian.Uint32(b[o+4:])
		copy(s.Salt[:], b[o+8:o+40])
		s.KeyMaterialOffset = binary.BigEndian.Uint32(b[o+40:])
		s.Stripes = binary.BigEndian.Uint32(b[o+44:])
		if !s.Active {
			// Disabled slots carry no meaning; cryptsetup ignores them.
			continue
		}
		if s.Iterations == 0 || s.Iterations > MaxIterations {
			return nil, fmt.Errorf("luks: key slot %d iterations %d out of range [1, %d]", i, s.Iterations, MaxIterations)
		}
		if s.Stripes == 0 || s.Stripes > MaxStripes {
			return nil, fmt.Errorf("luks: key slot %d stripes %d out of range [1, %d]", i, s.Stripes, MaxStripes)
		}
		start := uint64(s.KeyMaterialOffset)
		end := start + uint64(afSectors(int(h.KeyBytes), int(s.Stripes)))
		if start*SectorSize < HeaderSize {
			return nil, fmt.Errorf("luks: key slot %d material at sector %d overlaps header", i, start)
		}
		if end > uint64(h.PayloadSectors) {
			return nil, fmt.Errorf("luks: key slot %d material [%d, %d) overlaps payload at sector %d", i, start, end, h.PayloadSectors)
		}
		for _, u := range used {
			if start < u.end && u.start < end {
				return nil, fmt.Errorf("luks: key slot %d material overlaps another slot", i)
			}
		}
		used = append(used, span{start, end})
	}
	return h, nil
}

// cString returns the NUL-terminated string in b, which must contain a NUL.
func cString(b []byte, what string) (string, error) {
	i := bytes.IndexByte(b, 0)
	if i < 0 {
		return "", fmt.Errorf("luks: %s is not NUL-terminated", what)
	}
	for _, c := range b[:i] {
		if c < 0x20 || c > 0x7e {
			return "", fmt.Errorf("luks: %s contains non-printable byte %#x", what, c)
		}
	}
	return string(b[:i]), nil
}

// hashFunc maps a LUKS hash spec to its implementation.
func hashFunc(spec string) (func() hash.Hash, error) {
	switch spec {
	case "sha256":
		return sha256.New, nil
	case "sha1":
		return sha1.New, nil
	case "sha512":
		return sha512.New, nil
	}
	return nil, fmt.Errorf("luks: unsupported hash %q", spec)
}

// CheckCipher reports whether vmbond can decrypt with h's cipher:
// aes-xts-plain64 with a 256- or 512-bit key.
func (h *Header) CheckCipher() error {
	if h.CipherName != "aes" || h.CipherMode != "xts-plain64" {
		return fmt.Errorf("luks: unsupported cipher %s-%s, want aes-xts-plain64", h.CipherName, h.CipherMode)
	}
	if h.KeyBytes != 32 && h.KeyBytes != 64 {
		return fmt.Errorf("luks: unsupported key size %d bytes for aes-xts", h.KeyBytes)
	}
	return nil
}

// VerifyVolumeKey reports whether key is the volume key of h, by recomputing
// the header's PBKDF2 digest. It returns an error wrapping ErrWrongKey if it
// is not.
func (h *Header) VerifyVolumeKey(key []byte) error {
	if len(key) != int(h.KeyBytes) {
		return fmt.Errorf("%w: key is %d bytes, header wants %d", ErrWrongKey, len(key), h.KeyBytes)
	}
	hf, err := hashFunc(h.HashSpec)
	if err != nil {
		return err
	}
	dk, err := pbkdf2.Key(hf, string(key), h.MKDigestSalt[:], int(h.MKDigestIter), digestSize)
	if err != nil {
		return fmt.Errorf("luks: deriving volume key digest: %w", err)
	}
	if subtle.ConstantTimeCompare(dk, h.MKDigest[:]) != 1 {
		return ErrWrongKey
	}
	return nil
}

// Unlock recovers the volume key from the first active key slot that
// passphrase opens, reading key material from r (the image the header came
// from). It returns an error wrapping ErrWrongKey if no slot opens.
func (h *Header) Unlock(r io.ReaderAt, passphrase []byte) ([]byte, error) {
	if err := h.CheckCipher(); err != nil {
		return nil, err
	}
	hf, err := hashFunc(h.HashSpec)
	if err != nil {
		return nil, err
	}
	for i := range h.Slots {
		s := &h.Slots[i]
		if !s.Active {
			continue
		}
		key, err := h.unlockSlot(r, s, hf, passphrase)
		if err != nil {
			return nil, fmt.Errorf("luks: key slot %d: %w", i, err)
		}
		if err := h.VerifyVolumeKey(key); err == nil {
			return key, nil
		} else if !errors.Is(err, ErrWrongKey) {
			return nil, err
		}
	}
	return nil, ErrWrongKey
}

func (h *Header) unlockSlot(r io.ReaderAt, s *KeySlot, hf func() hash.Hash, passphrase []byte) ([]byte, error) {
	// Sizes were bounded by parseHeader: at most MaxStripes*64 bytes.
	n := int(afSectors(int(h.KeyBytes), int(s.Stripes))) * SectorSize
	material := make([]byte, n)
	if _, err := r.ReadAt(material, int64(s.KeyMaterialOffset)*SectorSize); err != nil {
		return nil, fmt.Errorf("reading key material: %w", err)
	}
	slotKey, err := pbkdf2.Key(hf, string(passphrase), s.Salt[:], int(s.Iterations), int(h.KeyBytes))
	if err != nil {
		return nil, fmt.Errorf("deriving slot key: %w", err)
	}
	c, err := xts.New(slotKey)
	if err != nil {
		return nil, fmt.Errorf("slot cipher: %w", err)
	}
	c.Decrypt(material, material, 0)
	return afMerge(material[:int(h.KeyBytes)*int(s.Stripes)], int(h.KeyBytes), int(s.Stripes), hf), nil
}

// afSectors returns the sectors AF-split material of keyBytes*stripes takes.
func afSectors(keyBytes, stripes int) uint32 {
	return uint32((keyBytes*stripes + SectorSize - 1) / SectorSize)
}

func alignUp(n, a uint32) uint32 { return (n + a - 1) / a * a }

// afSplit implements the specification's anti-forensic splitter: stripes-1
// random blocks, and a last block that is the key XORed with the diffused
// XOR-chain of the random ones.
func afSplit(key []byte, stripes int, hf func() hash.Hash, rnd io.Reader) ([]byte, error) {
	n := len(key)
	out := make([]byte, n*stripes)
	if _, err := io.ReadFull(rnd, out[:n*(stripes-1)]); err != nil {
		return nil, fmt.Errorf("luks: reading random AF stripes: %w", err)
	}
	d := make([]byte, n)
	for i := 0; i < stripes-1; i++ {
		subtle.XORBytes(d, d, out[i*n:(i+1)*n])
		diffuse(d, hf)
	}
	subtle.XORBytes(out[(stripes-1)*n:], d, key)
	return out, nil
}

// afMerge inverts afSplit.
func afMerge(material []byte, n, stripes int, hf func() hash.Hash) []byte {
	d := make([]byte, n)
	for i := 0; i < stripes-1; i++ {
		subtle.XORBytes(d, d, material[i*n:(i+1)*n])
		diffuse(d, hf)
	}
	key := make([]byte, n)
	subtle.XORBytes(key, d, material[(stripes-1)*n:])
	return key
}

// diffuse replaces each digest-sized chunk j of d with H(be32(j) || chunk),
// truncating the last one.
func diffuse(d []byte, hf func() hash.Hash) {
	h := hf()
	ds := h.Size()
	var idx [4]byte
	var sum [sha512.Size]byte
	for j := 0; j*ds < len(d); j++ {
		chunk := d[j*ds : min((j+1)*ds, len(d))]
		h.Reset()
		binary.BigEndian.PutUint32(idx[:], uint32(j))
		h.Write(idx[:])
		h.Write(chunk)
		copy(chunk, h.Sum(sum[:0]))
	}
}

// newUUID returns a random RFC 4122 version 4 UUID.
func newUUID(rnd io.Reader) (string, error) {
	var u [16]byte
	if _, err := io.ReadFull(rnd, u[:]); err != nil {
		return "", fmt.Errorf("luks: reading random UUID: %w", err)
	}
	u[6] = u[6]&0x0f | 0x40
	u[8] = u[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16]), nil
}
