package server

import (
	"bytes"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmbond/vmbond/internal/admin"
	"github.com/vmbond/vmbond/internal/proto"
)

// agentReq is what the fake agent received.
type agentReq struct {
	Method        string
	Path          string
	Body          []byte
	ContentLength int64
}

// canned is a fixed agent answer.
type canned struct {
	status int
	body   string
}

// fakeAgent is an httptest agent: it serves a certificate, a public
// inventory and fixed answers, and records every request.
type fakeAgent struct {
	id  string
	srv *httptest.Server

	mu        sync.Mutex
	reqs      []agentReq
	inventory []proto.VMState
	answers   map[string]canned // "POST register", "PUT disk", ... -> answer
	override  http.HandlerFunc  // if set, serves every request
}

func (a *fakeAgent) setOverride(h http.HandlerFunc) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.override = h
}

func newFakeAgent(t testing.TB, id string) *fakeAgent {
	t.Helper()
	a := &fakeAgent{id: id, answers: map[string]canned{}}
	a.srv = httptest.NewServer(http.HandlerFunc(a.serve))
	t.Cleanup(a.srv.Close)
	return a
}

func (a *fakeAgent) cert() proto.HostCert {
	body, _ := json.Marshal(proto.HostCertBody{
		Version:   proto.Version,
		Identity:  proto.HostIdentity{HostID: a.id, SigningKey: []byte("k"), KEM: 0x647a, SealKey: []byte("s")},
		Serial:    "1",
		NotBefore: time.Unix(0, 0).UTC(),
		NotAfter:  time.Unix(1<<32, 0).UTC(),
	})
	return proto.HostCert{Body: body, Sig: []byte("signature-not-checked-by-server")}
}

func (a *fakeAgent) setAnswer(key string, status int, body string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.answers[key] = canned{status, body}
}

func (a *fakeAgent) clearAnswer(key string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	delete(a.answers, key)
}

func (a *fakeAgent) setInventory(list []proto.VMState) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.inventory = list
}

func (a *fakeAgent) requests() []agentReq {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]agentReq(nil), a.reqs...)
}

func (a *fakeAgent) reset() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.reqs = nil
}

func (a *fakeAgent) serve(w http.ResponseWriter, r *http.Request) {
	a.mu.Lock()
	override := a.override
	a.mu.Unlock()
	if override != nil {
		override(w, r)
		return
	}
	body, _ := io.ReadAll(r.Body)
	a.mu.Lock()
	a.reqs = append(a.reqs, agentReq{Method: r.Method, Path: r.URL.RequestURI(), Body: body, ContentLength: r.ContentLength})
	a.mu.Unlock()
	reply := func(status int, v any) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		json.NewEncoder(w).Encode(v)
	}
	switch {
	case r.Method == "GET" && r.URL.Path == "/v1/identity":
		reply(200, a.cert())
		return
	case r.Method == "GET" && r.URL.Path == "/v1/vms":
		a.mu.Lock()
		inv := a.inventory
		a.mu.Unlock()
		if inv == nil {
			inv = []proto.VMState{}
		}
		reply(200, inv)
		return
	}
	// Host-wide routes: a canned answer under "METHOD /path", else a default.
	if !strings.HasPrefix(r.URL.Path, "/v1/vms/") {
		key := r.Method + " " + r.URL.Path
		a.mu.Lock()
		ans, ok := a.answers[key]
		a.mu.Unlock()
		if ok {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(ans.status)
			io.WriteString(w, ans.body)
			return
		}
		switch key {
		case "POST /v1/admin":
			req := envelopeRequest(body)
			reply(200, proto.AdminReply{Host: a.id, Op: req.Op, Note: "fake agent applied it"})
		case "POST /v1/revocations":
			w.WriteHeader(http.StatusNoContent)
		case "GET /v1/audit":
			w.Header().Set("Content-Type", "application/json")
			io.WriteString(w, `{"host":"`+a.id+`","entries":[{"seq":1,"op":"register"}],"head":{"seq":1,"sig":"AAAA"}}`)
		default:
			reply(404, proto.Error{Code: proto.CodeNotFound, Message: "fake agent: no route " + key})
		}
		return
	}
	parts := strings.Split(strings.TrimPrefix(r.URL.Path, "/v1/vms/"), "/")
	if len(parts) < 2 {
		reply(404, proto.Error{Code: proto.CodeNotFound, Message: "fake agent: no route"})
		return
	}
	key := r.Method + " " + strings.Join(parts[1:], "/")
	a.mu.Lock()
	ans, ok := a.answers[key]
	a.mu.Unlock()
	if ok {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(ans.status)
		io.WriteString(w, ans.body)
		return
	}
	switch key {
	case "PUT disk", "PUT boot/kernel", "PUT boot/initrd":
		reply(200, map[string]any{"bytes": len(body)})
	case "POST register":
		io.WriteString(w, `{"registered":"`+parts[0]+`", "from":"fake agent"}`)
	case "GET descriptor":
		io.WriteString(w, `{"vm":"`+parts[0]+`","host":"`+a.id+`","nonce":"AAAA","box":"BBBB"}`)
	case "POST verify", "POST command":
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"echo":`))
		w.Write(body)
		w.Write([]byte(`}`))
	case "POST admin":
		req := envelopeRequest(body)
		reply(200, proto.AdminReply{VM: parts[0], Host: a.id, Op: req.Op, State: "paused"})
	case "GET audit":
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"vm":"`+parts[0]+`","entries":[{"op":"start","actor":"tenant"}]}`)
	default:
		reply(404, proto.Error{Code: proto.CodeNotFound, Message: "fake agent: no route " + key})
	}
}

