package server

import (
	"bytes"
	"encoding/json"
	"net/http"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/vmbond/vmbond/internal/proto"
)

func TestCreateVMPushesInOrder(t *testing.T) {
	e := newEnv(t, nil)
	tenant := e.tenant("alpha")
	agent := newFakeAgent(t, "host-1")
	e.addHost(agent)

	disk := bytes.Repeat([]byte("ciphertext"), 1000)
	kernel := []byte("kernel image")
	initrd := []byte("initrd image")
	e.must("PUT", "/v1/vms/vm-1/disk", tenant, disk, nil)
	e.must("PUT", "/v1/vms/vm-1/boot/kernel", tenant, kernel, nil)
	e.must("PUT", "/v1/vms/vm-1/boot/initrd", tenant, initrd, nil)
	agent.reset()

	spec := testSpec("alpha", "vm-1", "web", "host-1")
	reg := testRegistration(t, spec)
	body, _ := json.Marshal(proto.CreateVMRequest{Registration: reg})
	st, out := e.do("POST", "/v1/vms", tenant, body)
	if st != 200 || string(out) != `{"registered":"vm-1", "from":"fake agent"}` {
		t.Fatalf("create answer %d %q: want the agent's answer verbatim", st, out)
	}
	reqs := agent.requests()
	want := []struct {
		method, path string
		body         []byte
	}{
		{"PUT", "/v1/vms/vm-1/disk", disk},
		{"PUT", "/v1/vms/vm-1/boot/kernel", kernel},
		{"PUT", "/v1/vms/vm-1/boot/initrd", initrd},
		{"POST", "/v1/vms/vm-1/register", nil},
	}
	if len(reqs) != len(want) {
		t.Fatalf("agent got %d requests, want %d: %+v", len(reqs), len(want), reqs)
	}
	for i, w := range want {
		r := reqs[i]
		if r.Method != w.method || r.Path != w.path {
			t.Fatalf("request %d: %s %s, want %s %s", i, r.Method, r.Path, w.method, w.path)
		}
		if w.body != nil {
			if !bytes.Equal(r.Body, w.body) {
				t.Errorf("request %d: body differs (%d bytes, want %d)", i, len(r.Body), len(w.body))
			}
			if r.ContentLength != int64(len(w.body)) {
				t.Errorf("request %d: Content-Length %d, want %d", i, r.ContentLength, len(w.body))
			}
		}
	}
	var got proto.Registration
	if err := proto.DecodeStrict(reqs[3].Body, &got); err != nil {
		t.Fatalf("register body: %v", err)
	}
	if !reflect.DeepEqual(got, reg) {
		t.Fatalf("agent got registration %+v, want %+v", got, reg)
	}
	rec, err := e.srv.store.vm("vm-1")
	if err != nil || rec.State != stateRegistered || rec.Tenant != "alpha" || rec.Host != "host-1" || rec.Name != "web" {
		t.Fatalf("record %+v, %v", rec, err)
	}
}

func TestCreateVMWithoutUploads(t *testing.T) {
	e := newEnv(t, nil)
	tenant := e.tenant("alpha")
	agent := newFakeAgent(t, "host-1")
	e.addHost(agent)
	agent.reset()
	e.must("POST", "/v1/vms", tenant, createBody(t, testSpec("alpha", "vm-1", "web", "host-1")), nil)
	reqs := agent.requests()
	if len(reqs) != 1 || reqs[0].Path != "/v1/vms/vm-1/register" {
		t.Fatalf("agent requests %+v, want only register", reqs)
	}
}

