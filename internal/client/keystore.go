package client

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/vmbond/vmbond/internal/fsutil"
	"github.com/vmbond/vmbond/internal/proto"
)

// Config is the tenant's (or admin's) client configuration.
type Config struct {
	Server string `json:"server"`
	Token  string `json:"token"`
	Tenant string `json:"tenant,omitempty"`
	// HostCA is the pinned host CA public key (PEM). Hosts it did not
	// certify are refused.
	HostCA string `json:"host_ca"`
	// Admins only: the admin's private key file and the credential the
	// admin CA issued for it. Agents verify both; the server cannot.
	AdminKey  string `json:"admin_key,omitempty"`
	AdminCred string `json:"admin_cred,omitempty"`
}

// VMKey is what the keystore holds for one VM. DiskKey is the only copy of
// the key outside the host's memory: lose it and the disk is lost.
type VMKey struct {
	ID       string `json:"id"`
	Name     string `json:"name"`
	Tenant   string `json:"tenant"`
	Host     string `json:"host"`
	HostSign []byte `json:"host_signing_key"` // pinned Ed25519 key of Host
	DiskKey  []byte `json:"disk_key"`
	Spec     []byte `json:"spec"`
}

// Keystore is a directory only its owner can read: config.json and keys/.
type Keystore struct {
	Dir string
}

// DefaultDir is $VMBOND_HOME, else ~/.vmbond.
func DefaultDir() string {
	if d := os.Getenv("VMBOND_HOME"); d != "" {
		return d
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return ".vmbond"
	}
	return filepath.Join(home, ".vmbond")
}

func (k *Keystore) ensure() error {
	if err := os.MkdirAll(filepath.Join(k.Dir, "keys"), 0o700); err != nil {
		return fmt.Errorf("create keystore %s: %w", k.Dir, err)
	}
	return os.Chmod(k.Dir, 0o700)
}

// LoadConfig reads config.json.
func (k *Keystore) LoadConfig() (*Config, error) {
	b, err := os.ReadFile(filepath.Join(k.Dir, "config.json"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("no client configuration in %s: run `vmbond login` first", k.Dir)
	}
	if err != nil {
		return nil, fmt.Errorf("read client configuration: %w", err)
	}
	var c Config
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, fmt.Errorf("read client configuration %s: %w", filepath.Join(k.Dir, "config.json"), err)
	}
	return &c, nil
}

// SaveConfig writes config.json (0600).
func (k *Keystore) SaveConfig(c *Config) error {
	if err := k.ensure(); err != nil {
		return err
	}
	b, _ := json.MarshalIndent(c, "", "  ")
	return fsutil.WriteFileAtomic(filepath.Join(k.Dir, "config.json"), append(b, '\n'), 0o600)
}

func (k *Keystore) keyPath(id string) string { return filepath.Join(k.Dir, "keys", id+".json") }

// SaveKey writes a VM's key file (0600) durably before anything is sent: a
// key that reached the host but not the keystore would be a lost disk.
func (k *Keystore) SaveKey(v *VMKey) error {
	if err := k.ensure(); err != nil {
		return err
	}
	b, _ := json.MarshalIndent(v, "", "  ")
	return fsutil.WriteFileAtomic(k.keyPath(v.ID), append(b, '\n'), 0o600)
}

// Keys returns every VM key in the keystore.
func (k *Keystore) Keys() ([]*VMKey, error) {
	ents, err := os.ReadDir(filepath.Join(k.Dir, "keys"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read keystore: %w", err)
	}
	var out []*VMKey
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".json") || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(k.Dir, "keys", e.Name()))
		if err != nil {
			return nil, fmt.Errorf("read key %s: %w", e.Name(), err)
		}
		var v VMKey
		if err := json.Unmarshal(b, &v); err != nil {
			return nil, fmt.Errorf("read key %s: %w", e.Name(), err)
		}
		out = append(out, &v)
	}
	slices.SortFunc(out, func(a, b *VMKey) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// Key finds a VM's key by name or ID.
func (k *Keystore) Key(nameOrID string) (*VMKey, error) {
	keys, err := k.Keys()
	if err != nil {
		return nil, err
	}
	for _, v := range keys {
		if v.ID == nameOrID || v.Name == nameOrID {
			return v, nil
		}
	}
	return nil, fmt.Errorf("no key for VM %q in keystore %s (was it created from another machine? import its backup with `vmbond key import`)", nameOrID, k.Dir)
}

// RemoveKey deletes a VM's key file. Callers do this only after the tenant
// confirmed, since it destroys the disk for good.
func (k *Keystore) RemoveKey(id string) error { return os.Remove(k.keyPath(id)) }

// Backup is a portable copy of keys for `vmbond key export/import`.
type Backup struct {
	Version string   `json:"version"`
	Keys    []*VMKey `json:"keys"`
}

// Import adds the keys of a backup, refusing to overwrite a different key
// with the same ID.
func (k *Keystore) Import(b *Backup) (int, error) {
	if b.Version != proto.Version {
		return 0, fmt.Errorf("backup version %q, want %q", b.Version, proto.Version)
	}
	n := 0
	for _, v := range b.Keys {
		if err := proto.ValidID("vm", v.ID); err != nil {
			return n, err
		}
		if old, err := k.Key(v.ID); err == nil {
			if string(old.DiskKey) != string(v.DiskKey) {
				return n, fmt.Errorf("keystore already has a different key for VM %s; refusing to overwrite", v.ID)
			}
			continue
		}
		if err := k.SaveKey(v); err != nil {
			return n, err
		}
		n++
	}
	return n, nil
}
