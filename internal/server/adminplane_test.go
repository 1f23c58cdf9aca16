package server

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmbond/vmbond/internal/admin"
	"github.com/vmbond/vmbond/internal/proto"
)

// revocationList makes a list numbered n with a fake signature, encoded with
// odd spacing so that only a verbatim relay reproduces it.
func revocationList(t testing.TB, n uint64) []byte {
	t.Helper()
	body, err := json.Marshal(admin.RevocationBody{Version: proto.Version, Number: n, Issued: time.Date(2025, 1, 1, 0, 0, int(n), 0, time.UTC), Serials: []string{}})
	if err != nil {
		t.Fatal(err)
	}
	return oddJSON(t, admin.RevocationList{Body: body, Sig: []byte(fmt.Sprint("ca-sig-", n))})
}

func TestRevocations(t *testing.T) {
	e := newEnv(t, nil)
	alpha := e.tenant("alpha")
	a1, a2, down := newFakeAgent(t, "host-1"), newFakeAgent(t, "host-2"), newFakeAgent(t, "host-3")
	for _, a := range []*fakeAgent{a1, a2, down} {
		e.addHost(a)
	}
	down.srv.Close()

	st, out := e.do("GET", "/v1/revocations", alpha, nil)
	e.wantError(st, out, 404, proto.CodeNotFound, "no revocation list")

	// Bad bodies: 400, nothing stored, nothing pushed.
	bad := []struct{ name, body, msg string }{
		{"empty", "", "empty request body"},
		{"not json", "revoked!", "invalid RevocationList JSON"},
		{"unknown field", `{"body":"e30=","sig":"","number":9}`, `unknown field "number"`},
		{"no body", `{"sig":"AA=="}`, "has no body"},
		{"body not a RevocationBody", `{"body":"` + b64(`{"number":3,"extra":1}`) + `","sig":"AA=="}`, `unknown field "extra"`},
		{"number 0", `{"body":"` + b64(`{"version":"x","number":0}`) + `","sig":"AA=="}`, "number 0"},
	}
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			a1.reset()
			st, out := e.do("POST", "/v1/revocations", e.admin, tc.body)
			e.wantError(st, out, 400, proto.CodeBadRequest, tc.msg)
			if n := len(a1.requests()); n != 0 {
				t.Fatalf("bad list pushed (%d requests)", n)
			}
			if raw, _ := e.srv.store.revocations(); raw != nil {
				t.Fatalf("bad list stored: %s", raw)
			}
		})
	}
	st, out = e.do("POST", "/v1/revocations", alpha, revocationList(t, 1))
	e.wantError(st, out, 403, proto.CodeForbidden, "only the admin")

	// List #2 goes to every host byte for byte and is stored.
	a1.reset()
	a2.reset()
	list2 := revocationList(t, 2)
	var results []hostResult
	e.must("POST", "/v1/revocations", e.admin, list2, &results)
	want := []hostResult{{Host: "host-1", Status: 204}, {Host: "host-2", Status: 204}, {Host: "host-3"}}
	if len(results) != 3 || results[0] != want[0] || results[1] != want[1] || results[2].Host != "host-3" || results[2].Status != 0 || results[2].Error == "" {
		t.Fatalf("results %+v, want %+v with an error for host-3", results, want)
	}
	for _, a := range []*fakeAgent{a1, a2} {
		got := a.requestsTo("POST", "/v1/revocations")
		if len(got) != 1 || !bytes.Equal(got[0].Body, list2) {
			t.Fatalf("%s got %+v, want the list's bytes", a.id, got)
		}
	}
	st, out = e.do("GET", "/v1/revocations", alpha, nil)
	if st != 200 || !bytes.Equal(out, list2) {
		t.Fatalf("GET revocations %d %s", st, out)
	}

	// An older list is pushed (the agents refuse it) but does not replace #2.
	a1.setAnswer("POST /v1/revocations", 403, `{"code":"refused","message":"refusing rollback"}`)
	a1.reset()
	list1 := revocationList(t, 1)
	e.must("POST", "/v1/revocations", e.admin, list1, &results)
	if results[0].Status != 403 || !strings.Contains(results[0].Error, "refusing rollback") || results[1].Status != 204 {
		t.Fatalf("results %+v", results)
	}
	if got := a1.requestsTo("POST", "/v1/revocations"); len(got) != 1 || !bytes.Equal(got[0].Body, list1) {
		t.Fatalf("older list not pushed: %+v", got)
	}
	// So does another list under the same number.
	other2 := bytes.Replace(list2, []byte("ca-sig-2"), []byte("ca-sig-X"), 1)
	e.must("POST", "/v1/revocations", e.admin, other2, &results)
	if _, out := e.do("GET", "/v1/revocations", e.admin, nil); !bytes.Equal(out, list2) {
		t.Fatalf("stored list replaced: %s", out)
	}
	a1.clearAnswer("POST /v1/revocations")

	// A newer list replaces it, across a restart.
	list3 := revocationList(t, 3)
	e.must("POST", "/v1/revocations", e.admin, list3, nil)
	e.stop()
	e.start()
	if _, out := e.do("GET", "/v1/revocations", e.admin, nil); !bytes.Equal(out, list3) {
		t.Fatalf("stored list after restart: %s", out)
	}

	// Enrolling (or re-enrolling) a host pushes the stored list to it.
	a4 := newFakeAgent(t, "host-4")
	e.addHost(a4)
	if got := a4.requestsTo("POST", "/v1/revocations"); len(got) != 1 || !bytes.Equal(got[0].Body, list3) {
		t.Fatalf("enrolled host got %+v", got)
	}
	a2.reset()
	e.addHost(a2)
	if got := a2.requestsTo("POST", "/v1/revocations"); len(got) != 1 || !bytes.Equal(got[0].Body, list3) {
		t.Fatalf("re-enrolled host got %+v", got)
	}
	// A host that refuses the list is still enrolled.
	a5 := newFakeAgent(t, "host-5")
	a5.setAnswer("POST /v1/revocations", 403, `{"code":"forbidden","message":"no admin CA"}`)
	e.addHost(a5)
	if _, err := e.srv.store.host("host-5"); err != nil {
		t.Fatalf("host-5 not enrolled: %v", err)
	}
}

