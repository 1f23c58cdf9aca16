package agent

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmbond/vmbond/internal/bond"
	"github.com/vmbond/vmbond/internal/ca"
	"github.com/vmbond/vmbond/internal/proto"
)

func newTestAgent(t testing.TB) *Agent {
	t.Helper()
	dir, caDir := t.TempDir(), filepath.Join(t.TempDir(), "ca")
	if err := ca.Init(caDir); err != nil {
		t.Fatal(err)
	}
	id, err := InitIdentity(dir, "host1")
	if err != nil {
		t.Fatal(err)
	}
	cert, err := ca.SignHost(caDir, *id, nil, time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(cert)
	if err := InstallCert(dir, b); err != nil {
		t.Fatal(err)
	}
	a, err := New(Config{DataDir: dir, RunDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	return a
}

func TestIdentityIsKept(t *testing.T) {
	dir := t.TempDir()
	a, err := InitIdentity(dir, "host1")
	if err != nil {
		t.Fatal(err)
	}
	b, err := InitIdentity(dir, "host1")
	if err != nil || !bytes.Equal(a.SealKey, b.SealKey) {
		t.Fatalf("second init replaced the keys: %v", err)
	}
	if _, err := InitIdentity(dir, "host2"); err == nil {
		t.Fatal("agent changed its host ID")
	}
	if err := InstallCert(dir, []byte(`{"body":"e30=","sig":""}`)); err == nil {
		t.Fatal("installed a certificate for other keys")
	}
}

func TestBadBodiesGetClearErrors(t *testing.T) {
	a := newTestAgent(t)
	h := a.Handler()
	tests := []struct{ method, path, body, want string }{
		{"POST", "/v1/vms/web/register", `{`, "decode request body"},
		{"POST", "/v1/vms/web/register", `{"spec":"e30=","spec_mac":"","sealed_key":""}`, "spec version"},
		{"POST", "/v1/vms/web/command", `{"body":"bm90IGpzb24=","mac":""}`, "decode command"},
		{"POST", "/v1/vms/web/command", `{"body":"e30=","mac":"","extra":1}`, "unknown field"},
		{"POST", "/v1/vms/web/verify", `{"challenge":"AAAA"}`, "32-byte challenge"},
		{"POST", "/v1/vms/web/admin", `[]`, "decode request body"},
		{"POST", "/v1/vms/web/admin", `{"admin":"x","vm":"web","op":"status"}`, "unknown field"},
		{"POST", "/v1/vms/web/admin", `{"request":{"credential":{"body":"e30=","sig":""},"body":"e30=","sig":""}}`, "admin CA"},
		{"POST", "/v1/revocations", `{"body":"e30=","sig":""}`, "admin CA"},
		{"PUT", "/v1/vms/BAD/disk", ``, "invalid vm"},
		{"PUT", "/v1/vms/web/boot/bios", ``, "boot file"},
		{"POST", "/v1/vms/web/register", strings.Repeat(" ", proto.MaxBody+10), "over"},
	}
	for _, tt := range tests {
		t.Run(tt.path+" "+tt.want, func(t *testing.T) {
			w := httptest.NewRecorder()
			h.ServeHTTP(w, httptest.NewRequest(tt.method, tt.path, strings.NewReader(tt.body)))
			if w.Code < 400 || w.Code >= 500 {
				t.Fatalf("status %d", w.Code)
			}
			var e proto.Error
			if err := json.Unmarshal(w.Body.Bytes(), &e); err != nil || !strings.Contains(e.Message, tt.want) {
				t.Fatalf("answer %s, want a message mentioning %q", w.Body, tt.want)
			}
		})
	}
}

// FuzzAgentAPI throws arbitrary bodies at every agent endpoint: the agent
// must answer with a client error, never panic and never fail internally.
func FuzzAgentAPI(f *testing.F) {
	a := newTestAgent(f)
	h := a.Handler()
	f.Add(0, []byte(`{"spec":"e30=","spec_mac":"","sealed_key":""}`))
	f.Add(1, []byte(`{"body":"e30=","mac":""}`))
	f.Add(2, []byte(`{"challenge":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}`))
	f.Add(3, []byte(`{"request":{"credential":{"body":"e30=","sig":""},"body":"e30=","sig":""}}`))
	paths := []string{"/v1/vms/web/register", "/v1/vms/web/command", "/v1/vms/web/verify", "/v1/vms/web/admin"}
	f.Fuzz(func(t *testing.T, which int, body []byte) {
		path := paths[uint(which)%uint(len(paths))]
		w := httptest.NewRecorder()
		h.ServeHTTP(w, httptest.NewRequest(http.MethodPost, path, bytes.NewReader(body)))
		if w.Code >= 500 {
			t.Fatalf("%s answered %d: %s", path, w.Code, w.Body)
		}
	})
}

// TestRefusesWhenAuditLogUnwritable: with no record possible, the agent
// does not act.
func TestRefusesWhenAuditLogUnwritable(t *testing.T) {
	a := newTestAgent(t)
	h := a.Handler()
	key := bond.NewDiskKey()
	keys, _ := bond.Derive(key, "alice", "web")
	spec, _ := json.Marshal(proto.VMSpec{Version: proto.Version, Tenant: "alice", VM: "web", Name: "web", Host: "host1",
		MemoryMiB: 64, CPUs: 1, DiskSize: 1 << 20, Boot: proto.BootSpec{Mode: proto.BootDisk}, AdminAllowed: []string{"status"}})
	sealed, err := bond.SealDiskKey(a.id.sealKey.PublicKey().Bytes(), key, bond.Binding{Tenant: "alice", VM: "web", Host: "host1", Spec: spec})
	if err != nil {
		t.Fatal(err)
	}
	reg, _ := json.Marshal(proto.Registration{Spec: spec, SpecMAC: keys.SpecMAC(spec), SealedKey: sealed})
	w := httptest.NewRecorder()
	h.ServeHTTP(w, httptest.NewRequest("POST", "/v1/vms/web/register", bytes.NewReader(reg)))
	if w.Code != http.StatusOK {
		t.Fatalf("register: %d %s", w.Code, w.Body)
	}
	command := func() *httptest.ResponseRecorder {
		body, _ := json.Marshal(proto.CommandBody{Version: proto.Version, Tenant: "alice", VM: "web", Host: "host1", Op: "delete",
			Nonce: bond.NewDiskKey()[:16], Time: time.Now().UTC()})
		env, _ := json.Marshal(proto.Envelope{Body: body, MAC: keys.CommandMAC(a.lookup("web").rec.DescriptorID, body)})
		w := httptest.NewRecorder()
		h.ServeHTTP(w, httptest.NewRequest("POST", "/v1/vms/web/command", bytes.NewReader(env)))
		return w
	}
	a.audit.Close() // every later append fails
	if w := command(); w.Code != http.StatusServiceUnavailable || !strings.Contains(w.Body.String(), "record decision") {
		t.Fatalf("command with no audit log: %d %s", w.Code, w.Body)
	}
	if v := a.lookup("web"); v == nil || v.deletedAt() != nil {
		t.Fatal("the agent acted without a record")
	}
}
