package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmbond/vmbond/internal/admin"
	"github.com/vmbond/vmbond/internal/agent"
	"github.com/vmbond/vmbond/internal/audit"
	"github.com/vmbond/vmbond/internal/client"
	"github.com/vmbond/vmbond/internal/proto"
)

// adminDirect sends an admin's signed request straight to an agent, as a
// script with network access to the hosts (or a hostile server ignoring its
// own limits) would.
func adminDirect(t testing.TB, cl *client.Client, a *testAgent, host, vm, op string, approvals ...*admin.Approval) (int, string) {
	t.Helper()
	sr, err := cl.SignAdminRequest(context.Background(), client.AdminTarget{VM: vm, Host: host}, op, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(admin.Envelope{Request: *sr, Approvals: approvals})
	path := "/v1/vms/" + vm + "/admin"
	if vm == "" {
		path = "/v1/admin"
	}
	resp, err := http.Post(a.URL+path, "application/json", bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// TestSeedIncident replays seed 000: a fired admin's credential and a valid
// admin's scripted mass deletion of 88 VMs on 15 hosts.
func TestSeedIncident(t *testing.T) {
	hosts := make([]string, 15)
	for i := range hosts {
		hosts[i] = fmt.Sprintf("host%02d", i+1)
	}
	c := newCluster(t, hosts...)
	ctx := context.Background()
	tenants := map[string]*client.Client{}
	type vmRef struct{ tenant, name, id, host string }
	var vms []vmRef
	var mu sync.Mutex
	var wg sync.WaitGroup
	errs := make(chan error, 88)
	for i := range 8 {
		name := fmt.Sprintf("tenant%d", i)
		tenants[name] = c.tenant(name)
	}
	for i := range 88 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tn := fmt.Sprintf("tenant%d", i%8)
			vk, err := tenants[tn].Create(ctx, client.CreateOptions{
				Name: fmt.Sprintf("vm%02d", i), DiskSize: 4 << 20, Host: hosts[i%15],
				AdminAllowed: []string{proto.OpStatus, proto.OpDelete},
			})
			if err != nil {
				errs <- err
				return
			}
			mu.Lock()
			vms = append(vms, vmRef{tn, vk.Name, vk.ID, vk.Host})
			mu.Unlock()
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("create: %v", err)
	}

	// The fired employee: a revoked credential, and one long expired.
	fired := c.newAdmin("fired")
	c.revocations(2, serialOf(t, fired))
	for _, h := range hosts {
		c.pushRevocations(c.agents[h])
	}
	stale := c.newAdminIssued("stale", time.Now().Add(-72*time.Hour), 24*time.Hour)
	for _, v := range vms[:5] {
		if code, body := adminDirect(t, fired, c.agents[v.host], v.host, v.id, proto.OpDelete); code != http.StatusForbidden || !strings.Contains(body, "revoked") {
			t.Fatalf("revoked admin's delete: %d %s", code, body)
		}
		if code, body := adminDirect(t, stale, c.agents[v.host], v.host, v.id, proto.OpDelete); code != http.StatusForbidden || !strings.Contains(body, "expired") {
			t.Fatalf("expired admin's delete: %d %s", code, body)
		}
	}

	// A valid admin scripts the deletion of all 88, host by host, with
	// nothing but the agents' budgets in the way.
	bob := c.newAdmin("bob")
	deleted := map[string]bool{}
	refusedOverBudget := 0
	for _, v := range vms {
		code, body := adminDirect(t, bob, c.agents[v.host], v.host, v.id, proto.OpDelete)
		switch {
		case code == http.StatusOK:
			deleted[v.id] = true
		case code == http.StatusForbidden && strings.Contains(body, "destruction budget spent"):
			refusedOverBudget++
		default:
			t.Fatalf("delete %s: %d %s", v.id, code, body)
		}
	}
	limit := 15 * agent.DefaultBudgetPerAdmin
	if len(deleted) == 0 || len(deleted) > limit {
		t.Fatalf("%d VMs deleted; the budgets allow at most %d", len(deleted), limit)
	}
	if len(deleted)+refusedOverBudget != 88 {
		t.Fatalf("%d deleted + %d refused != 88", len(deleted), refusedOverBudget)
	}
	t.Logf("seed incident: %d of 88 VMs deleted before the budgets stopped the admin (limit %d)", len(deleted), limit)

	// Every deleted VM is restored by its tenant within retention.
	for _, v := range vms {
		if !deleted[v.id] {
			continue
		}
		if r, err := tenants[v.tenant].Command(ctx, v.name, proto.OpRestore); err != nil || r.State != "stopped" {
			t.Fatalf("restore %s: %v", v.name, err)
		}
	}
	for _, v := range vms {
		if r, err := tenants[v.tenant].Command(ctx, v.name, proto.OpStatus); err != nil || r.State != "stopped" {
			t.Fatalf("%s after restore: %v", v.name, err)
		}
	}

	// Every attempt is in the hosts' audit logs, whose chains verify.
	attempts := 0
	for _, h := range hosts {
		evs, err := audit.ReadAll(c.agents[h].AuditPath())
		if err != nil {
			t.Fatalf("audit log of %s: %v", h, err)
		}
		for _, e := range evs {
			if e.Op == proto.OpDelete && strings.HasPrefix(e.Actor, "admin:") || strings.Contains(e.Reason, "revoked") || strings.Contains(e.Reason, "expired") {
				attempts++
			}
		}
	}
	if want := 88 + 10; attempts < want {
		t.Fatalf("audit logs show %d admin delete attempts, want at least %d", attempts, want)
	}
}

func TestQuorum(t *testing.T) {
	c := newCluster(t, "host1")
	ctx := context.Background()
	alice := c.tenant("alice")
	bob, carol, dave := c.newAdmin("bob"), c.newAdmin("carol"), c.newAdmin("dave")
	h := c.agents["host1"]
	var ids []string
	for i := range agent.DefaultBudgetPerAdmin + 1 {
		vk, err := alice.Create(ctx, client.CreateOptions{Name: fmt.Sprintf("vm%d", i), DiskSize: 4 << 20, AdminAllowed: []string{"status", "delete"}})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, vk.ID)
	}
	for _, id := range ids[:agent.DefaultBudgetPerAdmin] {
		if _, err := bob.Admin(ctx, id, proto.OpDelete); err != nil {
			t.Fatal(err)
		}
	}
	last := ids[len(ids)-1]
	sign := func(cl *client.Client) *admin.SignedRequest {
		sr, err := bob.SignAdminRequest(ctx, client.AdminTarget{VM: last, Host: "host1"}, proto.OpDelete, nil)
		if err != nil {
			t.Fatal(err)
		}
		return sr
	}
	approve := func(cl *client.Client, sr *admin.SignedRequest, valid time.Duration) *admin.Approval {
		priv, cred := adminKeyAndCred(t, cl)
		ap, err := admin.Approve(priv, cred, sr.Digest(), time.Now().Add(valid))
		if err != nil {
			t.Fatal(err)
		}
		return ap
	}
	send := func(sr *admin.SignedRequest, aps ...*admin.Approval) (int, string) {
		b, _ := json.Marshal(admin.Envelope{Request: *sr, Approvals: aps})
		resp, err := http.Post(h.URL+"/v1/vms/"+last+"/admin", "application/json", bytes.NewReader(b))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		out, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(out)
	}
	tests := []struct {
		name string
		aps  func(sr *admin.SignedRequest) []*admin.Approval
		want string
	}{
		{"no approvals", func(*admin.SignedRequest) []*admin.Approval { return nil }, "destruction budget spent"},
		{"self approval", func(sr *admin.SignedRequest) []*admin.Approval {
			return []*admin.Approval{approve(bob, sr, time.Hour), approve(carol, sr, time.Hour)}
		}, "self approval"},
		{"same admin twice", func(sr *admin.SignedRequest) []*admin.Approval {
			return []*admin.Approval{approve(carol, sr, time.Hour), approve(carol, sr, time.Hour)}
		}, "1 valid approval of 2 needed"},
		{"expired approval", func(sr *admin.SignedRequest) []*admin.Approval {
			return []*admin.Approval{approve(carol, sr, time.Millisecond), approve(dave, sr, time.Hour)}
		}, "expired"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sr := sign(bob)
			aps := tt.aps(sr)
			time.Sleep(5 * time.Millisecond)
			code, body := send(sr, aps...)
			if code != http.StatusForbidden || !strings.Contains(body, tt.want) {
				t.Fatalf("answered %d %s; want a refusal mentioning %q", code, body, tt.want)
			}
			if !auditHas(t, h, last, proto.OpDelete, "refused", tt.want) {
				t.Fatal("refusal not logged")
			}
		})
	}
	t.Run("distinct admins", func(t *testing.T) {
		sr := sign(bob)
		code, body := send(sr, approve(carol, sr, time.Hour), approve(dave, sr, time.Hour))
		if code != http.StatusOK || !strings.Contains(body, "deleted") {
			t.Fatalf("approved delete: %d %s", code, body)
		}
		if !auditHas(t, h, last, proto.OpDelete, "allowed", "approved by carol,dave") {
			t.Fatal("approvers not logged")
		}
	})
	t.Run("retention cannot be shortened without quorum", func(t *testing.T) {
		code, body := adminDirect(t, bob, h, "host1", "", agent.OpSetRetention)
		if code != http.StatusForbidden || !strings.Contains(body, "critical") {
			t.Fatalf("unapproved set-retention: %d %s", code, body)
		}
		sr, _ := bob.SignAdminRequest(ctx, client.AdminTarget{Host: "host1"}, agent.OpSetRetention, map[string]string{"hours": "48"})
		b, _ := json.Marshal(admin.Envelope{Request: *sr, Approvals: []*admin.Approval{approve(carol, sr, time.Hour), approve(dave, sr, time.Hour)}})
		resp, err := http.Post(h.URL+"/v1/admin", "application/json", bytes.NewReader(b))
		if err != nil {
			t.Fatal(err)
		}
		out, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || !strings.Contains(string(out), "retention 48h") {
			t.Fatalf("approved set-retention: %d %s", resp.StatusCode, out)
		}
	})
	t.Run("wiping a host needs a quorum and stays restorable", func(t *testing.T) {
		if code, body := adminDirect(t, bob, h, "host1", "", agent.OpWipeHost); code != http.StatusForbidden || !strings.Contains(body, "critical") {
			t.Fatalf("unapproved wipe-host: %d %s", code, body)
		}
		sr, _ := bob.SignAdminRequest(ctx, client.AdminTarget{Host: "host1"}, agent.OpWipeHost, nil)
		b, _ := json.Marshal(admin.Envelope{Request: *sr, Approvals: []*admin.Approval{approve(carol, sr, time.Hour), approve(dave, sr, time.Hour)}})
		resp, err := http.Post(h.URL+"/v1/admin", "application/json", bytes.NewReader(b))
		if err != nil {
			t.Fatal(err)
		}
		out, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || !strings.Contains(string(out), "VMs deleted") {
			t.Fatalf("approved wipe-host: %d %s", resp.StatusCode, out)
		}
		for i := range ids {
			name := fmt.Sprintf("vm%d", i)
			if r, err := alice.Command(ctx, name, proto.OpStatus); err != nil || r.State != "deleted" {
				t.Fatalf("%s after wipe: %v", name, err)
			}
			if _, err := alice.Command(ctx, name, proto.OpRestore); err != nil {
				t.Fatalf("restore %s after wipe: %v", name, err)
			}
		}
	})
}