func b64(s string) string {
	raw, _ := json.Marshal([]byte(s))
	return strings.Trim(string(raw), `"`)
}

func TestQuorumRequests(t *testing.T) {
	e, agent, alpha := adminEnv(t, nil)

	del := envelope(t, adminReq("bob", "host-1", "vm-1", proto.OpDelete))
	digest := del.Request.Digest()
	id := hex.EncodeToString(digest)
	carol, dave := approval(t, "carol", digest), approval(t, "dave", digest)

	var rec requestRecord
	st, out := e.do("POST", "/v1/requests", e.admin, del)
	if st != 201 {
		t.Fatalf("create request: %d %s", st, out)
	}
	if err := json.Unmarshal(out, &rec); err != nil {
		t.Fatal(err)
	}
	if rec.ID != id || rec.Requester != "bob" || rec.Host != "host-1" || rec.VM != "vm-1" || rec.Op != proto.OpDelete || rec.Executed || len(rec.Envelope.Approvals) != 0 {
		t.Fatalf("record %+v", rec)
	}
	if !bytes.Equal(rec.Envelope.Request.Body, del.Request.Body) || !bytes.Equal(rec.Envelope.Request.Sig, del.Request.Sig) {
		t.Fatal("stored request differs from the admin's")
	}
	st, out = e.do("POST", "/v1/requests", e.admin, del)
	e.wantError(st, out, 409, proto.CodeConflict, "already stored")

	// A host-wide request, filed later, with one approval already.
	clock := envelope(t, adminReq("bob", "host-1", "", "set-retention"))
	clockID := hex.EncodeToString(clock.Request.Digest())
	clock.Approvals = []*admin.Approval{approval(t, "carol", clock.Request.Digest()), approval(t, "carol", clock.Request.Digest())}
	time.Sleep(2 * time.Millisecond)
	e.must("POST", "/v1/requests", e.admin, clock, &rec)
	if len(rec.Envelope.Approvals) != 1 {
		t.Fatalf("duplicate approvals kept on create: %d", len(rec.Envelope.Approvals))
	}

	// Bad requests: 400/404, nothing stored.
	badReqs := []struct {
		name   string
		body   any
		status int
		msg    string
	}{
		{"unknown vm", envelope(t, adminReq("bob", "host-1", "vm-9", proto.OpDelete)), 404, "not found"},
		{"vm on another host", envelope(t, adminReq("bob", "host-2", "vm-1", proto.OpDelete)), 400, `vm "vm-1" is on host "host-1"`},
		{"unknown host", envelope(t, adminReq("bob", "host-9", "", "set-budget")), 404, "not found"},
		{"unknown op", envelope(t, adminReq("bob", "host-1", "vm-1", "format")), 400, "unknown operation"},
		{"not an envelope", `{"op":"delete"}`, 400, "unknown field"},
		{"empty", "", 400, "empty request body"},
	}
	for _, tc := range badReqs {
		t.Run(tc.name, func(t *testing.T) {
			st, out := e.do("POST", "/v1/requests", e.admin, tc.body)
			e.wantError(st, out, tc.status, "", tc.msg)
			if list, _ := e.srv.store.requests(); len(list) != 2 {
				t.Fatalf("%d requests stored", len(list))
			}
		})
	}
	st, out = e.do("POST", "/v1/requests", alpha, del)
	e.wantError(st, out, 403, proto.CodeForbidden, "only the admin")

	// Listing: newest first.
	var list []requestRecord
	e.must("GET", "/v1/requests", e.admin, nil, &list)
	if len(list) != 2 || list[0].ID != clockID || list[1].ID != id {
		t.Fatalf("list %+v", list)
	}

	// Approvals: added once each; bad ones refused without a change.
	e.must("POST", "/v1/requests/"+id+"/approvals", e.admin, carol, &rec)
	e.must("POST", "/v1/requests/"+id+"/approvals", e.admin, carol, &rec)
	if len(rec.Envelope.Approvals) != 1 {
		t.Fatalf("%d approvals after a duplicate", len(rec.Envelope.Approvals))
	}
	badApprovals := []struct {
		name, path string
		body       any
		status     int
		msg        string
	}{
		{"other request", "/v1/requests/" + id + "/approvals", approval(t, "dave", make([]byte, 32)), 400, "approval is for request"},
		{"unknown request", "/v1/requests/" + strings.Repeat("ab", 32) + "/approvals", approval(t, "dave", bytes.Repeat([]byte{0xab}, 32)), 404, "not found"},
		{"bad id", "/v1/requests/XYZ/approvals", dave, 400, "invalid request id"},
		{"upper-case id", "/v1/requests/" + strings.ToUpper(id) + "/approvals", dave, 400, "invalid request id"},
		{"not an approval", "/v1/requests/" + id + "/approvals", `{"request":{}}`, 400, "unknown field"},
		{"no body", "/v1/requests/" + id + "/approvals", `{"sig":"AA=="}`, 400, "approval has no body"},
		{"body not an ApprovalBody", "/v1/requests/" + id + "/approvals", `{"body":"` + b64(`{"admin":"dave","yes":true}`) + `"}`, 400, "invalid approval body"},
	}
	for _, tc := range badApprovals {
		t.Run(tc.name, func(t *testing.T) {
			st, out := e.do("POST", tc.path, e.admin, tc.body)
			e.wantError(st, out, tc.status, "", tc.msg)
			if r, _ := e.srv.store.request(id); len(r.Envelope.Approvals) != 1 {
				t.Fatalf("%d approvals", len(r.Envelope.Approvals))
			}
		})
	}
	e.must("POST", "/v1/requests/"+id+"/approvals", e.admin, dave, &rec)
	if len(rec.Envelope.Approvals) != 2 {
		t.Fatalf("%d approvals", len(rec.Envelope.Approvals))
	}

	// Requests and approvals survive a restart.
	e.stop()
	e.start()
	e.must("GET", "/v1/requests/"+id, e.admin, nil, &rec)
	if len(rec.Envelope.Approvals) != 2 || rec.Executed {
		t.Fatalf("after restart %+v", rec)
	}

	// The agent refuses: nothing is marked.
	agent.reset()
	agent.setAnswer("POST admin", 403, `{"code":"forbidden","message":"quorum not met"}`)
	st, out = e.do("POST", "/v1/requests/"+id+"/execute", e.admin, nil)
	if st != 403 || string(out) != `{"code":"forbidden","message":"quorum not met"}` {
		t.Fatalf("refused execute %d %s", st, out)
	}
	if r, _ := e.srv.store.request(id); r.Executed {
		t.Fatal("refused request marked executed")
	}
	agent.clearAnswer("POST admin")
	st, out = e.do("POST", "/v1/requests/"+id+"/execute", e.admin, `{"force":true}`)
	e.wantError(st, out, 400, proto.CodeBadRequest, "takes no body")

	// Executed: the agent gets the request and both approvals.
	agent.reset()
	st, out = e.do("POST", "/v1/requests/"+id+"/execute", e.admin, nil)
	if st != 200 {
		t.Fatalf("execute %d %s", st, out)
	}
	got := agent.requestsTo("POST", "/v1/vms/vm-1/admin")
	if len(got) != 1 {
		t.Fatalf("agent got %+v", agent.requests())
	}
	var sent admin.Envelope
	if err := proto.DecodeStrict(got[0].Body, &sent); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(sent.Request.Body, del.Request.Body) || !bytes.Equal(sent.Request.Sig, del.Request.Sig) ||
		len(sent.Approvals) != 2 || !sameApproval(sent.Approvals[0], carol) || !sameApproval(sent.Approvals[1], dave) {
		t.Fatalf("agent got %s", got[0].Body)
	}
	e.must("GET", "/v1/requests/"+id, e.admin, nil, &rec)
	if !rec.Executed || rec.ExecutedAt.IsZero() {
		t.Fatalf("not marked executed: %+v", rec)
	}
	if vm, _ := e.srv.store.vm("vm-1"); vm.State != stateDeleted {
		t.Fatalf("vm-1 state %q", vm.State)
	}
	st, out = e.do("POST", "/v1/requests/"+id+"/execute", e.admin, nil)
	e.wantError(st, out, 409, proto.CodeConflict, "already executed")
	st, out = e.do("POST", "/v1/requests/"+id+"/approvals", e.admin, approval(t, "erin", digest))
	e.wantError(st, out, 409, proto.CodeConflict, "already executed")

	// The host-wide request goes to POST /v1/admin.
	agent.reset()
	e.must("POST", "/v1/requests/"+clockID+"/execute", e.admin, "{}", nil)
	got = agent.requestsTo("POST", "/v1/admin")
	if len(got) != 1 || envelopeRequest(got[0].Body).Op != "set-retention" {
		t.Fatalf("agent got %+v", agent.requests())
	}
	e.must("GET", "/v1/requests", e.admin, nil, &list)
	if len(list) != 2 || !list[0].Executed || !list[1].Executed {
		t.Fatalf("list %+v", list)
	}
	st, out = e.do("GET", "/v1/requests/"+strings.Repeat("0", 64), e.admin, nil)
	e.wantError(st, out, 404, proto.CodeNotFound, "not found")
}

