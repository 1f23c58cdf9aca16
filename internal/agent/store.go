package agent

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/vmbond/vmbond/internal/proto"
)

var (
	bucketVMs    = []byte("vms")
	bucketNonces = []byte("nonces")
	bucketPurged = []byte("purged") // VM IDs whose keys were destroyed
)

// record is what the agent keeps on its own storage for a VM. The disk key is
// kept only sealed (as the tenant sent it); the agent opens it into memory.
type record struct {
	Registration proto.Registration `json:"registration"`
	Epoch        uint64             `json:"epoch"`
	DescriptorID []byte             `json:"descriptor_id"`
	Running      bool               `json:"running"`
	// Deleted is set by a delete: the VM is kept, stopped, until
	// PurgeAfter, and its tenant can restore it until then.
	Deleted    *time.Time `json:"deleted,omitempty"`
	PurgeAfter time.Time  `json:"purge_after,omitzero"`
	PID        int        `json:"pid,omitempty"`
}

type store struct{ db *bolt.DB }

func openStore(path string) (*store, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("open agent database %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketVMs, bucketNonces, bucketPurged, bucketMeta, bucketBudget} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("open agent database %s: %w", path, err)
	}
	return &store{db: db}, nil
}

func (s *store) close() error { return s.db.Close() }

func (s *store) put(vm string, r *record) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	return s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketVMs).Put([]byte(vm), b) })
}

func (s *store) all() (map[string]*record, error) {
	out := map[string]*record{}
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketVMs).ForEach(func(k, v []byte) error {
			var r record
			if err := json.Unmarshal(v, &r); err != nil {
				return fmt.Errorf("record of %s: %w", k, err)
			}
			out[string(k)] = &r
			return nil
		})
	})
	return out, err
}

// useNonce records a command nonce until expiry. It reports false if the nonce
// was seen before: a replay. Nonces live on storage so that a restart of the
// agent does not reopen the replay window. Expired nonces are pruned here.
func (s *store) useNonce(vm string, nonce []byte, now, expiry time.Time) (bool, error) {
	key := append([]byte(vm+"\x00"), nonce...)
	fresh := false
	err := s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketNonces)
		if b.Get(key) != nil {
			return nil
		}
		fresh = true
		var exp [8]byte
		binary.BigEndian.PutUint64(exp[:], uint64(expiry.Unix()))
		if err := b.Put(key, exp[:]); err != nil {
			return err
		}
		c := b.Cursor()
		for k, v := c.First(); k != nil; k, v = c.Next() {
			if len(v) == 8 && int64(binary.BigEndian.Uint64(v)) < now.Unix() {
				if err := c.Delete(); err != nil {
					return err
				}
			}
		}
		return nil
	})
	return fresh, err
}

// purge removes a VM's record for good and remembers its ID, so that a
// replayed registration cannot bring the destroyed key back.
func (s *store) purge(vm string, at time.Time) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		if err := tx.Bucket(bucketVMs).Delete([]byte(vm)); err != nil {
			return err
		}
		return tx.Bucket(bucketPurged).Put([]byte(vm), []byte(at.UTC().Format(time.RFC3339)))
	})
}

// purged reports whether a VM ID was purged on this host.
func (s *store) purged(vm string) bool {
	found := false
	s.db.View(func(tx *bolt.Tx) error {
		found = tx.Bucket(bucketPurged).Get([]byte(vm)) != nil
		return nil
	})
	return found
}
