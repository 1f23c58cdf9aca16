package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/vmbond/vmbond/internal/proto"
)

func TestHealth(t *testing.T) {
	e := newEnv(t, nil)
	st, out := e.do("GET", "/v1/health", "", nil)
	if st != 200 || strings.TrimSpace(string(out)) != `{"ok":true}` {
		t.Fatalf("health: %d %s", st, out)
	}
}

func TestAuthAndRoles(t *testing.T) {
	e := newEnv(t, nil)
	tenant := e.tenant("alpha")
	agent := newFakeAgent(t, "host-1")
	e.addHost(agent)

	tests := []struct {
		name   string
		method string
		path   string
		auth   string // full Authorization header value; "" for none
		body   string
		status int
		code   string
	}{
		{"health needs no token", "GET", "/v1/health", "", "", 200, ""},
		{"no token", "GET", "/v1/hosts", "", "", 401, proto.CodeUnauthorized},
		{"unknown token", "GET", "/v1/hosts", "Bearer nope", "", 401, proto.CodeUnauthorized},
		{"wrong scheme", "GET", "/v1/hosts", "Basic " + e.admin, "", 401, proto.CodeUnauthorized},
		{"empty bearer", "GET", "/v1/hosts", "Bearer ", "", 401, proto.CodeUnauthorized},
		{"tenant lists hosts", "GET", "/v1/hosts", "Bearer " + tenant, "", 200, ""},
		{"admin lists hosts", "GET", "/v1/hosts", "Bearer " + e.admin, "", 200, ""},
		{"tenant cannot list tenants", "GET", "/v1/tenants", "Bearer " + tenant, "", 403, proto.CodeForbidden},
		{"tenant cannot create tenants", "POST", "/v1/tenants", "Bearer " + tenant, `{"name":"beta"}`, 403, proto.CodeForbidden},
		{"tenant cannot add hosts", "POST", "/v1/hosts", "Bearer " + tenant, `{"url":"http://x"}`, 403, proto.CodeForbidden},
		{"admin cannot place", "POST", "/v1/placements", "Bearer " + e.admin, `{}`, 403, proto.CodeForbidden},
		{"admin cannot create vms", "POST", "/v1/vms", "Bearer " + e.admin, `{}`, 403, proto.CodeForbidden},
		{"admin cannot upload", "PUT", "/v1/vms/vm-1/disk", "Bearer " + e.admin, "x", 403, proto.CodeForbidden},
		{"admin cannot relay tenant commands", "POST", "/v1/vms/vm-1/command", "Bearer " + e.admin, "{}", 403, proto.CodeForbidden},
		{"tenant cannot send admin commands", "POST", "/v1/vms/vm-1/admin", "Bearer " + tenant, `{"op":"pause"}`, 403, proto.CodeForbidden},
		{"unknown token before unknown vm", "GET", "/v1/vms/vm-1", "Bearer nope", "", 401, proto.CodeUnauthorized},
		{"no route", "GET", "/v2/nothing", "", "", 404, proto.CodeNotFound},
		{"wrong method", "DELETE", "/v1/tenants", "Bearer " + e.admin, "", 405, proto.CodeBadRequest},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest(tc.method, e.ts.URL+tc.path, strings.NewReader(tc.body))
			if tc.auth != "" {
				req.Header.Set("Authorization", tc.auth)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			var pe proto.Error
			json.NewDecoder(resp.Body).Decode(&pe)
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d (%+v)", resp.StatusCode, tc.status, pe)
			}
			if tc.code != "" {
				if pe.Code != tc.code || pe.Message == "" {
					t.Errorf("error %+v, want code %q and a message", pe, tc.code)
				}
				if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
					t.Errorf("error content type %q", ct)
				}
			}
		})
	}
}

