package server

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/vmbond/vmbond/internal/admin"
	"github.com/vmbond/vmbond/internal/proto"
)

// adminEnv is a server with tenant alpha's vm-1 and vm-2 on host-1.
func adminEnv(t *testing.T, tweak func(*Config)) (*env, *fakeAgent, string) {
	t.Helper()
	e := newEnv(t, tweak)
	alpha := e.tenant("alpha")
	agent := newFakeAgent(t, "host-1")
	e.addHost(agent)
	e.must("POST", "/v1/vms", alpha, createBody(t, testSpec("alpha", "vm-1", "web", "host-1")), nil)
	e.must("POST", "/v1/vms", alpha, createBody(t, testSpec("alpha", "vm-2", "db", "host-1")), nil)
	agent.reset()
	return e, agent, alpha
}

func TestAdminCommandRelaysVerbatim(t *testing.T) {
	e, agent, _ := adminEnv(t, nil)

	tests := []struct {
		name string
		env  admin.Envelope
	}{
		{"plain", envelope(t, adminReq("bob", "host-1", "vm-1", proto.OpPause))},
		{"with approvals", envelope(t, adminReq("bob", "host-1", "vm-1", proto.OpStop),
			approval(t, "carol", bytes.Repeat([]byte{1}, 32)), approval(t, "dave", bytes.Repeat([]byte{2}, 32)))},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			agent.reset()
			body := oddJSON(t, tc.env)
			st, out := e.do("POST", "/v1/vms/vm-1/admin", e.admin, body)
			if st != 200 {
				t.Fatalf("admin %s: %d %s", tc.name, st, out)
			}
			reqs := agent.requests()
			if len(reqs) != 1 || reqs[0].Method != "POST" || reqs[0].Path != "/v1/vms/vm-1/admin" {
				t.Fatalf("agent got %+v", reqs)
			}
			if !bytes.Equal(reqs[0].Body, body) {
				t.Fatalf("agent got\n%s\nwant the admin's bytes\n%s", reqs[0].Body, body)
			}
			var reply proto.AdminReply
			if err := json.Unmarshal(out, &reply); err != nil || reply.VM != "vm-1" || reply.State != "paused" {
				t.Fatalf("reply %s: %v", out, err)
			}
		})
	}

	// The agent's refusal comes back verbatim.
	agent.setAnswer("POST admin", 403, `{"code":"refused","message":"policy does not allow stop"}`)
	st, out := e.do("POST", "/v1/vms/vm-1/admin", e.admin, envelope(t, adminReq("bob", "host-1", "vm-1", proto.OpStop)))
	if st != 403 || string(out) != `{"code":"refused","message":"policy does not allow stop"}` {
		t.Fatalf("refusal %d %s", st, out)
	}
	agent.clearAnswer("POST admin")
}

func TestAdminCommandRefusals(t *testing.T) {
	e, agent, alpha := adminEnv(t, nil)
	good := envelope(t, adminReq("bob", "host-1", "vm-1", proto.OpPause))
	mustJSON := func(v any) string {
		raw, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		return string(raw)
	}
	withBody := func(body string) string {
		env := good
		env.Request.Body = []byte(body)
		return mustJSON(env)
	}
	tooMany := good
	for range admin.MaxApprovals + 1 {
		tooMany.Approvals = append(tooMany.Approvals, approval(t, "carol", make([]byte, 32)))
	}
	tests := []struct {
		name, path, token, body string
		status                  int
		msg                     string
	}{
		{"wrong vm", "/v1/vms/vm-1/admin", e.admin, mustJSON(envelope(t, adminReq("bob", "host-1", "vm-2", proto.OpPause))), 400, `names vm "vm-2" but the path names "vm-1"`},
		{"host-wide request", "/v1/vms/vm-1/admin", e.admin, mustJSON(envelope(t, adminReq("bob", "host-1", "", "set-budget"))), 400, "names no vm"},
		{"wrong host", "/v1/vms/vm-1/admin", e.admin, mustJSON(envelope(t, adminReq("bob", "host-2", "vm-1", proto.OpPause))), 400, `is for host "host-2"`},
		{"unknown op", "/v1/vms/vm-1/admin", e.admin, mustJSON(envelope(t, adminReq("bob", "host-1", "vm-1", "format"))), 400, `unknown operation "format"`},
		{"bad admin name", "/v1/vms/vm-1/admin", e.admin, mustJSON(envelope(t, adminReq("Bob!", "host-1", "vm-1", proto.OpPause))), 400, "invalid admin"},
		{"unknown vm", "/v1/vms/vm-9/admin", e.admin, mustJSON(good), 404, "not registered"},
		{"bad vm id", "/v1/vms/VM_1/admin", e.admin, mustJSON(good), 400, "invalid vm"},
		{"tenant", "/v1/vms/vm-1/admin", alpha, mustJSON(good), 403, "only the admin"},
		{"empty", "/v1/vms/vm-1/admin", e.admin, "", 400, "empty request body"},
		{"old AdminCommand", "/v1/vms/vm-1/admin", e.admin, `{"op":"pause"}`, 400, `unknown field "op"`},
		{"unknown field", "/v1/vms/vm-1/admin", e.admin, strings.Replace(mustJSON(good), `{"request"`, `{"force":true,"request"`, 1), 400, `unknown field "force"`},
		{"trailing data", "/v1/vms/vm-1/admin", e.admin, mustJSON(good) + "{}", 400, "trailing data"},
		{"no request body", "/v1/vms/vm-1/admin", e.admin, withBody(""), 400, "no signed request body"},
		{"request body not JSON", "/v1/vms/vm-1/admin", e.admin, withBody("not json"), 400, "invalid admin request body JSON"},
		{"request body unknown field", "/v1/vms/vm-1/admin", e.admin, withBody(`{"version":"x","admin":"bob","host":"host-1","vm":"vm-1","op":"pause","sudo":true}`), 400, `unknown field "sudo"`},
		{"null approval", "/v1/vms/vm-1/admin", e.admin, strings.TrimSuffix(mustJSON(good), "}") + `,"approvals":[null]}`, 400, "approval #1 is empty"},
		{"too many approvals", "/v1/vms/vm-1/admin", e.admin, mustJSON(tooMany), 400, "at most 64"},
		{"oversized", "/v1/vms/vm-1/admin", e.admin, `{"request":{"body":"` + strings.Repeat("A", proto.MaxBody) + `"}}`, 400, "larger than"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			agent.reset()
			st, out := e.do("POST", tc.path, tc.token, tc.body)
			e.wantError(st, out, tc.status, "", tc.msg)
			if n := len(agent.requests()); n != 0 {
				t.Fatalf("refused admin envelope relayed (%d requests)", n)
			}
			if rec, _ := e.srv.store.vm("vm-1"); rec.State != stateRegistered {
				t.Fatalf("state %q changed", rec.State)
			}
		})
	}
}

