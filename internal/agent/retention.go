package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/vmbond/vmbond/internal/proto"
)

// DefaultRetention is how long a deleted VM stays restorable.
const DefaultRetention = 7 * 24 * time.Hour

func (v *vm) deletedAt() *time.Time {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.rec.Deleted
}

// deleteVM stops the VM and tombstones it: its encrypted disk and sealed key
// stay on this host until the retention period ends, and its tenant can
// restore it until then. Nobody can shorten a tombstone's retention.
func (a *Agent) deleteVM(ctx context.Context, v *vm) (string, string, error) {
	v.mu.Lock()
	rt := v.run
	v.mu.Unlock()
	if rt != nil {
		aut, _ := automatonFor(proto.OpDelete)
		if _, err := runAutomaton(ctx, rt.mon, proto.OpDelete, aut); err != nil {
			return "", "", err
		}
		select {
		case <-rt.exited:
		case <-time.After(15 * time.Second):
			return "", "", errors.New("QEMU did not exit after quit")
		}
	}
	now := a.cfg.Now().UTC()
	v.mu.Lock()
	v.rec.Deleted, v.rec.PurgeAfter = &now, now.Add(a.currentSettings().Retention)
	rec := *v.rec
	v.mu.Unlock()
	if err := a.store.put(v.spec.VM, &rec); err != nil {
		return "", "", fmt.Errorf("tombstone %s: %w", v.spec.VM, err)
	}
	return "deleted", fmt.Sprintf("restorable until %s", rec.PurgeAfter.Format(time.RFC3339)), nil
}

// operateDeleted handles operations on a tombstoned VM.
func (a *Agent) operateDeleted(v *vm, op string) (string, string, error) {
	v.mu.Lock()
	until := v.rec.PurgeAfter
	v.mu.Unlock()
	switch op {
	case proto.OpStatus:
		return "deleted", fmt.Sprintf("restorable until %s", until.Format(time.RFC3339)), nil
	case proto.OpRestore:
		v.mu.Lock()
		v.rec.Deleted, v.rec.PurgeAfter = nil, time.Time{}
		rec := *v.rec
		v.mu.Unlock()
		if err := a.store.put(v.spec.VM, &rec); err != nil {
			return "", "", fmt.Errorf("restore %s: %w", v.spec.VM, err)
		}
		return "stopped", "restored", nil
	case proto.OpPurge:
		if err := a.purgeVM(v); err != nil {
			return "", "", err
		}
		return "purged", "key and disk destroyed", nil
	}
	return "deleted", "", fmt.Errorf("VM is deleted (restorable until %s): restore it before %s", until.Format(time.RFC3339), op)
}

// purgeVM destroys a deleted VM: its sealed key and its disk. Without the key
// the ciphertext anywhere else (backups, the server's upload) is unreadable,
// and the ID is remembered so the sealed key cannot be registered again.
func (a *Agent) purgeVM(v *vm) error {
	if err := a.store.purge(v.spec.VM, a.cfg.Now()); err != nil {
		return fmt.Errorf("purge %s: %w", v.spec.VM, err)
	}
	clear(v.diskKey)
	a.mu.Lock()
	delete(a.vms, v.spec.VM)
	a.mu.Unlock()
	if err := os.RemoveAll(v.dir); err != nil {
		return fmt.Errorf("purge %s: remove disk: %w", v.spec.VM, err)
	}
	return nil
}

// purgeExpired purges tombstones whose retention has ended.
func (a *Agent) purgeExpired() {
	now := a.cfg.Now()
	a.mu.Lock()
	var due []*vm
	for _, v := range a.vms {
		v.mu.Lock()
		if v.rec.Deleted != nil && now.After(v.rec.PurgeAfter) {
			due = append(due, v)
		}
		v.mu.Unlock()
	}
	a.mu.Unlock()
	for _, v := range due {
		v.opMu.Lock()
		err := a.purgeVM(v)
		v.opMu.Unlock()
		d := decision{actor: "agent", vm: v.spec.VM, op: proto.OpPurge}
		if err != nil {
			a.record(d, "failed", err.Error())
			continue
		}
		a.record(d, "allowed", "retention period ended")
	}
}

// purgeLoop purges expired tombstones every minute until ctx is done.
func (a *Agent) purgeLoop(ctx context.Context) {
	t := time.NewTicker(time.Minute)
	defer t.Stop()
	for {
		a.purgeExpired()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