func TestCreateVMAgentErrors(t *testing.T) {
	tests := []struct {
		name       string
		key        string // fake agent answer to override
		status     int
		body       string
		wantPushes int // requests the agent sees
	}{
		{"register refused", "POST register", 403, `{"code":"refused","message":"vm does not belong on this host"}`, 2},
		{"register auth failed", "POST register", 401, `{"code":"auth_failed","message":"spec MAC"}` + "\n", 2},
		{"disk refused", "PUT disk", 409, `{"code":"conflict","message":"disk exists"}`, 1},
		{"register odd answer", "POST register", 418, "teapot, not json", 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, nil)
			tenant := e.tenant("alpha")
			agent := newFakeAgent(t, "host-1")
			e.addHost(agent)
			e.must("PUT", "/v1/vms/vm-1/disk", tenant, "ciphertext", nil)
			agent.reset()
			agent.setAnswer(tc.key, tc.status, tc.body)
			st, out := e.do("POST", "/v1/vms", tenant, createBody(t, testSpec("alpha", "vm-1", "web", "host-1")))
			if st != tc.status || string(out) != tc.body {
				t.Fatalf("answer %d %q, want the agent's %d %q verbatim", st, out, tc.status, tc.body)
			}
			if n := len(agent.requests()); n != tc.wantPushes {
				t.Fatalf("agent saw %d requests, want %d", n, tc.wantPushes)
			}
			if _, err := e.srv.store.vm("vm-1"); err != errNotFound {
				t.Fatalf("record kept after the agent refused: %v", err)
			}
			// The tenant keeps its claim and can retry once the agent agrees.
			agent.setAnswer(tc.key, 200, `{"ok":true}`)
			e.must("POST", "/v1/vms", tenant, createBody(t, testSpec("alpha", "vm-1", "web", "host-1")), nil)
		})
	}

	t.Run("agent down", func(t *testing.T) {
		e := newEnv(t, nil)
		tenant := e.tenant("alpha")
		agent := newFakeAgent(t, "host-1")
		e.addHost(agent)
		agent.srv.Close()
		st, out := e.do("POST", "/v1/vms", tenant, createBody(t, testSpec("alpha", "vm-1", "web", "host-1")))
		e.wantError(st, out, 502, proto.CodeUnavailable, "register vm vm-1 on host host-1")
		if _, err := e.srv.store.vm("vm-1"); err != errNotFound {
			t.Fatalf("record kept after the agent was unreachable: %v", err)
		}
	})
}

func TestCreateVMRefusals(t *testing.T) {
	e := newEnv(t, nil)
	alpha := e.tenant("alpha")
	beta := e.tenant("beta")
	agent := newFakeAgent(t, "host-1")
	e.addHost(agent)
	e.must("POST", "/v1/vms", alpha, createBody(t, testSpec("alpha", "vm-1", "web", "host-1")), nil)
	e.must("PUT", "/v1/vms/vm-b/disk", beta, "beta's ciphertext", nil)

	bad := testSpec("alpha", "vm-9", "x", "host-1")
	bad.CPUs = 0
	tests := []struct {
		name   string
		token  string
		spec   proto.VMSpec
		status int
		code   string
		msg    string
	}{
		{"spec for another tenant", alpha, testSpec("beta", "vm-2", "db", "host-1"), 403, proto.CodeForbidden, `spec is for tenant "beta"`},
		{"unknown host", alpha, testSpec("alpha", "vm-2", "db", "host-9"), 404, proto.CodeNotFound, `host "host-9" is not enrolled`},
		{"already registered", alpha, testSpec("alpha", "vm-1", "other", "host-1"), 409, proto.CodeConflict, `vm "vm-1" is already registered`},
		{"registered by another tenant", beta, testSpec("beta", "vm-1", "other", "host-1"), 409, proto.CodeConflict, "already registered"},
		{"id uploaded by another tenant", alpha, testSpec("alpha", "vm-b", "other", "host-1"), 409, proto.CodeConflict, "taken by another tenant"},
		{"same name", alpha, testSpec("alpha", "vm-2", "web", "host-1"), 409, proto.CodeConflict, `already has a vm named "web"`},
		{"invalid spec", alpha, bad, 400, proto.CodeBadRequest, "cpus 0 out of range"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			agent.reset()
			before := e.counts()
			st, out := e.do("POST", "/v1/vms", tc.token, createBody(t, tc.spec))
			e.wantError(st, out, tc.status, tc.code, tc.msg)
			if after := e.counts(); after != before {
				t.Fatalf("state changed: %v -> %v", before, after)
			}
			if n := len(agent.requests()); n != 0 {
				t.Fatalf("agent contacted %d times for a refused VM", n)
			}
		})
	}
	// Another tenant may use the same name.
	e.must("POST", "/v1/vms", beta, createBody(t, testSpec("beta", "vm-2", "web", "host-1")), nil)
}