func TestTenants(t *testing.T) {
	e := newEnv(t, nil)
	var cred proto.TenantCredential
	e.must("POST", "/v1/tenants", e.admin, proto.CreateTenantRequest{Name: "alpha"}, &cred)
	if cred.Name != "alpha" || len(cred.Token) != 64 {
		t.Fatalf("credential %+v: want name alpha and a 64-hex-digit token", cred)
	}
	tests := []struct {
		name   string
		tenant string
		status int
		code   string
		msg    string
	}{
		{"duplicate", "alpha", 409, proto.CodeConflict, `tenant "alpha" already exists`},
		{"upper case", "Alpha", 400, proto.CodeBadRequest, "invalid tenant"},
		{"empty", "", 400, proto.CodeBadRequest, "invalid tenant"},
		{"path chars", "../x", 400, proto.CodeBadRequest, "invalid tenant"},
		{"reserved", "admin", 400, proto.CodeBadRequest, "reserved"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			st, out := e.do("POST", "/v1/tenants", e.admin, proto.CreateTenantRequest{Name: tc.tenant})
			e.wantError(st, out, tc.status, tc.code, tc.msg)
		})
	}
	e.must("POST", "/v1/tenants", e.admin, proto.CreateTenantRequest{Name: "beta"}, nil)
	var list []proto.TenantInfo
	e.must("GET", "/v1/tenants", e.admin, nil, &list)
	if len(list) != 2 || list[0].Name != "alpha" || list[1].Name != "beta" || list[0].Created == "" {
		t.Fatalf("tenants %+v", list)
	}
	// The token is stored only as a hash.
	db, err := os.ReadFile(filepath.Join(e.dir, "server.db"))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(db), cred.Token) || strings.Contains(string(db), e.admin) {
		t.Fatal("database contains a token in the clear")
	}
	// The credential works.
	e.must("GET", "/v1/hosts", cred.Token, nil, nil)
}

func TestAdminTokenFile(t *testing.T) {
	e := newEnv(t, nil)
	for _, p := range []string{e.dir, filepath.Join(e.dir, "admin.token")} {
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		want := os.FileMode(0o600)
		if fi.IsDir() {
			want = 0o700
		}
		if fi.Mode().Perm() != want {
			t.Errorf("%s mode %v, want %v", p, fi.Mode().Perm(), want)
		}
	}
	if len(e.admin) != 64 {
		t.Fatalf("admin token %q: want 64 hex digits", e.admin)
	}
}

func TestHostEnrolment(t *testing.T) {
	e := newEnv(t, nil)
	tenant := e.tenant("alpha")
	a1 := newFakeAgent(t, "host-1")
	hi := e.addHost(a1)
	if hi.ID != "host-1" || hi.URL != a1.srv.URL || string(hi.Cert.Body) != string(a1.cert().Body) || hi.VMs != 0 {
		t.Fatalf("host info %+v", hi)
	}
	// Same host id at a new URL: the URL is updated, no second host.
	moved := newFakeAgent(t, "host-1")
	hi = e.addHost(moved)
	if hi.URL != moved.srv.URL {
		t.Fatalf("re-added host URL %q, want %q", hi.URL, moved.srv.URL)
	}
	e.addHost(newFakeAgent(t, "host-0"))
	var list []proto.HostInfo
	e.must("GET", "/v1/hosts", tenant, nil, &list)
	if len(list) != 2 || list[0].ID != "host-0" || list[1].ID != "host-1" || list[1].URL != moved.srv.URL {
		t.Fatalf("hosts %+v", list)
	}

	// An agent whose identity is not a certificate, and one that is down.
	garbage := newFakeAgent(t, "x")
	garbage.setOverride(func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("not json")) })
	badID := newFakeAgent(t, "Bad ID!")
	down := newFakeAgent(t, "down")
	down.srv.Close()
	tests := []struct {
		name   string
		body   string
		status int
		code   string
		msg    string
	}{
		{"relative url", `{"url":"agent:8443"}`, 400, proto.CodeBadRequest, "invalid agent URL"},
		{"ftp url", `{"url":"ftp://agent"}`, 400, proto.CodeBadRequest, "invalid agent URL"},
		{"credentials in url", `{"url":"http://u:p@agent"}`, 400, proto.CodeBadRequest, "invalid agent URL"},
		{"not a certificate", `{"url":"` + garbage.srv.URL + `"}`, 502, proto.CodeUnavailable, "decode host certificate"},
		{"invalid host id", `{"url":"` + badID.srv.URL + `"}`, 502, proto.CodeUnavailable, "invalid host"},
		{"agent down", `{"url":"` + down.srv.URL + `"}`, 502, proto.CodeUnavailable, "fetch the host certificate"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			st, out := e.do("POST", "/v1/hosts", e.admin, tc.body)
			e.wantError(st, out, tc.status, tc.code, tc.msg)
			if n := e.counts()[1]; n != 2 {
				t.Fatalf("%d hosts after a refused enrolment, want 2", n)
			}
		})
	}
}

