package server

import (
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/vmbond/vmbond/internal/proto"
)

// Bucket names of the server database. Every value is JSON.
const (
	bucketMeta    = "meta"    // adminTokenKey -> hex SHA-256 of the admin token
	bucketTenants = "tenants" // tenant name -> tenantRecord
	bucketTokens  = "tokens"  // hex SHA-256 of a tenant token -> tenant name
	bucketHosts   = "hosts"   // host id -> hostRecord
	bucketVMs     = "vms"     // vm id -> vmRecord
	bucketClaims  = "claims"  // vm id -> tenant name that uploaded files for it
	// bucketAdmin holds the admin plane: revocationsKey -> the newest
	// revocation list received (exact bytes, not JSON-wrapped).
	bucketAdmin    = "admin"
	bucketRequests = "requests" // request id -> requestRecord
	bucketDeletes  = "deletes"  // admin name -> []time.Time of relayed deletes
)

const revocationsKey = "revocations"

const adminTokenKey = "admin_token_sha256"

// VM states the server itself records. Live states come from the agents.
const (
	stateRegistering = "registering"
	stateRegistered  = "registered"
	stateDeleted     = "deleted"
)

// Errors the store reports; handlers map them to HTTP answers.
var (
	errExists   = errors.New("already exists")
	errNotFound = errors.New("not found")
)

// conflictError explains why a VM id or name cannot be used.
type conflictError struct{ msg string }

func (e *conflictError) Error() string { return e.msg }

type tenantRecord struct {
	Name        string    `json:"name"`
	TokenSHA256 string    `json:"token_sha256"`
	Created     time.Time `json:"created"`
}

type hostRecord struct {
	ID       string         `json:"id"`
	URL      string         `json:"url"`
	Cert     proto.HostCert `json:"cert"`
	Enrolled time.Time      `json:"enrolled"`
}

type vmRecord struct {
	ID           string             `json:"id"`
	Name         string             `json:"name"`
	Tenant       string             `json:"tenant"`
	Host         string             `json:"host"`
	Spec         []byte             `json:"spec"` // exact spec bytes of the registration
	Registration proto.Registration `json:"registration"`
	State        string             `json:"state"`
	Created      time.Time          `json:"created"`
}

// store is the server's bbolt database.
type store struct {
	db *bolt.DB
}

func openStore(path string) (*store, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 5 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("open database %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range []string{bucketMeta, bucketTenants, bucketTokens, bucketHosts, bucketVMs, bucketClaims, bucketAdmin, bucketRequests, bucketDeletes} {
			if _, err := tx.CreateBucketIfNotExists([]byte(b)); err != nil {
				return fmt.Errorf("create bucket %s: %w", b, err)
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("initialise database %s: %w", path, err)
	}
	return &store{db: db}, nil
}

func (s *store) close() error { return s.db.Close() }

func getJSON(b *bolt.Bucket, key string, v any) (bool, error) {
	raw := b.Get([]byte(key))
	if raw == nil {
		return false, nil
	}
	if err := json.Unmarshal(raw, v); err != nil {
		return false, fmt.Errorf("decode record %q: %w", key, err)
	}
	return true, nil
}

func putJSON(b *bolt.Bucket, key string, v any) error {
	raw, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode record %q: %w", key, err)
	}
	return b.Put([]byte(key), raw)
}

// adminTokenHash returns the stored admin token hash, or "" if none.
func (s *store) adminTokenHash() (string, error) {
	var h string
	err := s.db.View(func(tx *bolt.Tx) error {
		h = string(tx.Bucket([]byte(bucketMeta)).Get([]byte(adminTokenKey)))
		return nil
	})
	return h, err
}

func (s *store) setAdminTokenHash(h string) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte(bucketMeta)).Put([]byte(adminTokenKey), []byte(h))
	})
}

// createTenant stores a new tenant; errExists if the name is taken.
func (s *store) createTenant(t tenantRecord) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		tb := tx.Bucket([]byte(bucketTenants))
		if tb.Get([]byte(t.Name)) != nil {
			return errExists
		}
		if err := putJSON(tb, t.Name, t); err != nil {
			return err
		}
		return tx.Bucket([]byte(bucketTokens)).Put([]byte(t.TokenSHA256), []byte(t.Name))
	})
}

// tenantByToken returns the tenant whose token hashes to h, or "".
func (s *store) tenantByToken(h string) (string, error) {
	var name string
	err := s.db.View(func(tx *bolt.Tx) error {
		name = string(tx.Bucket([]byte(bucketTokens)).Get([]byte(h)))
		return nil
	})
	return name, err
}

func (s *store) tenants() ([]tenantRecord, error) {
	var out []tenantRecord
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte(bucketTenants)).ForEach(func(k, v []byte) error {
			var t tenantRecord
			if err := json.Unmarshal(v, &t); err != nil {
				return fmt.Errorf("decode tenant %q: %w", k, err)
			}
			out = append(out, t)
			return nil
		})
	})
	return out, err
}

