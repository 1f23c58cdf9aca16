// Package admin owns admin identity and the signatures that let host agents
// enforce the insider guardrails: the admin CA, the short-lived credentials it
// issues, the revocation lists that withdraw them, the requests an admin signs
// for every operation and the approvals other admins sign so that no single
// insider can destroy what is not theirs.
//
// Every object here is exact JSON body bytes plus an Ed25519 signature, so it
// can travel through the untrusted management server unchanged. Signatures use
// Ed25519ctx (RFC 8032) with a distinct context string per kind of object, so
// bytes signed as one kind can never be presented as another.
//
// The package never holds tenant keys. Verification needs only public keys,
// which makes it safe for the server to link; it must not import crypto/hpke,
// crypto/hkdf or internal/bond. Signing a credential or a revocation list runs
// only where the security officer keeps the admin CA key; signing a request or
// an approval runs only on the admin's own machine.
package admin

import (
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/vmbond/vmbond/internal/ca"
	"github.com/vmbond/vmbond/internal/fsutil"
)

// File names. The admin CA lives in the same directory as the host CA, in
// files of its own; an admin's key pair lives on the admin's machine.
const (
	CAKeyFile  = "admin-ca.key"
	CAPubFile  = "admin-ca.pub"
	KeyFile    = "admin.key"
	PubFile    = "admin.pub"
	keyFileMod = 0o600
	pubFileMod = 0o644
)

// InitCA creates the admin CA key pair in the CA directory dir, next to the
// host CA. It refuses to overwrite an existing admin CA key or public key:
// replacing either would silently invalidate every credential and every agent
// that pinned the old key.
func InitCA(dir string) error {
	if err := writeKeyPair(dir, CAKeyFile, CAPubFile); err != nil {
		return fmt.Errorf("init admin CA: %w", err)
	}
	return nil
}

// GenerateKey creates an admin's own key pair, admin.key and admin.pub, in
// dir on the admin's machine, and returns the path of the public key to send
// to the security officer. It refuses to overwrite an existing key.
func GenerateKey(dir string) (pubPath string, err error) {
	if err := writeKeyPair(dir, KeyFile, PubFile); err != nil {
		return "", fmt.Errorf("generate admin key: %w", err)
	}
	return filepath.Join(dir, PubFile), nil
}

// writeKeyPair creates dir (0700) and a new Ed25519 key pair in it, the
// private key 0600 and the public key 0644, refusing to replace either file.
// Like ca.Init it checks before writing; two concurrent calls on one
// directory are not guarded against.
func writeKeyPair(dir, keyName, pubName string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create directory %s: %w", dir, err)
	}
	keyPath, pubPath := filepath.Join(dir, keyName), filepath.Join(dir, pubName)
	for _, p := range []string{keyPath, pubPath} {
		if _, err := os.Lstat(p); err == nil {
			return fmt.Errorf("%s already exists (refusing to overwrite)", p)
		} else if !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("check %s: %w", p, err)
		}
	}
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return fmt.Errorf("generate key: %w", err)
	}
	if err := fsutil.WriteFileAtomic(keyPath, ca.EncodePrivateKey(priv), keyFileMod); err != nil {
		return err
	}
	if err := fsutil.WriteFileAtomic(pubPath, ca.EncodePublicKey(pub), pubFileMod); err != nil {
		// Without its public half the new key is useless, and left behind it
		// would block a retry.
		os.Remove(keyPath)
		return err
	}
	return nil
}