func TestApprovalLimit(t *testing.T) {
	e, _, _ := adminEnv(t, nil)
	env := envelope(t, adminReq("bob", "host-1", "vm-1", proto.OpDelete))
	d := env.Request.Digest()
	for i := range admin.MaxApprovals {
		env.Approvals = append(env.Approvals, approval(t, fmt.Sprintf("admin-%d", i), d))
	}
	var rec requestRecord
	e.must("POST", "/v1/requests", e.admin, env, &rec)
	st, out := e.do("POST", "/v1/requests/"+rec.ID+"/approvals", e.admin, approval(t, "one-more", d))
	e.wantError(st, out, 409, proto.CodeConflict, "already holds 64 approvals")
	// A duplicate is still fine.
	e.must("POST", "/v1/requests/"+rec.ID+"/approvals", e.admin, env.Approvals[3], &rec)
	if len(rec.Envelope.Approvals) != admin.MaxApprovals {
		t.Fatalf("%d approvals", len(rec.Envelope.Approvals))
	}
}

func TestAuditCollection(t *testing.T) {
	e := newEnv(t, nil)
	alpha := e.tenant("alpha")
	a1, a2, a3 := newFakeAgent(t, "host-1"), newFakeAgent(t, "host-2"), newFakeAgent(t, "host-3")
	for _, a := range []*fakeAgent{a1, a2, a3} {
		e.addHost(a)
	}
	st, out := e.do("GET", "/v1/audit", alpha, nil)
	e.wantError(st, out, 403, proto.CodeForbidden, "only the admin")

	logOf := func(id string) string {
		return `{"host":"` + id + `","entries":[{"seq":1,"op":"register"}],"head":{"seq":1,"sig":"AAAA"}}`
	}
	var res []auditResult
	e.must("GET", "/v1/audit", e.admin, nil, &res)
	if len(res) != 3 {
		t.Fatalf("results %+v", res)
	}
	for i, r := range res {
		id := fmt.Sprintf("host-%d", i+1)
		if r.Host != id || r.Status != 200 || r.Error != "" || !r.Saved.IsZero() || string(r.Log) != logOf(id) {
			t.Fatalf("result %d: %+v", i, r)
		}
		saved, err := os.ReadFile(filepath.Join(e.dir, "audit", id+".json"))
		if err != nil || string(saved) != logOf(id) {
			t.Fatalf("saved log of %s: %q, %v", id, saved, err)
		}
	}

	// host-2 goes down, host-3 fails: their saved copies come back, flagged.
	// host-4 was never collected and is down: no log.
	a2.srv.Close()
	a3.setAnswer("GET /v1/audit", 503, `{"code":"unavailable","message":"disk full"}`)
	a4 := newFakeAgent(t, "host-4")
	e.addHost(a4)
	a4.srv.Close()
	a1.setAnswer("GET /v1/audit", 200, `{"host":"host-1","entries":[],"head":{"seq":2}}`)
	e.must("GET", "/v1/audit", e.admin, nil, &res)
	if len(res) != 4 {
		t.Fatalf("results %+v", res)
	}
	if r := res[0]; r.Status != 200 || r.Error != "" || string(r.Log) != `{"host":"host-1","entries":[],"head":{"seq":2}}` {
		t.Fatalf("host-1: %+v", r)
	}
	if saved, _ := os.ReadFile(filepath.Join(e.dir, "audit", "host-1.json")); string(saved) != `{"host":"host-1","entries":[],"head":{"seq":2}}` {
		t.Fatalf("host-1 copy not updated: %s", saved)
	}
	if r := res[1]; r.Host != "host-2" || r.Status != 0 || !strings.Contains(r.Error, "saved at") || r.Saved.IsZero() || string(r.Log) != logOf("host-2") {
		t.Fatalf("host-2: %+v", r)
	}
	if r := res[2]; r.Host != "host-3" || r.Status != 503 || !strings.Contains(r.Error, "disk full") || string(r.Log) != logOf("host-3") {
		t.Fatalf("host-3: %+v", r)
	}
	if r := res[3]; r.Host != "host-4" || r.Status != 0 || !strings.Contains(r.Error, "no saved copy") || r.Log != nil {
		t.Fatalf("host-4: %+v", r)
	}
	// A non-JSON answer does not replace the saved copy.
	a3.setAnswer("GET /v1/audit", 200, `not json`)
	e.must("GET", "/v1/audit", e.admin, nil, &res)
	if r := res[2]; !strings.Contains(r.Error, "not JSON") || string(r.Log) != logOf("host-3") {
		t.Fatalf("host-3: %+v", r)
	}
}