func TestPlacement(t *testing.T) {
	e := newEnv(t, nil)
	tenant := e.tenant("alpha")
	st, out := e.do("POST", "/v1/placements", tenant, proto.PlacementRequest{MemoryMiB: 256, CPUs: 1})
	e.wantError(st, out, 503, proto.CodeUnavailable, "no hosts")

	agents := map[string]*fakeAgent{}
	for _, id := range []string{"host-b", "host-a", "host-c"} {
		agents[id] = newFakeAgent(t, id)
		e.addHost(agents[id])
	}
	place := func() string {
		var hi proto.HostInfo
		e.must("POST", "/v1/placements", tenant, proto.PlacementRequest{MemoryMiB: 256, CPUs: 1}, &hi)
		return hi.ID
	}
	// All empty: ties go to the lowest id.
	if got := place(); got != "host-a" {
		t.Fatalf("placed on %s, want host-a", got)
	}
	for i, h := range []string{"host-a", "host-b", "host-a"} {
		spec := testSpec("alpha", fmt.Sprintf("vm-%d", i), fmt.Sprintf("n%d", i), h)
		e.must("POST", "/v1/vms", tenant, createBody(t, spec), nil)
	}
	// a: 2, b: 1, c: 0.
	if got := place(); got != "host-c" {
		t.Fatalf("placed on %s, want host-c", got)
	}
	var list []proto.HostInfo
	e.must("GET", "/v1/hosts", e.admin, nil, &list)
	got := map[string]int{}
	for _, h := range list {
		got[h.ID] = h.VMs
	}
	if got["host-a"] != 2 || got["host-b"] != 1 || got["host-c"] != 0 {
		t.Fatalf("vm counts %v", got)
	}
	st, out = e.do("POST", "/v1/placements", tenant, `{"memory_mib":-1}`)
	e.wantError(st, out, 400, proto.CodeBadRequest, "negative")
}

func TestBadBodies(t *testing.T) {
	e := newEnv(t, nil)
	tenant := e.tenant("alpha")
	agent := newFakeAgent(t, "host-1")
	e.addHost(agent)
	huge := `{"name":"` + strings.Repeat("a", proto.MaxBody) + `"}`
	tests := []struct {
		name  string
		path  string
		token string
		body  string
		msg   string
	}{
		{"tenant: empty", "/v1/tenants", e.admin, "", "empty request body"},
		{"tenant: truncated", "/v1/tenants", e.admin, `{"name":`, "invalid CreateTenantRequest JSON"},
		{"tenant: unknown field", "/v1/tenants", e.admin, `{"name":"x","admin":true}`, `unknown field "admin"`},
		{"tenant: trailing data", "/v1/tenants", e.admin, `{"name":"x"} {}`, "trailing data"},
		{"tenant: wrong type", "/v1/tenants", e.admin, `{"name":7}`, "invalid CreateTenantRequest JSON"},
		{"tenant: oversized", "/v1/tenants", e.admin, huge, "larger than 1048576 bytes"},
		{"host: unknown field", "/v1/hosts", e.admin, `{"url":"http://x","id":"h"}`, `unknown field "id"`},
		{"host: oversized", "/v1/hosts", e.admin, huge, "larger than"},
		{"placement: not json", "/v1/placements", tenant, `memory=1`, "invalid PlacementRequest JSON"},
		{"vm: unknown field", "/v1/vms", tenant, `{"registration":{},"x":1}`, `unknown field "x"`},
		{"vm: empty spec", "/v1/vms", tenant, `{"registration":{}}`, "invalid registration"},
		{"vm: spec not base64", "/v1/vms", tenant, `{"registration":{"spec":"!!"}}`, "invalid CreateVMRequest JSON"},
		{"vm: spec unknown field", "/v1/vms", tenant, `{"registration":{"spec":"eyJ4IjoxfQ=="}}`, `unknown field "x"`},
		{"vm: oversized", "/v1/vms", tenant, huge, "larger than"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := e.counts()
			st, out := e.do("POST", tc.path, tc.token, tc.body)
			e.wantError(st, out, 400, proto.CodeBadRequest, tc.msg)
			if after := e.counts(); after != before {
				t.Fatalf("state changed: %v -> %v", before, after)
			}
		})
	}
	if n := len(agent.requests()); n != 1 { // the enrolment's identity fetch
		t.Fatalf("agent saw %d requests, want 1", n)
	}
}

