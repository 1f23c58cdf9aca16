// Package ca owns the security officer's offline roots and the certificates
// they issue: the host CA, which says which agents are real, and its key files.
// Verification needs only public keys, so it runs anywhere; signing runs only
// where the officer keeps the CA key.
package ca

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/vmbond/vmbond/internal/fsutil"
	"github.com/vmbond/vmbond/internal/proto"
)

// File names inside a CA directory.
const (
	HostKeyFile = "host-ca.key"
	HostPubFile = "host-ca.pub"
)

// DefaultHostValidity is how long a host certificate lasts unless told.
const DefaultHostValidity = 365 * 24 * time.Hour

// Init creates a CA directory with a new host CA key. It refuses to overwrite
// an existing CA: losing the CA key would orphan every host certificate.
func Init(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create CA directory %s: %w", dir, err)
	}
	keyPath := filepath.Join(dir, HostKeyFile)
	if _, err := os.Stat(keyPath); err == nil {
		return fmt.Errorf("CA already initialised in %s (refusing to overwrite %s)", dir, HostKeyFile)
	}
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return fmt.Errorf("generate host CA key: %w", err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return fmt.Errorf("encode host CA key: %w", err)
	}
	if err := fsutil.WriteFileAtomic(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		return err
	}
	return fsutil.WriteFileAtomic(filepath.Join(dir, HostPubFile), EncodePublicKey(pub), 0o644)
}

// EncodePublicKey writes an Ed25519 public key as PEM.
func EncodePublicKey(pub ed25519.PublicKey) []byte {
	der, _ := x509.MarshalPKIXPublicKey(pub) // cannot fail for ed25519
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
}

// ParsePublicKey reads a PEM Ed25519 public key.
func ParsePublicKey(b []byte) (ed25519.PublicKey, error) {
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "PUBLIC KEY" {
		return nil, errors.New("not a PEM public key")
	}
	k, err := x509.ParsePKIXPublicKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parse public key: %w", err)
	}
	pub, ok := k.(ed25519.PublicKey)
	if !ok {
		return nil, fmt.Errorf("public key is %T, want Ed25519", k)
	}
	return pub, nil
}

// LoadPrivateKey reads a PEM PKCS#8 Ed25519 private key file.
func LoadPrivateKey(path string) (ed25519.PrivateKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read key %s: %w", path, err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("read key %s: not a PEM private key", path)
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("read key %s: %w", path, err)
	}
	priv, ok := k.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("read key %s: key is %T, want Ed25519", path, k)
	}
	return priv, nil
}

// EncodePrivateKey writes an Ed25519 private key as PEM PKCS#8.
func EncodePrivateKey(priv ed25519.PrivateKey) []byte {
	der, _ := x509.MarshalPKCS8PrivateKey(priv) // cannot fail for ed25519
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

// SignHost certifies an agent's identity with the host CA key in dir.
func SignHost(dir string, id proto.HostIdentity, contexts []string, validity time.Duration, now time.Time) (*proto.HostCert, error) {
	if err := proto.ValidID("host", id.HostID); err != nil {
		return nil, err
	}
	if len(id.SigningKey) != ed25519.PublicKeySize || len(id.SealKey) == 0 {
		return nil, fmt.Errorf("host %s identity lacks a signing or seal key", id.HostID)
	}
	priv, err := LoadPrivateKey(filepath.Join(dir, HostKeyFile))
	if err != nil {
		return nil, fmt.Errorf("sign host %s: %w", id.HostID, err)
	}
	serial := make([]byte, 16)
	rand.Read(serial)
	body, err := json.Marshal(proto.HostCertBody{
		Version:   proto.Version,
		Identity:  id,
		Contexts:  contexts,
		Serial:    hex.EncodeToString(serial),
		NotBefore: now.UTC().Add(-5 * time.Minute),
		NotAfter:  now.UTC().Add(validity),
	})
	if err != nil {
		return nil, fmt.Errorf("sign host %s: %w", id.HostID, err)
	}
	return &proto.HostCert{Body: body, Sig: ed25519.Sign(priv, body)}, nil
}

// VerifyHost checks a host certificate against the pinned host CA key and
// returns its body. A certificate the CA did not sign, or out of its validity
// period, is refused.
func VerifyHost(caPub ed25519.PublicKey, c *proto.HostCert, now time.Time) (*proto.HostCertBody, error) {
	if c == nil || !ed25519.Verify(caPub, c.Body, c.Sig) {
		return nil, errors.New("host certificate is not signed by the pinned host CA")
	}
	var b proto.HostCertBody
	if err := proto.DecodeStrict(c.Body, &b); err != nil {
		return nil, fmt.Errorf("decode host certificate: %w", err)
	}
	if b.Version != proto.Version {
		return nil, fmt.Errorf("host certificate version %q, want %q", b.Version, proto.Version)
	}
	if now.Before(b.NotBefore) || now.After(b.NotAfter) {
		return nil, fmt.Errorf("host certificate for %s is valid %s to %s, not now", b.Identity.HostID,
			b.NotBefore.Format(time.RFC3339), b.NotAfter.Format(time.RFC3339))
	}
	if len(b.Identity.SigningKey) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("host certificate for %s has a bad signing key", b.Identity.HostID)
	}
	return &b, nil
}