func TestVMAudit(t *testing.T) {
	e, agent, alpha := adminEnv(t, nil)
	beta := e.tenant("beta")
	want := `{"vm":"vm-1","entries":[{"op":"start","actor":"tenant"}]}`
	for _, tok := range []string{alpha, e.admin} {
		agent.reset()
		st, out := e.do("GET", "/v1/vms/vm-1/audit", tok, nil)
		if st != 200 || string(out) != want {
			t.Fatalf("audit %d %s", st, out)
		}
		if got := agent.requestsTo("GET", "/v1/vms/vm-1/audit"); len(got) != 1 {
			t.Fatalf("agent got %+v", agent.requests())
		}
	}
	agent.setAnswer("GET audit", 503, `{"code":"unavailable","message":"x"}`)
	if st, out := e.do("GET", "/v1/vms/vm-1/audit", alpha, nil); st != 503 || string(out) != `{"code":"unavailable","message":"x"}` {
		t.Fatalf("refusal %d %s", st, out)
	}
	agent.reset()
	st, out := e.do("GET", "/v1/vms/vm-1/audit", beta, nil)
	e.wantError(st, out, 403, proto.CodeForbidden, "another tenant")
	st, out = e.do("GET", "/v1/vms/vm-9/audit", alpha, nil)
	e.wantError(st, out, 404, proto.CodeNotFound, "not registered")
	if n := len(agent.requests()); n != 0 {
		t.Fatalf("refused audit relayed (%d)", n)
	}
}