// envelopeRequest reads the public request body of an admin envelope, as
// the fake agent sees it (zero if it cannot).
func envelopeRequest(raw []byte) admin.RequestBody {
	var env admin.Envelope
	var req admin.RequestBody
	if json.Unmarshal(raw, &env) == nil {
		json.Unmarshal(env.Request.Body, &req)
	}
	return req
}

// requestsTo returns the requests the agent received for method and path.
func (a *fakeAgent) requestsTo(method, path string) []agentReq {
	var out []agentReq
	for _, r := range a.requests() {
		if r.Method == method && r.Path == path {
			out = append(out, r)
		}
	}
	return out
}

// adminReq builds an admin's request body: by name, for host and vm (""
// for host-wide), op.
func adminReq(name, host, vm, op string) admin.RequestBody {
	return admin.RequestBody{
		Version: proto.Version, Admin: name, Host: host, VM: vm, Op: op,
		Nonce: bytes.Repeat([]byte{byte(len(name) + len(vm) + len(op))}, admin.NonceSize),
		Time:  time.Date(2025, 6, 7, 8, 9, 10, 0, time.UTC),
	}
}

// envelope makes an admin envelope with fake credentials and signatures:
// the server verifies none of them.
func envelope(t testing.TB, req admin.RequestBody, approvals ...*admin.Approval) admin.Envelope {
	t.Helper()
	body, err := json.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	return admin.Envelope{
		Request: admin.SignedRequest{
			Credential: admin.Credential{Body: []byte(`{"name":"` + req.Admin + `"}`), Sig: []byte("ca-sig-not-checked")},
			Body:       body,
			Sig:        []byte("sig-of-" + req.Admin),
		},
		Approvals: approvals,
	}
}

// approval makes an approval by name of the request with digest.
func approval(t testing.TB, name string, digest []byte) *admin.Approval {
	t.Helper()
	body, err := json.Marshal(admin.ApprovalBody{Version: proto.Version, Admin: name, Request: digest, Expires: time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)})
	if err != nil {
		t.Fatal(err)
	}
	return &admin.Approval{
		Credential: admin.Credential{Body: []byte(`{"name":"` + name + `"}`), Sig: []byte("ca-sig")},
		Body:       body,
		Sig:        []byte("approval-sig-of-" + name),
	}
}

// oddJSON encodes v with indentation and spacing that no re-encoding by the
// server would reproduce, to test byte-for-byte relays.
func oddJSON(t testing.TB, v any) []byte {
	t.Helper()
	raw, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	if err := json.Indent(&b, raw, " ", "\t  "); err != nil {
		t.Fatal(err)
	}
	return append([]byte("  "), b.Bytes()...)
}

// fakeClock is a settable clock for Config.Now.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// env is a server under test behind httptest.
type env struct {
	t     *testing.T
	dir   string
	cfg   Config
	srv   *Server
	ts    *httptest.Server
	admin string
}

func testLogger(testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

func newEnv(t *testing.T, tweak func(*Config)) *env {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "data")
	cfg := Config{DataDir: dir, Logger: testLogger(t), AgentTimeout: 5 * time.Second}
	if tweak != nil {
		tweak(&cfg)
	}
	e := &env{t: t, dir: dir, cfg: cfg}
	e.start()
	t.Cleanup(e.stop)
	return e
}

func (e *env) start() {
	e.t.Helper()
	s, err := New(e.cfg)
	if err != nil {
		e.t.Fatalf("New: %v", err)
	}
	e.srv = s
	e.ts = httptest.NewServer(s.Handler())
	tok, err := os.ReadFile(filepath.Join(e.dir, "admin.token"))
	if err != nil {
		e.t.Fatalf("read admin token: %v", err)
	}
	e.admin = strings.TrimSpace(string(tok))
}