// command builds a command envelope as a client would (the MAC is opaque
// to the server).
func command(t *testing.T, vm, op string) []byte {
	body, _ := json.Marshal(proto.CommandBody{Version: proto.Version, Tenant: "alpha", VM: vm, Host: "host-1", Op: op, Nonce: make([]byte, 16), Time: time.Now().UTC()})
	env, _ := json.Marshal(proto.Envelope{Body: body, MAC: []byte("mac")})
	// Odd spacing: the relay must not re-encode.
	return append([]byte("  "), append(env, []byte("\n\n")...)...)
}

func TestOwnershipAndRelay(t *testing.T) {
	e := newEnv(t, nil)
	alpha := e.tenant("alpha")
	beta := e.tenant("beta")
	agent := newFakeAgent(t, "host-1")
	e.addHost(agent)
	e.must("POST", "/v1/vms", alpha, createBody(t, testSpec("alpha", "vm-1", "web", "host-1")), nil)

	t.Run("other tenant sees nothing", func(t *testing.T) {
		agent.reset()
		var list []proto.VMInfo
		e.must("GET", "/v1/vms", beta, nil, &list)
		if len(list) != 0 {
			t.Fatalf("beta lists %+v", list)
		}
		for _, r := range []struct{ method, path, body string }{
			{"GET", "/v1/vms/vm-1", ""},
			{"GET", "/v1/vms/vm-1/descriptor", ""},
			{"POST", "/v1/vms/vm-1/verify", `{"challenge":"AAAA"}`},
			{"POST", "/v1/vms/vm-1/command", string(command(t, "vm-1", "delete"))},
		} {
			st, out := e.do(r.method, r.path, beta, r.body)
			e.wantError(st, out, 403, proto.CodeForbidden, "belongs to another tenant")
		}
		for _, p := range []string{"/v1/vms/vm-1/disk", "/v1/vms/vm-1/boot/kernel"} {
			st, out := e.do("PUT", p, beta, "x")
			e.wantError(st, out, 409, proto.CodeConflict, "already registered")
		}
		if n := len(agent.requests()); n != 0 {
			t.Fatalf("agent contacted %d times on beta's behalf", n)
		}
	})

	t.Run("admin sees all, relays nothing of the tenant's", func(t *testing.T) {
		var list []proto.VMInfo
		e.must("GET", "/v1/vms", e.admin, nil, &list)
		if len(list) != 1 || list[0].ID != "vm-1" || list[0].Tenant != "alpha" {
			t.Fatalf("admin lists %+v", list)
		}
		e.must("GET", "/v1/vms/vm-1", e.admin, nil, nil)
		st, out := e.do("GET", "/v1/vms/vm-1/descriptor", e.admin, nil)
		e.wantError(st, out, 403, proto.CodeForbidden, "only a tenant")
	})

	t.Run("relay byte for byte", func(t *testing.T) {
		tests := []struct {
			method, suffix string
			body           []byte
			answerKey      string
			status         int
			answer         string
		}{
			{"GET", "/descriptor", nil, "", 200, `{"vm":"vm-1","host":"host-1","nonce":"AAAA","box":"BBBB"}`},
			{"GET", "/descriptor", nil, "GET descriptor", 404, `{"code":"not_found","message":"no descriptor yet"}`},
			{"POST", "/verify", []byte(" {\"challenge\" : \"AQID\"}\t"), "", 200, ""},
			{"POST", "/command", command(t, "vm-1", "status"), "", 200, ""},
			{"POST", "/command", command(t, "vm-1", "start"), "POST command", 401, `{"code":"auth_failed","message":"bad MAC"}`},
			{"POST", "/command", []byte("not even json"), "POST command", 400, `{"code":"bad_request","message":"agent says no"}`},
		}
		for _, tc := range tests {
			agent.reset()
			if tc.answerKey != "" {
				agent.setAnswer(tc.answerKey, tc.status, tc.answer)
			}
			st, out := e.do(tc.method, "/v1/vms/vm-1"+tc.suffix, alpha, tc.body)
			want := tc.answer
			if want == "" { // the fake agent echoes the body
				want = `{"echo":` + string(tc.body) + `}`
			}
			if st != tc.status || string(out) != want {
				t.Errorf("%s %s: answer %d %q, want %d %q", tc.method, tc.suffix, st, out, tc.status, want)
			}
			reqs := agent.requests()
			if len(reqs) != 1 || reqs[0].Method != tc.method || reqs[0].Path != "/v1/vms/vm-1"+tc.suffix || !bytes.Equal(reqs[0].Body, tc.body) {
				t.Errorf("%s %s: agent got %+v", tc.method, tc.suffix, reqs)
			}
			if tc.answerKey != "" {
				agent.clearAnswer(tc.answerKey)
			}
		}
		if rec, _ := e.srv.store.vm("vm-1"); rec.State != stateRegistered {
			t.Fatalf("state %q after non-delete commands", rec.State)
		}
	})

	t.Run("relay oversized body", func(t *testing.T) {
		agent.reset()
		st, out := e.do("POST", "/v1/vms/vm-1/verify", alpha, bytes.Repeat([]byte("x"), proto.MaxBody+1))
		e.wantError(st, out, 400, proto.CodeBadRequest, "larger than")
		if len(agent.requests()) != 0 {
			t.Fatal("oversized body relayed")
		}
	})

	t.Run("agent down", func(t *testing.T) {
		e2 := newEnv(t, nil)
		tok := e2.tenant("alpha")
		down := newFakeAgent(t, "host-1")
		e2.addHost(down)
		e2.must("POST", "/v1/vms", tok, createBody(t, testSpec("alpha", "vm-1", "web", "host-1")), nil)
		down.srv.Close()
		st, out := e2.do("POST", "/v1/vms/vm-1/command", tok, command(t, "vm-1", "start"))
		e2.wantError(st, out, 502, proto.CodeUnavailable, "relay to host host-1")
		var vm proto.VMInfo
		e2.must("GET", "/v1/vms/vm-1", tok, nil, &vm)
		if vm.State != "registered (host unreachable)" {
			t.Fatalf("state %q", vm.State)
		}
	})
}

