package admin

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"time"

	"github.com/vmbond/vmbond/internal/ca"
	"github.com/vmbond/vmbond/internal/proto"
)

// Credential lifetimes. Credentials are short-lived on purpose: an account
// nobody remembers to revoke stops working on its own within a day.
const (
	DefaultValidity    = 24 * time.Hour
	DefaultMaxValidity = 7 * 24 * time.Hour
	// credentialBackdate tolerates agents whose clocks run a little behind.
	credentialBackdate = 5 * time.Minute
)

// CredentialBody is what the admin CA signs: who the admin is, which roles
// they hold, the key they sign requests with, and until when.
type CredentialBody struct {
	Version   string            `json:"version"`
	Name      string            `json:"name"`
	Roles     []string          `json:"roles,omitempty"`
	Key       ed25519.PublicKey `json:"key"` // the admin's Ed25519 public key
	Serial    string            `json:"serial"`
	NotBefore time.Time         `json:"not_before"`
	NotAfter  time.Time         `json:"not_after"`
}

// HasRole reports whether the credential grants role.
func (b *CredentialBody) HasRole(role string) bool {
	return slices.Contains(b.Roles, role)
}

// Credential is an admin credential: the exact body bytes and the admin CA's
// signature over them.
type Credential struct {
	Body []byte `json:"body"` // JSON of CredentialBody
	Sig  []byte `json:"sig"`
}

// SignCredential issues a credential for the admin name, holding roles, for
// the key adminPub, with the admin CA key in caDir. A zero validity means
// DefaultValidity and a zero maxValidity means DefaultMaxValidity; a validity
// above the maximum is refused.
func SignCredential(caDir string, name string, roles []string, adminPub ed25519.PublicKey, validity, maxValidity time.Duration, now time.Time) (*Credential, error) {
	if err := proto.ValidID("admin", name); err != nil {
		return nil, fmt.Errorf("sign credential: %w", err)
	}
	if validity == 0 {
		validity = DefaultValidity
	}
	if maxValidity == 0 {
		maxValidity = DefaultMaxValidity
	}
	if validity < 0 || maxValidity < 0 {
		return nil, fmt.Errorf("sign credential for %s: negative validity", name)
	}
	if validity > maxValidity {
		return nil, fmt.Errorf("sign credential for %s: validity %s exceeds the maximum %s",
			name, fmtDuration(validity), fmtDuration(maxValidity))
	}
	for i, r := range roles {
		if err := proto.ValidID("role", r); err != nil {
			return nil, fmt.Errorf("sign credential for %s: %w", name, err)
		}
		if slices.Contains(roles[:i], r) {
			return nil, fmt.Errorf("sign credential for %s: role %q listed twice", name, r)
		}
	}
	if len(adminPub) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("sign credential for %s: admin key is %d bytes, want %d", name, len(adminPub), ed25519.PublicKeySize)
	}
	priv, err := ca.LoadPrivateKey(filepath.Join(caDir, CAKeyFile))
	if err != nil {
		return nil, fmt.Errorf("sign credential for %s: %w", name, err)
	}
	serial := make([]byte, 16)
	if _, err := rand.Read(serial); err != nil {
		return nil, fmt.Errorf("sign credential for %s: %w", name, err)
	}
	body, err := json.Marshal(CredentialBody{
		Version:   proto.Version,
		Name:      name,
		Roles:     slices.Clone(roles),
		Key:       slices.Clone(adminPub),
		Serial:    hex.EncodeToString(serial),
		NotBefore: now.UTC().Add(-credentialBackdate),
		NotAfter:  now.UTC().Add(validity),
	})
	if err != nil {
		return nil, fmt.Errorf("sign credential for %s: %w", name, err)
	}
	sig, err := sign(priv, ctxCredential, body)
	if err != nil {
		return nil, fmt.Errorf("sign credential for %s: %w", name, err)
	}
	return &Credential{Body: body, Sig: sig}, nil
}

// VerifyCredential checks a credential against the pinned admin CA key and
// the time now, and returns its body. It does not consult revocation; see
// RevocationState.Check.
func VerifyCredential(caPub ed25519.PublicKey, cred *Credential, now time.Time) (*CredentialBody, error) {
	if err := checkCAPub(caPub); err != nil {
		return nil, err
	}
	if cred == nil {
		return nil, errors.New("no admin credential")
	}
	if !verify(caPub, ctxCredential, cred.Body, cred.Sig) {
		return nil, errors.New("admin credential is not signed by the pinned admin CA")
	}
	b, err := decodeCredential(cred.Body)
	if err != nil {
		return nil, err
	}
	if now.Before(b.NotBefore) {
		return nil, fmt.Errorf("credential of %s is not valid until %s", b.Name, stamp(b.NotBefore))
	}
	if now.After(b.NotAfter) {
		return nil, fmt.Errorf("credential of %s expired at %s", b.Name, stamp(b.NotAfter))
	}
	return b, nil
}

// decodeCredential parses and checks a credential body's fields. It
// authenticates nothing.
func decodeCredential(body []byte) (*CredentialBody, error) {
	var b CredentialBody
	if err := proto.DecodeStrict(body, &b); err != nil {
		return nil, fmt.Errorf("decode admin credential: %w", err)
	}
	if b.Version != proto.Version {
		return nil, fmt.Errorf("admin credential version %q, want %q", b.Version, proto.Version)
	}
	if err := proto.ValidID("admin", b.Name); err != nil {
		return nil, fmt.Errorf("admin credential: %w", err)
	}
	if len(b.Key) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("credential of %s has a bad key (%d bytes)", b.Name, len(b.Key))
	}
	if err := validSerial(b.Serial); err != nil {
		return nil, fmt.Errorf("credential of %s: %w", b.Name, err)
	}
	if !b.NotBefore.Before(b.NotAfter) {
		return nil, fmt.Errorf("credential of %s has an empty validity period", b.Name)
	}
	return &b, nil
}

// credentialFor parses an admin's own credential and checks that it is for
// the key priv: a client-side sanity check before signing anything with it.
func credentialFor(priv ed25519.PrivateKey, cred *Credential) (*CredentialBody, error) {
	if cred == nil {
		return nil, errors.New("no admin credential")
	}
	if len(priv) != ed25519.PrivateKeySize {
		return nil, fmt.Errorf("admin private key is %d bytes, want %d", len(priv), ed25519.PrivateKeySize)
	}
	b, err := decodeCredential(cred.Body)
	if err != nil {
		return nil, err
	}
	if !b.Key.Equal(priv.Public()) {
		return nil, fmt.Errorf("credential of %s is for a different key than the one signing", b.Name)
	}
	return b, nil
}