func (e *env) stop() {
	if e.ts != nil {
		e.ts.Close()
		e.ts = nil
	}
	if e.srv != nil {
		if err := e.srv.Close(); err != nil {
			e.t.Errorf("Close: %v", err)
		}
		e.srv = nil
	}
}

// do sends a request; body may be nil, []byte, string or io.Reader (sent
// chunked, without Content-Length).
func (e *env) do(method, path, token string, body any) (int, []byte) {
	e.t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case []byte:
		rd = bytes.NewReader(b)
	case string:
		rd = strings.NewReader(b)
	case io.Reader:
		rd = b
	default:
		raw, err := json.Marshal(b)
		if err != nil {
			e.t.Fatal(err)
		}
		rd = bytes.NewReader(raw)
	}
	req, err := http.NewRequest(method, e.ts.URL+path, rd)
	if err != nil {
		e.t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := e.ts.Client().Do(req)
	if err != nil {
		e.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	if err != nil {
		e.t.Fatal(err)
	}
	return resp.StatusCode, out
}

// must sends a request and decodes a 2xx JSON answer into v (if not nil).
func (e *env) must(method, path, token string, body, v any) {
	e.t.Helper()
	st, out := e.do(method, path, token, body)
	if st/100 != 2 {
		e.t.Fatalf("%s %s: status %d: %s", method, path, st, out)
	}
	if v != nil {
		if err := json.Unmarshal(out, v); err != nil {
			e.t.Fatalf("%s %s: decode %s: %v", method, path, out, err)
		}
	}
}

// wantError checks an error answer's status, code and message.
func (e *env) wantError(st int, out []byte, wantStatus int, wantCode, wantMsg string) {
	e.t.Helper()
	if st != wantStatus {
		e.t.Fatalf("status %d, want %d: %s", st, wantStatus, out)
	}
	var pe proto.Error
	if err := proto.DecodeStrict(out, &pe); err != nil {
		e.t.Fatalf("error body %q is not a proto.Error: %v", out, err)
	}
	if wantCode != "" && pe.Code != wantCode {
		e.t.Errorf("code %q, want %q (%s)", pe.Code, wantCode, pe.Message)
	}
	if !strings.Contains(pe.Message, wantMsg) {
		e.t.Errorf("message %q does not contain %q", pe.Message, wantMsg)
	}
}

func (e *env) tenant(name string) string {
	e.t.Helper()
	var cred proto.TenantCredential
	e.must("POST", "/v1/tenants", e.admin, proto.CreateTenantRequest{Name: name}, &cred)
	return cred.Token
}

func (e *env) addHost(a *fakeAgent) proto.HostInfo {
	e.t.Helper()
	var hi proto.HostInfo
	e.must("POST", "/v1/hosts", e.admin, proto.AddHostRequest{URL: a.srv.URL}, &hi)
	return hi
}

func testSpec(tenant, vm, name, host string) proto.VMSpec {
	return proto.VMSpec{
		Version: proto.Version, Tenant: tenant, VM: vm, Name: name, Host: host,
		MemoryMiB: 256, CPUs: 1, DiskSize: 1 << 20,
		Boot:         proto.BootSpec{Mode: proto.BootDisk},
		AdminAllowed: []string{proto.OpPause},
		Created:      time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC),
	}
}

func testRegistration(t testing.TB, spec proto.VMSpec) proto.Registration {
	raw, err := json.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	return proto.Registration{Spec: raw, SpecMAC: bytes.Repeat([]byte{0xAB}, 32), SealedKey: []byte("opaque sealed blob")}
}

func createBody(t testing.TB, spec proto.VMSpec) []byte {
	raw, err := json.Marshal(proto.CreateVMRequest{Registration: testRegistration(t, spec)})
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

// counts returns how many tenants, hosts and VMs the store holds.
func (e *env) counts() [3]int {
	e.t.Helper()
	ts, err := e.srv.store.tenants()
	if err != nil {
		e.t.Fatal(err)
	}
	hs, err := e.srv.store.hosts()
	if err != nil {
		e.t.Fatal(err)
	}
	vs, err := e.srv.store.vms()
	if err != nil {
		e.t.Fatal(err)
	}
	return [3]int{len(ts), len(hs), len(vs)}
}

func readToken(t testing.TB, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

func tokenOf(t testing.TB, body []byte) string {
	t.Helper()
	var cred proto.TenantCredential
	if err := json.Unmarshal(body, &cred); err != nil || cred.Token == "" {
		t.Fatalf("credential %s: %v", body, err)
	}
	return cred.Token
}