func TestPlatformDeleteBudget(t *testing.T) {
	clock := &fakeClock{now: time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)}
	e := newEnv(t, func(c *Config) { c.AdminDeleteBudget = 3; c.Now = clock.Now })
	alpha := e.tenant("alpha")
	agent := newFakeAgent(t, "host-1")
	e.addHost(agent)
	for i := 1; i <= 9; i++ {
		e.must("POST", "/v1/vms", alpha, createBody(t, testSpec("alpha", fmt.Sprintf("vm-%d", i), fmt.Sprintf("n%d", i), "host-1")), nil)
	}
	del := func(name string, vm int, approvals ...*admin.Approval) (int, []byte) {
		return e.do("POST", fmt.Sprintf("/v1/vms/vm-%d/admin", vm), e.admin, envelope(t, adminReq(name, "host-1", fmt.Sprintf("vm-%d", vm), proto.OpDelete), approvals...))
	}
	// Refused by the agent: not counted.
	agent.setAnswer("POST admin", 403, `{"code":"forbidden","message":"no"}`)
	for range 5 {
		if st, _ := del("bob", 1); st != 403 {
			t.Fatalf("status %d", st)
		}
	}
	agent.clearAnswer("POST admin")
	// Other operations are not counted.
	for range 5 {
		e.must("POST", "/v1/vms/vm-1/admin", e.admin, envelope(t, adminReq("bob", "host-1", "vm-1", proto.OpPause)), nil)
	}
	for vm := 1; vm <= 3; vm++ {
		if st, out := del("bob", vm); st != 200 {
			t.Fatalf("delete %d: %d %s", vm, st, out)
		}
		clock.Add(time.Minute)
	}
	agent.reset()
	st, out := del("bob", 4)
	e.wantError(st, out, 429, proto.CodeRefused, "platform-wide delete budget: admin bob deleted 3 VMs in the last hour; further deletes need a quorum request (vmbond admin request)")
	if n := len(agent.requests()); n != 0 {
		t.Fatalf("refused delete relayed")
	}
	if vm, _ := e.srv.store.vm("vm-4"); vm.State != stateRegistered {
		t.Fatalf("vm-4 %q", vm.State)
	}
	// Another admin has a budget of their own; pause is never refused.
	if st, out := del("alice", 4); st != 200 {
		t.Fatalf("alice: %d %s", st, out)
	}
	e.must("POST", "/v1/vms/vm-5/admin", e.admin, envelope(t, adminReq("bob", "host-1", "vm-5", proto.OpPause)), nil)

	// With approvals (which the agent checks), bob's delete is relayed:
	// directly, and through a quorum request.
	env := envelope(t, adminReq("bob", "host-1", "vm-5", proto.OpDelete))
	if st, out := del("bob", 5, approval(t, "carol", env.Request.Digest())); st != 200 {
		t.Fatalf("approved delete: %d %s", st, out)
	}
	env = envelope(t, adminReq("bob", "host-1", "vm-6", proto.OpDelete))
	var rec requestRecord
	e.must("POST", "/v1/requests", e.admin, env, &rec)
	st, out = e.do("POST", "/v1/requests/"+rec.ID+"/execute", e.admin, nil)
	e.wantError(st, out, 429, proto.CodeRefused, "admin bob deleted 4 VMs")
	e.must("POST", "/v1/requests/"+rec.ID+"/approvals", e.admin, approval(t, "carol", env.Request.Digest()), nil)
	e.must("POST", "/v1/requests/"+rec.ID+"/execute", e.admin, nil, nil)
	if vm, _ := e.srv.store.vm("vm-6"); vm.State != stateDeleted {
		t.Fatalf("vm-6 %q", vm.State)
	}

	// A restart keeps the count.
	e.stop()
	e.start()
	st, out = del("bob", 7)
	e.wantError(st, out, 429, proto.CodeRefused, "admin bob deleted 5 VMs in the last hour")

	// The window slides: an hour after the first three deletes, only the two
	// approved ones still count.
	clock.Add(time.Hour - time.Minute)
	if st, out := del("bob", 7); st != 200 {
		t.Fatalf("after the window: %d %s", st, out)
	}
	st, out = del("bob", 8)
	e.wantError(st, out, 429, proto.CodeRefused, "admin bob deleted 3 VMs")
}