func TestRestartKeepsState(t *testing.T) {
	e := newEnv(t, nil)
	tenant := e.tenant("alpha")
	agent := newFakeAgent(t, "host-1")
	e.addHost(agent)
	e.must("POST", "/v1/vms", tenant, createBody(t, testSpec("alpha", "vm-1", "web", "host-1")), nil)
	adminBefore := e.admin

	e.stop()
	e.start()

	if e.admin != adminBefore {
		t.Fatal("admin token file changed across restart")
	}
	var tenants []proto.TenantInfo
	e.must("GET", "/v1/tenants", adminBefore, nil, &tenants)
	if len(tenants) != 1 || tenants[0].Name != "alpha" || tenants[0].VMs != 1 {
		t.Fatalf("tenants after restart %+v", tenants)
	}
	var hosts []proto.HostInfo
	e.must("GET", "/v1/hosts", tenant, nil, &hosts)
	if len(hosts) != 1 || hosts[0].ID != "host-1" || hosts[0].URL != agent.srv.URL || hosts[0].VMs != 1 {
		t.Fatalf("hosts after restart %+v", hosts)
	}
	agent.setInventory([]proto.VMState{{VM: "vm-1", Tenant: "alpha", Name: "web", State: "running"}})
	var vm proto.VMInfo
	e.must("GET", "/v1/vms/vm-1", tenant, nil, &vm)
	if vm.Tenant != "alpha" || vm.Host != "host-1" || vm.Name != "web" || vm.State != "running" {
		t.Fatalf("vm after restart %+v", vm)
	}
	rec, err := e.srv.store.vm("vm-1")
	if err != nil || rec.State != stateRegistered || string(rec.Spec) != string(testRegistration(t, testSpec("alpha", "vm-1", "web", "host-1")).Spec) {
		t.Fatalf("record after restart %+v, %v", rec, err)
	}
}

func TestNewErrors(t *testing.T) {
	if _, err := New(Config{}); err == nil {
		t.Fatal("New without a data directory succeeded")
	}
	dir := t.TempDir()
	// A data directory that is a file.
	file := filepath.Join(dir, "file")
	os.WriteFile(file, nil, 0o600)
	if _, err := New(Config{DataDir: file, Logger: testLogger(t)}); err == nil {
		t.Fatal("New on a file succeeded")
	}
	// A database already open by another server times out with an error.
	e := newEnv(t, nil)
	done := make(chan error, 1)
	go func() {
		s, err := New(e.cfg)
		if err == nil {
			s.Close()
		}
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("second server on the same data directory opened it")
		}
	case <-time.After(20 * time.Second):
		t.Fatal("second New did not give up")
	}
}

func TestRun(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Run(ctx, Config{DataDir: t.TempDir(), Logger: testLogger(t)}, addr) }()
	var resp *http.Response
	for i := 0; i < 100; i++ {
		resp, err = http.Get("http://" + addr + "/v1/health")
		if err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("server did not come up: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("health %d", resp.StatusCode)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
}

// TestTrustBoundary checks that the management server links nothing that
// could open a disk key or decrypt a sector. The standard library's
// crypto/tls (pulled in by net/http) itself imports crypto/hpke and
// crypto/hkdf for TLS 1.3 and ECH; those two are therefore refused when
// imported by any non-standard package (this one, the rest of vmbond or a
// third-party module), which is where key-opening code would come from.
func TestTrustBoundary(t *testing.T) {
	goBin := filepath.Join(runtime.GOROOT(), "bin", "go")
	cmd := exec.Command(goBin, "list", "-deps", "-f", "{{.ImportPath}}\t{{.Standard}}\t{{join .Imports \" \"}}", "github.com/vmbond/vmbond/internal/server")
	out, err := cmd.Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			t.Fatalf("go list: %v\n%s", err, ee.Stderr)
		}
		t.Fatalf("go list: %v", err)
	}
	forbiddenPkgs := []string{
		"github.com/vmbond/vmbond/internal/bond",
		"github.com/vmbond/vmbond/internal/xts",
		"github.com/vmbond/vmbond/internal/luks",
		"github.com/vmbond/vmbond/internal/disk",
		"github.com/vmbond/vmbond/internal/agent",
		"golang.org/x/crypto/xts",
		"golang.org/x/crypto/hkdf",
	}
	forbiddenImports := []string{"crypto/hpke", "crypto/hkdf"}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) < 10 {
		t.Fatalf("go list printed too little:\n%s", out)
	}
	sawSelf := false
	for _, line := range lines {
		f := strings.SplitN(line, "\t", 3)
		if len(f) != 3 {
			t.Fatalf("unexpected go list line %q", line)
		}
		pkg, std, imports := f[0], f[1] == "true", strings.Fields(f[2])
		if pkg == "github.com/vmbond/vmbond/internal/server" {
			sawSelf = true
		}
		for _, bad := range forbiddenPkgs {
			if pkg == bad || strings.HasPrefix(pkg, bad+"/") {
				t.Errorf("internal/server links %s, which can open disk keys or sectors", pkg)
			}
		}
		if std {
			continue
		}
		for _, imp := range imports {
			for _, bad := range forbiddenImports {
				if imp == bad {
					t.Errorf("%s (linked by internal/server) imports %s", pkg, imp)
				}
			}
		}
	}
	if !sawSelf {
		t.Fatal("go list output does not include internal/server itself")
	}
}