func TestDeleteMarksState(t *testing.T) {
	e := newEnv(t, nil)
	alpha := e.tenant("alpha")
	agent := newFakeAgent(t, "host-1")
	e.addHost(agent)
	e.must("POST", "/v1/vms", alpha, createBody(t, testSpec("alpha", "vm-1", "web", "host-1")), nil)

	// Refused delete: nothing changes.
	agent.setAnswer("POST command", 401, `{"code":"auth_failed","message":"bad MAC"}`)
	st, _ := e.do("POST", "/v1/vms/vm-1/command", alpha, command(t, "vm-1", "delete"))
	if st != 401 {
		t.Fatalf("status %d", st)
	}
	if rec, _ := e.srv.store.vm("vm-1"); rec.State != stateRegistered {
		t.Fatalf("state %q after a refused delete", rec.State)
	}
	// A delete command naming another VM does not mark this one.
	agent.clearAnswer("POST command")
	e.must("POST", "/v1/vms/vm-1/command", alpha, command(t, "vm-other", "delete"), nil)
	if rec, _ := e.srv.store.vm("vm-1"); rec.State != stateRegistered {
		t.Fatalf("state %q after a delete for another vm", rec.State)
	}
	// Accepted delete.
	e.must("POST", "/v1/vms/vm-1/command", alpha, command(t, "vm-1", "delete"), nil)
	var vm proto.VMInfo
	e.must("GET", "/v1/vms/vm-1", alpha, nil, &vm)
	if vm.State != stateDeleted {
		t.Fatalf("state %q after delete, want deleted", vm.State)
	}
	var hosts []proto.HostInfo
	e.must("GET", "/v1/hosts", alpha, nil, &hosts)
	if hosts[0].VMs != 0 {
		t.Fatalf("deleted VM still counted: %+v", hosts[0])
	}
	// The name is free again; the id is not.
	e.must("POST", "/v1/vms", alpha, createBody(t, testSpec("alpha", "vm-2", "web", "host-1")), nil)
	st, out := e.do("POST", "/v1/vms", alpha, createBody(t, testSpec("alpha", "vm-1", "web2", "host-1")))
	e.wantError(st, out, 409, proto.CodeConflict, "already registered")
}