func TestRevocationAndStaleList(t *testing.T) {
	c := newCluster(t, "host1")
	ctx := context.Background()
	alice := c.tenant("alice")
	vk := blankVM(t, alice, "web", "host1")
	bob := c.newAdmin("bob")
	if _, err := bob.Admin(ctx, vk.ID, "status"); err != nil {
		t.Fatal(err)
	}
	// Revoked: honoured as soon as the list reaches the agent.
	c.revocations(2, serialOf(t, bob))
	c.pushRevocations(c.agents["host1"])
	if _, err := bob.Admin(ctx, vk.ID, "status"); err == nil || !strings.Contains(err.Error(), "revoked") {
		t.Fatalf("revoked admin: %v", err)
	}
	// An older list cannot undo it.
	old, _ := admin.SignRevocations(c.caDir, nil, time.Now(), 1)
	b, _ := json.Marshal(old)
	resp, _ := http.Post(c.agents["host1"].URL+"/v1/revocations", "application/json", bytes.NewReader(b))
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Fatalf("rollback of the revocation list: %d", resp.StatusCode)
	}
	// Stale: once the newest list is older than the bound, every admin
	// operation fails closed.
	carol := c.newAdminIssued("carol", time.Now(), 72*time.Hour)
	if _, err := carol.Admin(ctx, vk.ID, "status"); err != nil {
		t.Fatal(err)
	}
	c.setClock(25 * time.Hour)
	c.agents["host1"].stop()
	c.startAgent("host1", c.agents["host1"].DataDir)
	if _, err := c.admin.AddHost(ctx, c.agents["host1"].URL); err != nil {
		t.Fatal(err)
	}
	_, err := carol.Admin(ctx, vk.ID, "status")
	if err == nil || !strings.Contains(err.Error(), "revocation list") {
		t.Fatalf("admin with a stale revocation list: %v", err)
	}
	if !auditHas(t, c.agents["host1"], "", "", "refused", "revocation list") {
		t.Fatal("fail-closed refusal not logged")
	}
}
