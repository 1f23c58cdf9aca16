package server

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"testing"
	"time"
)

// FuzzCreateVM posts arbitrary bytes as the POST /v1/vms body. The server
// must never panic and never answer 5xx except 502 (agent unreachable).
func FuzzCreateVM(f *testing.F) {
	spec := testSpec("alpha", "vm-1", "web", "host-1")
	f.Add(createBody(f, spec))
	other := testSpec("beta", "vm-2", "db", "host-1")
	f.Add(createBody(f, other))
	missing := testSpec("alpha", "vm-3", "x", "host-9")
	f.Add(createBody(f, missing))
	f.Add([]byte(`{"registration":{"spec":"","spec_mac":null,"sealed_key":"AA=="}}`))
	f.Add([]byte(`{"registration":{"spec":"eyJ2ZXJzaW9uIjoidm1ib25kL3YxIn0="}}`))
	f.Add([]byte(`{}`))
	f.Add([]byte(``))
	f.Add([]byte(`[`))
	f.Add([]byte("\x00\xff"))

	dir := filepath.Join(f.TempDir(), "data")
	s, err := New(Config{DataDir: dir, Logger: testLogger(f), AgentTimeout: 2 * time.Second})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { s.Close() })
	agent := newFakeAgent(f, "host-1")
	h := s.Handler()
	call := func(method, path, token string, body []byte) *httptest.ResponseRecorder {
		req := httptest.NewRequest(method, path, bytes.NewReader(body))
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		return rec
	}
	admin := readToken(f, filepath.Join(dir, "admin.token"))
	if rec := call("POST", "/v1/hosts", admin, []byte(`{"url":"`+agent.srv.URL+`"}`)); rec.Code != http.StatusOK {
		f.Fatalf("add host: %d %s", rec.Code, rec.Body)
	}
	rec := call("POST", "/v1/tenants", admin, []byte(`{"name":"alpha"}`))
	if rec.Code != http.StatusCreated {
		f.Fatalf("create tenant: %d %s", rec.Code, rec.Body)
	}
	token := tokenOf(f, rec.Body.Bytes())

	f.Fuzz(func(t *testing.T, body []byte) {
		rec := call("POST", "/v1/vms", token, body)
		if rec.Code >= 500 && rec.Code != http.StatusBadGateway {
			t.Fatalf("status %d for body %q: %s", rec.Code, body, rec.Body)
		}
		if rec.Code < 200 || (rec.Code >= 300 && rec.Code < 400) {
			t.Fatalf("odd status %d", rec.Code)
		}
	})
}

// FuzzAdminEnvelope posts arbitrary bytes to the admin routes. The server
// must never panic, never answer 5xx except 502, and relay only what it
// accepted, byte for byte.
func FuzzAdminEnvelope(f *testing.F) {
	good, _ := json.Marshal(envelope(f, adminReq("bob", "host-1", "vm-1", "pause")))
	host, _ := json.Marshal(envelope(f, adminReq("bob", "host-1", "", "set-budget")))
	for _, b := range [][]byte{good, host, []byte(`{"request":{"body":"bnVsbA=="}}`), []byte(`{"request":{}}`), []byte(`{"approvals":[null]}`), []byte(`null`), []byte(``)} {
		f.Add(b)
	}
	dir := filepath.Join(f.TempDir(), "data")
	s, err := New(Config{DataDir: dir, Logger: testLogger(f), AgentTimeout: 2 * time.Second})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { s.Close() })
	agent := newFakeAgent(f, "host-1")
	h := s.Handler()
	call := func(method, path, token string, body []byte) *httptest.ResponseRecorder {
		req := httptest.NewRequest(method, path, bytes.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+token)
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		return rec
	}
	admin := readToken(f, filepath.Join(dir, "admin.token"))
	if rec := call("POST", "/v1/hosts", admin, []byte(`{"url":"`+agent.srv.URL+`"}`)); rec.Code != http.StatusOK {
		f.Fatalf("add host: %d %s", rec.Code, rec.Body)
	}
	token := tokenOf(f, call("POST", "/v1/tenants", admin, []byte(`{"name":"alpha"}`)).Body.Bytes())
	if rec := call("POST", "/v1/vms", token, createBody(f, testSpec("alpha", "vm-1", "web", "host-1"))); rec.Code != http.StatusOK {
		f.Fatalf("create vm: %d %s", rec.Code, rec.Body)
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		for _, path := range []string{"/v1/vms/vm-1/admin", "/v1/hosts/host-1/admin", "/v1/requests"} {
			agent.reset()
			rec := call("POST", path, admin, body)
			if rec.Code >= 500 && rec.Code != http.StatusBadGateway {
				t.Fatalf("%s: status %d for body %q: %s", path, rec.Code, body, rec.Body)
			}
			for _, r := range agent.requests() {
				if !bytes.Equal(r.Body, body) {
					t.Fatalf("%s: relayed %q for body %q", path, r.Body, body)
				}
			}
		}
	})
}