func TestAdminDeleteMarksDeleted(t *testing.T) {
	e, agent, _ := adminEnv(t, nil)
	// A refused delete changes nothing.
	agent.setAnswer("POST admin", 403, `{"code":"forbidden","message":"budget"}`)
	st, _ := e.do("POST", "/v1/vms/vm-1/admin", e.admin, envelope(t, adminReq("bob", "host-1", "vm-1", proto.OpDelete)))
	if rec, _ := e.srv.store.vm("vm-1"); st != 403 || rec.State != stateRegistered {
		t.Fatalf("refused delete: %d, state %q", st, rec.State)
	}
	agent.clearAnswer("POST admin")
	e.must("POST", "/v1/vms/vm-1/admin", e.admin, envelope(t, adminReq("bob", "host-1", "vm-1", proto.OpDelete)), nil)
	if rec, _ := e.srv.store.vm("vm-1"); rec.State != stateDeleted {
		t.Fatalf("state %q after admin delete", rec.State)
	}
	if rec, _ := e.srv.store.vm("vm-2"); rec.State != stateRegistered {
		t.Fatalf("vm-2 state %q", rec.State)
	}
}

func TestHostAdmin(t *testing.T) {
	e, agent, alpha := adminEnv(t, nil)
	env := envelope(t, adminReq("bob", "host-1", "", "set-retention"),
		approval(t, "carol", make([]byte, 32)), approval(t, "dave", make([]byte, 32)))
	body := oddJSON(t, env)
	st, out := e.do("POST", "/v1/hosts/host-1/admin", e.admin, body)
	if st != 200 {
		t.Fatalf("host admin: %d %s", st, out)
	}
	reqs := agent.requests()
	if len(reqs) != 1 || reqs[0].Method != "POST" || reqs[0].Path != "/v1/admin" || !bytes.Equal(reqs[0].Body, body) {
		t.Fatalf("agent got %+v, want the admin's bytes on POST /v1/admin", reqs)
	}
	var reply proto.AdminReply
	if err := json.Unmarshal(out, &reply); err != nil || reply.Op != "set-retention" || reply.Host != "host-1" {
		t.Fatalf("reply %s: %v", out, err)
	}
	agent.setAnswer("POST /v1/admin", 403, `{"code":"forbidden","message":"quorum not met"}`)
	st, out = e.do("POST", "/v1/hosts/host-1/admin", e.admin, body)
	if st != 403 || string(out) != `{"code":"forbidden","message":"quorum not met"}` {
		t.Fatalf("refusal %d %s", st, out)
	}

	tests := []struct {
		name, path, token string
		body              any
		status            int
		msg               string
	}{
		{"names a vm", "/v1/hosts/host-1/admin", e.admin, envelope(t, adminReq("bob", "host-1", "vm-1", "set-budget")), 400, `names vm "vm-1"`},
		{"other host", "/v1/hosts/host-1/admin", e.admin, envelope(t, adminReq("bob", "host-2", "", "set-budget")), 400, `is for host "host-2"`},
		{"unknown host", "/v1/hosts/host-9/admin", e.admin, envelope(t, adminReq("bob", "host-9", "", "set-budget")), 404, "not found"},
		{"bad host id", "/v1/hosts/Host_1/admin", e.admin, envelope(t, adminReq("bob", "host-1", "", "set-budget")), 400, "invalid host"},
		{"tenant", "/v1/hosts/host-1/admin", alpha, envelope(t, adminReq("bob", "host-1", "", "set-budget")), 403, "only the admin"},
		{"not an envelope", "/v1/hosts/host-1/admin", e.admin, `{"op":"set-budget"}`, 400, "unknown field"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			agent.reset()
			st, out := e.do("POST", tc.path, tc.token, tc.body)
			e.wantError(st, out, tc.status, "", tc.msg)
			if n := len(agent.requests()); n != 0 {
				t.Fatalf("refused envelope relayed (%d requests)", n)
			}
		})
	}
}
