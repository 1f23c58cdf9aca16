package agent

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"strconv"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/vmbond/vmbond/internal/admin"
	"github.com/vmbond/vmbond/internal/proto"
)

// Guardrail defaults: what one admin may destroy on one host, alone.
const (
	DefaultBudgetPerAdmin = 3
	DefaultBudgetPerHost  = 10
	DefaultBudgetWindow   = time.Hour
	DefaultQuorum         = 2
	// DefaultApprovalWindow is how long a request may wait for approvals.
	DefaultApprovalWindow = time.Hour
)

// AdminCAFile is the admin CA public key an agent trusts, in its data dir.
const AdminCAFile = "admin-ca.pub"

var (
	bucketMeta   = []byte("meta")
	bucketBudget = []byte("budget")
)

// Host-wide admin operations; all are critical: they need a quorum.
const (
	OpSetRetention = "set-retention" // args: hours
	OpSetBudget    = "set-budget"    // args: per_admin, per_host
	OpWipeHost     = "wipe-host"     // soft-deletes every VM on the host
)

// destructive operations count against the budgets.
func destructive(op string) bool { return op == proto.OpDelete || op == proto.OpPurge }

// critical operations always need a quorum of other admins.
func critical(op string) bool {
	return op == proto.OpPurge || op == OpSetRetention || op == OpSetBudget || op == OpWipeHost
}

// settings are the guardrail values a quorum may change; they live in the
// agent's database so a restart keeps them.
type settings struct {
	Retention      time.Duration `json:"retention"`
	BudgetPerAdmin int           `json:"budget_per_admin"`
	BudgetPerHost  int           `json:"budget_per_host"`
}

func (s *store) settings(def settings) settings {
	out := def
	s.db.View(func(tx *bolt.Tx) error {
		if b := tx.Bucket(bucketMeta).Get([]byte("settings")); b != nil {
			json.Unmarshal(b, &out)
		}
		return nil
	})
	return out
}

func (s *store) putMeta(key string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketMeta).Put([]byte(key), b) })
}

func (s *store) getMeta(key string, v any) bool {
	found := false
	s.db.View(func(tx *bolt.Tx) error {
		if b := tx.Bucket(bucketMeta).Get([]byte(key)); b != nil {
			found = json.Unmarshal(b, v) == nil
		}
		return nil
	})
	return found
}

// budgetUse counts the destructive operations recorded in the window: by
// adminName, and on this host by anyone.
func (s *store) budgetUse(adminName string, now time.Time, window time.Duration) (byAdmin, byHost int, err error) {
	from := now.Add(-window).UnixNano()
	err = s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketBudget).ForEach(func(k, v []byte) error {
			if len(k) < 8 || int64(binary.BigEndian.Uint64(k[:8])) < from {
				return nil
			}
			byHost++
			if string(v) == adminName {
				byAdmin++
			}
			return nil
		})
	})
	return byAdmin, byHost, err
}

// budgetSpend records one destructive operation by adminName.
func (s *store) budgetSpend(adminName string, now time.Time, window time.Duration) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketBudget)
		var k [16]byte
		binary.BigEndian.PutUint64(k[:8], uint64(now.UnixNano()))
		seq, _ := b.NextSequence()
		binary.BigEndian.PutUint64(k[8:], seq)
		if err := b.Put(k[:], []byte(adminName)); err != nil {
			return err
		}
		// Forget what fell out of every window.
		c := b.Cursor()
		old := uint64(now.Add(-24 * window).UnixNano())
		for k, _ := c.First(); k != nil && binary.BigEndian.Uint64(k[:8]) < old; k, _ = c.Next() {
			if err := c.Delete(); err != nil {
				return err
			}
		}
		return nil
	})
}

func (a *Agent) currentSettings() settings {
	return a.store.settings(settings{Retention: a.retentionDefault(), BudgetPerAdmin: a.cfg.BudgetPerAdmin, BudgetPerHost: a.cfg.BudgetPerHost})
}

func (a *Agent) retentionDefault() time.Duration {
	if a.cfg.Retention > 0 {
		return a.cfg.Retention
	}
	return DefaultRetention
}

// applySetting carries out a host-wide critical operation.
func (a *Agent) applySetting(req *admin.RequestBody) (string, error) {
	st := a.currentSettings()
	switch req.Op {
	case OpSetRetention:
		h, err := strconv.Atoi(req.Args["hours"])
		if err != nil || h < 1 || h > 24*365 {
			return "", fmt.Errorf("set-retention needs hours=1..8760")
		}
		st.Retention = time.Duration(h) * time.Hour
	case OpSetBudget:
		pa, err1 := strconv.Atoi(req.Args["per_admin"])
		ph, err2 := strconv.Atoi(req.Args["per_host"])
		if err1 != nil || err2 != nil || pa < 0 || ph < 0 || pa > 10000 || ph > 10000 {
			return "", fmt.Errorf("set-budget needs per_admin and per_host, 0..10000")
		}
		st.BudgetPerAdmin, st.BudgetPerHost = pa, ph
	default:
		return "", fmt.Errorf("unknown host operation %q (set-retention, set-budget, wipe-host)", req.Op)
	}
	if err := a.store.putMeta("settings", st); err != nil {
		return "", err
	}
	return fmt.Sprintf("retention %s, budget %d per admin and %d per host per %s", st.Retention, st.BudgetPerAdmin, st.BudgetPerHost, a.cfg.BudgetWindow), nil
}