func TestPlatformDeleteBudgetDisabled(t *testing.T) {
	for _, tweak := range []func(*Config){
		func(c *Config) { c.AdminDeleteBudget = -1 },
		func(c *Config) { c.AdminDeleteWindow = -1 },
	} {
		e := newEnv(t, tweak)
		alpha := e.tenant("alpha")
		e.addHost(newFakeAgent(t, "host-1"))
		for i := 1; i <= DefaultAdminDeleteBudget+2; i++ {
			vm := fmt.Sprintf("vm-%d", i)
			e.must("POST", "/v1/vms", alpha, createBody(t, testSpec("alpha", vm, vm, "host-1")), nil)
			e.must("POST", "/v1/vms/"+vm+"/admin", e.admin, envelope(t, adminReq("bob", "host-1", vm, proto.OpDelete)), nil)
		}
	}
}

func TestWindowText(t *testing.T) {
	for d, want := range map[time.Duration]string{time.Hour: "hour", 2 * time.Hour: "2h", 30 * time.Minute: "30m", 90 * time.Minute: "1h30m", 45 * time.Second: "45s"} {
		if got := windowText(d); got != want {
			t.Errorf("windowText(%v) = %q, want %q", d, got, want)
		}
	}
}

// Deletes in flight count: concurrent deletes cannot all slip under the
// budget before the first one is recorded.
func TestPlatformDeleteBudgetInFlight(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.AdminDeleteBudget = 2 })
	alpha := e.tenant("alpha")
	agent := newFakeAgent(t, "host-1")
	e.addHost(agent)
	for i := 1; i <= 3; i++ {
		vm := fmt.Sprintf("vm-%d", i)
		e.must("POST", "/v1/vms", alpha, createBody(t, testSpec("alpha", vm, vm, "host-1")), nil)
	}
	arrived, release := make(chan struct{}, 3), make(chan struct{})
	agent.setOverride(func(w http.ResponseWriter, r *http.Request) {
		arrived <- struct{}{}
		<-release
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"host":"host-1","op":"delete"}`)
	})
	type answer struct {
		st  int
		out []byte
	}
	done := make(chan answer, 2)
	for _, vm := range []string{"vm-1", "vm-2"} {
		body, _ := json.Marshal(envelope(t, adminReq("bob", "host-1", vm, proto.OpDelete)))
		go func() {
			req, _ := http.NewRequest("POST", e.ts.URL+"/v1/vms/"+vm+"/admin", bytes.NewReader(body))
			req.Header.Set("Authorization", "Bearer "+e.admin)
			resp, err := e.ts.Client().Do(req)
			if err != nil {
				done <- answer{0, []byte(err.Error())}
				return
			}
			defer resp.Body.Close()
			out, _ := io.ReadAll(resp.Body)
			done <- answer{resp.StatusCode, out}
		}()
	}
	<-arrived
	<-arrived
	st, out := e.do("POST", "/v1/vms/vm-3/admin", e.admin, envelope(t, adminReq("bob", "host-1", "vm-3", proto.OpDelete)))
	close(release)
	e.wantError(st, out, 429, proto.CodeRefused, "admin bob deleted 2 VMs")
	for range 2 {
		if a := <-done; a.st != 200 {
			t.Fatalf("in-flight delete: %d %s", a.st, a.out)
		}
	}
	if n, err := e.srv.store.deletesSince("bob", time.Time{}); n != 2 || err != nil {
		t.Fatalf("recorded %d, %v", n, err)
	}
}