func TestVMStates(t *testing.T) {
	e := newEnv(t, nil)
	alpha := e.tenant("alpha")
	a1 := newFakeAgent(t, "host-1")
	a2 := newFakeAgent(t, "host-2")
	e.addHost(a1)
	e.addHost(a2)
	e.must("POST", "/v1/vms", alpha, createBody(t, testSpec("alpha", "vm-1", "web", "host-1")), nil)
	e.must("POST", "/v1/vms", alpha, createBody(t, testSpec("alpha", "vm-2", "db", "host-1")), nil)
	e.must("POST", "/v1/vms", alpha, createBody(t, testSpec("alpha", "vm-3", "cache", "host-2")), nil)
	a1.setInventory([]proto.VMState{
		{VM: "vm-1", Tenant: "alpha", Name: "web", State: "running", PID: 42},
		{VM: "vm-2", Tenant: "mallory", Name: "db", State: "running"}, // wrong tenant: not ours
	})
	a2.srv.Close()
	var list []proto.VMInfo
	e.must("GET", "/v1/vms", alpha, nil, &list)
	got := map[string]string{}
	for _, v := range list {
		got[v.ID] = v.State
		if v.Created == "" || v.Tenant != "alpha" {
			t.Errorf("vm info %+v", v)
		}
	}
	want := map[string]string{"vm-1": "running", "vm-2": "registered (not on host)", "vm-3": "registered (host unreachable)"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("states %v, want %v", got, want)
	}
	st, out := e.do("GET", "/v1/vms/vm-404", alpha, nil)
	e.wantError(st, out, 404, proto.CodeNotFound, `vm "vm-404" is not registered`)
	st, out = e.do("GET", "/v1/vms/"+strings.Repeat("a", 64), alpha, nil)
	e.wantError(st, out, 400, proto.CodeBadRequest, "invalid vm")
}

func TestInventoryTimeoutIsShort(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.AgentTimeout = time.Minute })
	alpha := e.tenant("alpha")
	agent := newFakeAgent(t, "host-1")
	e.addHost(agent)
	e.must("POST", "/v1/vms", alpha, createBody(t, testSpec("alpha", "vm-1", "web", "host-1")), nil)
	release := make(chan struct{})
	defer close(release)
	agent.setOverride(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})
	start := time.Now()
	var vm proto.VMInfo
	e.must("GET", "/v1/vms/vm-1", alpha, nil, &vm)
	if d := time.Since(start); d > inventoryTimeout+5*time.Second {
		t.Fatalf("inventory took %v", d)
	}
	if vm.State != "registered (host unreachable)" {
		t.Fatalf("state %q", vm.State)
	}
}