// putHost stores a host, replacing any record with the same id.
func (s *store) putHost(h hostRecord) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		return putJSON(tx.Bucket([]byte(bucketHosts)), h.ID, h)
	})
}

func (s *store) host(id string) (hostRecord, error) {
	var h hostRecord
	err := s.db.View(func(tx *bolt.Tx) error {
		ok, err := getJSON(tx.Bucket([]byte(bucketHosts)), id, &h)
		if err == nil && !ok {
			err = errNotFound
		}
		return err
	})
	return h, err
}

// hosts returns every host, sorted by id.
func (s *store) hosts() ([]hostRecord, error) {
	var out []hostRecord
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte(bucketHosts)).ForEach(func(k, v []byte) error {
			var h hostRecord
			if err := json.Unmarshal(v, &h); err != nil {
				return fmt.Errorf("decode host %q: %w", k, err)
			}
			out = append(out, h)
			return nil
		})
	})
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, err
}

func (s *store) vm(id string) (vmRecord, error) {
	var v vmRecord
	err := s.db.View(func(tx *bolt.Tx) error {
		ok, err := getJSON(tx.Bucket([]byte(bucketVMs)), id, &v)
		if err == nil && !ok {
			err = errNotFound
		}
		return err
	})
	return v, err
}

// vms returns every VM record, sorted by id.
func (s *store) vms() ([]vmRecord, error) {
	var out []vmRecord
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte(bucketVMs)).ForEach(func(k, v []byte) error {
			var r vmRecord
			if err := json.Unmarshal(v, &r); err != nil {
				return fmt.Errorf("decode vm %q: %w", k, err)
			}
			out = append(out, r)
			return nil
		})
	})
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, err
}

// checkVMID reports a conflict if vm is registered or claimed by a tenant
// other than tenant. It runs inside a transaction.
func checkVMID(tx *bolt.Tx, vm, tenant string) error {
	if tx.Bucket([]byte(bucketVMs)).Get([]byte(vm)) != nil {
		return &conflictError{fmt.Sprintf("vm %q is already registered", vm)}
	}
	if owner := tx.Bucket([]byte(bucketClaims)).Get([]byte(vm)); owner != nil && string(owner) != tenant {
		return &conflictError{fmt.Sprintf("vm id %q is taken by another tenant", vm)}
	}
	return nil
}

// vmIDFree is checkVMID in its own read transaction, for an early answer.
func (s *store) vmIDFree(vm, tenant string) error {
	return s.db.View(func(tx *bolt.Tx) error { return checkVMID(tx, vm, tenant) })
}

// claimVM records tenant as the owner of vm and, in the same write
// transaction, runs commit (which puts the uploaded file in place). If the id
// is taken, commit does not run.
func (s *store) claimVM(vm, tenant string, commit func() error) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		if err := checkVMID(tx, vm, tenant); err != nil {
			return err
		}
		if err := tx.Bucket([]byte(bucketClaims)).Put([]byte(vm), []byte(tenant)); err != nil {
			return err
		}
		return commit()
	})
}

// createVM stores a new VM record in state registering, after checking that
// the id is free for its tenant and that the tenant has no live VM with the
// same name.
func (s *store) createVM(r vmRecord) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		if err := checkVMID(tx, r.ID, r.Tenant); err != nil {
			return err
		}
		vb := tx.Bucket([]byte(bucketVMs))
		err := vb.ForEach(func(k, v []byte) error {
			var o vmRecord
			if err := json.Unmarshal(v, &o); err != nil {
				return fmt.Errorf("decode vm %q: %w", k, err)
			}
			if o.Tenant == r.Tenant && o.Name == r.Name && o.State != stateDeleted {
				return &conflictError{fmt.Sprintf("tenant %q already has a vm named %q (%s)", r.Tenant, r.Name, o.ID)}
			}
			return nil
		})
		if err != nil {
			return err
		}
		if err := tx.Bucket([]byte(bucketClaims)).Put([]byte(r.ID), []byte(r.Tenant)); err != nil {
			return err
		}
		return putJSON(vb, r.ID, r)
	})
}

// setVMState changes a VM's recorded state.
func (s *store) setVMState(id, state string) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		vb := tx.Bucket([]byte(bucketVMs))
		var r vmRecord
		ok, err := getJSON(vb, id, &r)
		if err != nil {
			return err
		}
		if !ok {
			return errNotFound
		}
		r.State = state
		return putJSON(vb, id, r)
	})
}

// deleteVM forgets a VM record (a registration that failed). The upload
// claim stays, so the tenant can retry with the files it uploaded.
func (s *store) deleteVM(id string) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte(bucketVMs)).Delete([]byte(id))
	})
}
