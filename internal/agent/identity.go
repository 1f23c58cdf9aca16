package agent

import (
	"crypto/ed25519"
	"crypto/hpke"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	"github.com/vmbond/vmbond/internal/bond"
	"github.com/vmbond/vmbond/internal/ca"
	"github.com/vmbond/vmbond/internal/fsutil"
	"github.com/vmbond/vmbond/internal/proto"
)

// Files of the agent's identity inside its data directory.
const (
	signingKeyFile = "host-signing.key" // Ed25519, PEM PKCS#8, 0600
	sealKeyFile    = "host-seal.key"    // HPKE private key bytes, 0600
	IdentityFile   = "identity.json"    // public proto.HostIdentity
	CertFile       = "host.cert"        // proto.HostCert from the host CA
)

type identity struct {
	public  proto.HostIdentity
	signer  ed25519.PrivateKey
	sealKey hpke.PrivateKey
}

// InitIdentity creates the host's keys in dataDir if they do not exist and
// returns the public identity to have certified. It never replaces existing
// keys: that would strand every disk key sealed to this host.
func InitIdentity(dataDir, hostID string) (*proto.HostIdentity, error) {
	if err := proto.ValidID("host", hostID); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		return nil, fmt.Errorf("create agent data directory: %w", err)
	}
	if _, err := os.Stat(filepath.Join(dataDir, sealKeyFile)); err == nil {
		id, err := loadIdentity(dataDir)
		if err != nil {
			return nil, err
		}
		if id.public.HostID != hostID {
			return nil, fmt.Errorf("this agent is already host %q; refusing to become %q", id.public.HostID, hostID)
		}
		return &id.public, nil
	}
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate host signing key: %w", err)
	}
	seal, err := bond.GenerateHostKey()
	if err != nil {
		return nil, fmt.Errorf("generate host seal key: %w", err)
	}
	sealBytes, err := seal.Bytes()
	if err != nil {
		return nil, fmt.Errorf("encode host seal key: %w", err)
	}
	id := proto.HostIdentity{HostID: hostID, SigningKey: pub, KEM: bond.KEM().ID(), SealKey: seal.PublicKey().Bytes()}
	idJSON, err := json.MarshalIndent(id, "", "  ")
	if err != nil {
		return nil, err
	}
	for _, f := range []struct {
		name string
		data []byte
		perm os.FileMode
	}{
		{signingKeyFile, ca.EncodePrivateKey(priv), 0o600},
		{sealKeyFile, sealBytes, 0o600},
		{IdentityFile, append(idJSON, '\n'), 0o644},
	} {
		if err := fsutil.WriteFileAtomic(filepath.Join(dataDir, f.name), f.data, f.perm); err != nil {
			return nil, fmt.Errorf("save host identity: %w", err)
		}
	}
	return &id, nil
}

func loadIdentity(dataDir string) (*identity, error) {
	b, err := os.ReadFile(filepath.Join(dataDir, IdentityFile))
	if err != nil {
		return nil, fmt.Errorf("load host identity (run `vmbond agent init` first): %w", err)
	}
	var id identity
	if err := proto.DecodeStrict(b, &id.public); err != nil {
		return nil, fmt.Errorf("load host identity: %w", err)
	}
	if id.signer, err = ca.LoadPrivateKey(filepath.Join(dataDir, signingKeyFile)); err != nil {
		return nil, fmt.Errorf("load host identity: %w", err)
	}
	sb, err := os.ReadFile(filepath.Join(dataDir, sealKeyFile))
	if err != nil {
		return nil, fmt.Errorf("load host identity: %w", err)
	}
	if id.sealKey, err = bond.KEM().NewPrivateKey(sb); err != nil {
		return nil, fmt.Errorf("load host seal key: %w", err)
	}
	if !ed25519.PublicKey(id.public.SigningKey).Equal(id.signer.Public()) {
		return nil, fmt.Errorf("load host identity: %s does not match %s", IdentityFile, signingKeyFile)
	}
	return &id, nil
}

// InstallCert checks that a certificate certifies this agent's identity and
// stores it.
func InstallCert(dataDir string, cert []byte) error {
	id, err := loadIdentity(dataDir)
	if err != nil {
		return err
	}
	var c proto.HostCert
	if err := proto.DecodeStrict(cert, &c); err != nil {
		return fmt.Errorf("install host certificate: %w", err)
	}
	var body proto.HostCertBody
	if err := proto.DecodeStrict(c.Body, &body); err != nil {
		return fmt.Errorf("install host certificate: %w", err)
	}
	mine, _ := json.Marshal(id.public)
	theirs, _ := json.Marshal(body.Identity)
	if string(mine) != string(theirs) {
		return fmt.Errorf("install host certificate: it certifies host %q with other keys, not this agent", body.Identity.HostID)
	}
	return fsutil.WriteFileAtomic(filepath.Join(dataDir, CertFile), cert, 0o644)
}
