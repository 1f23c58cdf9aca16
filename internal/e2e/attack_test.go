package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmbond/vmbond/internal/agent"
	"github.com/vmbond/vmbond/internal/bond"
	"github.com/vmbond/vmbond/internal/ca"
	"github.com/vmbond/vmbond/internal/client"
	"github.com/vmbond/vmbond/internal/disk"
	"github.com/vmbond/vmbond/internal/proto"
)

// hostile puts a proxy between the server and an agent and re-enrols the
// agent at the proxy's address: from then on the server's traffic to that
// host passes through rewrite, as it would through a compromised server.
func (c *cluster) hostile(host string, rewrite func(r *http.Request)) {
	c.t.Helper()
	target, _ := url.Parse(c.agents[host].URL)
	p := httptest.NewServer(&httputil.ReverseProxy{Rewrite: func(pr *httputil.ProxyRequest) {
		pr.SetURL(target)
		rewrite(pr.Out)
	}})
	c.t.Cleanup(p.Close)
	if _, err := c.admin.AddHost(context.Background(), p.URL); err != nil {
		c.t.Fatal(err)
	}
}

// alterSpec rewrites the spec inside registrations in flight, leaving its
// MAC and sealed key as the tenant made them.
func alterSpec(alter func(*proto.VMSpec)) func(*http.Request) {
	return func(r *http.Request) {
		if !strings.HasSuffix(r.URL.Path, "/register") {
			return
		}
		rewriteBody(r, func(b []byte) []byte {
			var reg proto.Registration
			json.Unmarshal(b, &reg)
			var spec proto.VMSpec
			json.Unmarshal(reg.Spec, &spec)
			alter(&spec)
			reg.Spec, _ = json.Marshal(spec)
			out, _ := json.Marshal(reg)
			return out
		})
	}
}

func mustRedirection(t *testing.T, err error) {
	t.Helper()
	var re *client.RedirectionError
	if !errors.As(err, &re) {
		t.Fatalf("want a VM redirection error, got %v", err)
	}
	if !strings.Contains(err.Error(), "VM redirection detected") {
		t.Fatalf("error does not say so clearly: %v", err)
	}
}

func blankVM(t *testing.T, cl *client.Client, name, host string) *client.VMKey {
	t.Helper()
	vk, err := cl.Create(context.Background(), client.CreateOptions{Name: name, DiskSize: 8 << 20, Host: host})
	if err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
	return vk
}

// postAgent calls an agent's API directly, as a hostile server can.
func postAgent(t *testing.T, a *testAgent, path string, body []byte) (int, []byte) {
	t.Helper()
	resp, err := http.Post(a.URL+path, "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

// signedCommand builds a command the way the tenant's client does, with the
// tenant's own key, for an arbitrary operation.
func signedCommand(t *testing.T, c *cluster, vk *client.VMKey, op string) []byte {
	t.Helper()
	keys, _ := bond.Derive(vk.DiskKey, vk.Tenant, vk.ID)
	resp, err := http.Get(c.agents[vk.Host].URL + "/v1/vms/" + vk.ID + "/descriptor")
	if err != nil {
		t.Fatal(err)
	}
	var box proto.DescriptorBox
	json.NewDecoder(resp.Body).Decode(&box)
	resp.Body.Close()
	d, err := keys.OpenDescriptor(&box)
	if err != nil {
		t.Fatal(err)
	}
	nonce := make([]byte, 16)
	rand.Read(nonce)
	body, _ := json.Marshal(proto.CommandBody{Version: proto.Version, Tenant: vk.Tenant, VM: vk.ID, Host: vk.Host, Op: op, Nonce: nonce, Time: time.Now().UTC()})
	env, _ := json.Marshal(proto.Envelope{Body: body, MAC: keys.CommandMAC(d.ID, body)})
	return env
}

// openSealedError opens a sealed refusal with the tenant's key.
func openSealedError(t *testing.T, vk *client.VMKey, b []byte) string {
	t.Helper()
	keys, _ := bond.Derive(vk.DiskKey, vk.Tenant, vk.ID)
	var s proto.SealedReply
	if err := json.Unmarshal(b, &s); err != nil {
		t.Fatalf("not a sealed reply: %s", b)
	}
	r, err := keys.OpenReply(&s)
	if err != nil {
		t.Fatal(err)
	}
	if r.OK {
		t.Fatalf("agent ran it: %+v", r)
	}
	return r.Error
}

func TestAttackRedirectCommandToAnotherTenantsVM(t *testing.T) {
	c := newCluster(t, "host1")
	alice, bob := c.tenant("alice"), c.tenant("bob")
	a := blankVM(t, alice, "web", "host1")
	b := blankVM(t, bob, "db", "host1")
	ctx := context.Background()

	t.Run("command", func(t *testing.T) {
		c.hostile("host1", func(r *http.Request) {
			if strings.HasSuffix(r.URL.Path, "/command") {
				r.URL.Path = strings.Replace(r.URL.Path, a.ID, b.ID, 1)
			}
		})
		_, err := alice.Command(ctx, "web", "stop")
		mustRedirection(t, err)
		if !auditHas(t, c.agents["host1"], b.ID, "stop", "refused", "redirected") {
			t.Fatal("the agent did not log the redirected command")
		}
		if r, err := bob.Command(ctx, "db", "status"); err == nil && r.State != "stopped" {
			t.Fatalf("bob's VM changed: %s", r.State)
		}
	})
	t.Run("descriptor", func(t *testing.T) {
		c.hostile("host1", func(r *http.Request) {
			r.URL.Path = strings.Replace(r.URL.Path, a.ID, b.ID, 1)
		})
		_, err := alice.Command(ctx, "web", "status")
		mustRedirection(t, err)
	})
}

func TestAttackRedirectVerificationToAnotherHost(t *testing.T) {
	c := newCluster(t, "host1", "host2")
	alice := c.tenant("alice")
	vk := blankVM(t, alice, "web", "host1")
	h2 := c.agents["host2"]

	t.Run("to a host without the VM", func(t *testing.T) {
		target, _ := url.Parse(h2.URL)
		c.hostile("host1", func(r *http.Request) {
			if strings.HasSuffix(r.URL.Path, "/verify") {
				r.URL.Host = target.Host
			}
		})
		mustRedirection(t, alice.Verify(context.Background(), "web"))
		if !auditHas(t, h2, vk.ID, "verify", "refused", "no VM") {
			t.Fatal("host2 did not log the misdirected verification")
		}
	})
	t.Run("to a host where the admin registered the same VM with his own key", func(t *testing.T) {
		// The admin registers a VM with the tenant's VM ID on host2 with a
		// key of his own, then sends the tenant's verification there.
		regAs(t, c, h2, vk.Tenant, vk.ID, "host2", bond.NewDiskKey())
		target, _ := url.Parse(h2.URL)
		c.hostile("host1", func(r *http.Request) {
			if strings.HasSuffix(r.URL.Path, "/verify") {
				r.URL.Host = target.Host
			}
		})
		err := alice.Verify(context.Background(), "web")
		mustRedirection(t, err)
		if !strings.Contains(err.Error(), "host other than host1") {
			t.Fatalf("error does not name the wrong host: %v", err)
		}
	})
}

// regAs registers a blank VM directly on an agent, as a hostile admin can,
// and returns the registration's HTTP status and body.
func regAs(t *testing.T, c *cluster, a *testAgent, tenant, vmID, host string, key []byte) (int, []byte) {
	t.Helper()
	keys, _ := bond.Derive(key, tenant, vmID)
	spec, _ := json.Marshal(proto.VMSpec{Version: proto.Version, Tenant: tenant, VM: vmID, Name: "x", Host: host,
		MemoryMiB: 64, CPUs: 1, DiskSize: 1 << 20, Boot: proto.BootSpec{Mode: proto.BootDisk}, AdminAllowed: []string{"status", "stop", "delete"}})
	var hc proto.HostCert
	json.Unmarshal(mustGet(t, a.URL+"/v1/identity"), &hc)
	var body proto.HostCertBody
	json.Unmarshal(hc.Body, &body)
	sealed, err := bond.SealDiskKey(body.Identity.SealKey, key, bond.Binding{Tenant: tenant, VM: vmID, Host: host, Spec: spec})
	if err != nil {
		t.Fatal(err)
	}
	reg, _ := json.Marshal(proto.Registration{Spec: spec, SpecMAC: keys.SpecMAC(spec), SealedKey: sealed})
	return postAgent(t, a, "/v1/vms/"+vmID+"/register", reg)
}

func mustGet(t *testing.T, u string) []byte {
	t.Helper()
	resp, err := http.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return b
}

func TestAttackRegisterAdminKeyForTenantVM(t *testing.T) {
	c := newCluster(t, "host1")
	alice := c.tenant("alice")
	vk := blankVM(t, alice, "web", "host1")
	h1 := c.agents["host1"]

	t.Run("re-register a registered VM", func(t *testing.T) {
		status, b := regAs(t, c, h1, vk.Tenant, vk.ID, "host1", bond.NewDiskKey())
		if status != http.StatusConflict || !strings.Contains(string(b), "already registered") {
			t.Fatalf("re-registration answered %d %s", status, b)
		}
		if !auditHas(t, h1, vk.ID, "register", "refused", "already registered") {
			t.Fatal("not logged")
		}
		if err := alice.Verify(context.Background(), "web"); err != nil {
			t.Fatalf("tenant's key no longer verifies: %v", err)
		}
	})
	t.Run("swap the registration in flight", func(t *testing.T) {
		// The hostile server replaces the tenant's registration with one
		// for the same VM ID under the admin's key and disk.
		var swappedID string
		var mu sync.Mutex
		c.hostile("host1", func(r *http.Request) {
			if !strings.HasSuffix(r.URL.Path, "/register") {
				return
			}
			rewriteBody(r, func(b []byte) []byte {
				var reg proto.Registration
				json.Unmarshal(b, &reg)
				spec, _ := reg.DecodeSpec()
				mu.Lock()
				swappedID = spec.VM
				mu.Unlock()
				key := bond.NewDiskKey()
				keys, _ := bond.Derive(key, spec.Tenant, spec.VM)
				spec.DiskSize = 1 << 20
				sb, _ := json.Marshal(spec)
				var hc proto.HostCert
				json.Unmarshal(mustGet(t, h1.URL+"/v1/identity"), &hc)
				var body proto.HostCertBody
				json.Unmarshal(hc.Body, &body)
				sealed, _ := bond.SealDiskKey(body.Identity.SealKey, key, bond.Binding{Tenant: spec.Tenant, VM: spec.VM, Host: "host1", Spec: sb})
				out, _ := json.Marshal(proto.Registration{Spec: sb, SpecMAC: keys.SpecMAC(sb), SealedKey: sealed})
				return out
			})
		})
		_, err := alice.Create(context.Background(), client.CreateOptions{Name: "db", DiskSize: 8 << 20, Host: "host1"})
		mustRedirection(t, err)
		// The client cannot open that VM's descriptor, so it sends nothing.
		_, err = alice.Command(context.Background(), "db", "start")
		mustRedirection(t, err)
		// And a command under the tenant's key, sent anyway, is refused by
		// the agent: it does not hold her key, so nothing of hers runs there.
		mu.Lock()
		id := swappedID
		mu.Unlock()
		vk, err := alice.Store.Key("db")
		if err != nil {
			t.Fatal(err)
		}
		keys, _ := bond.Derive(vk.DiskKey, vk.Tenant, vk.ID)
		nonce := make([]byte, 16)
		rand.Read(nonce)
		body, _ := json.Marshal(proto.CommandBody{Version: proto.Version, Tenant: vk.Tenant, VM: id, Host: "host1", Op: "start", Nonce: nonce, Time: time.Now().UTC()})
		env, _ := json.Marshal(proto.Envelope{Body: body, MAC: keys.CommandMAC(make([]byte, 32), body)})
		if status, b := postAgent(t, h1, "/v1/vms/"+id+"/command", env); status != http.StatusForbidden {
			t.Fatalf("agent answered %d %s", status, b)
		}
		if !auditHas(t, h1, id, "start", "refused", "not authenticated") {
			t.Fatal("the agent did not log the refused command")
		}
	})
}

func TestAttackReplayCommand(t *testing.T) {
	c := newCluster(t, "host1")
	alice := c.tenant("alice")
	vk := blankVM(t, alice, "web", "host1")
	var captured []byte
	var mu sync.Mutex
	c.hostile("host1", func(r *http.Request) {
		if strings.HasSuffix(r.URL.Path, "/command") {
			rewriteBody(r, func(b []byte) []byte {
				mu.Lock()
				captured = append([]byte(nil), b...)
				mu.Unlock()
				return b
			})
		}
	})
	if _, err := alice.Command(context.Background(), "web", "status"); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	replay := captured
	mu.Unlock()
	status, b := postAgent(t, c.agents["host1"], "/v1/vms/"+vk.ID+"/command", replay)
	if status/100 == 2 {
		t.Fatalf("replay accepted: %d", status)
	}
	if msg := openSealedError(t, vk, b); !strings.Contains(msg, "replay") {
		t.Fatalf("refusal does not say replay: %s", msg)
	}
	if !auditHas(t, c.agents["host1"], vk.ID, "status", "refused", "replay") {
		t.Fatal("replay not logged")
	}
}

func TestAttackAlterCommandInFlight(t *testing.T) {
	tests := []struct {
		name  string
		alter func(*proto.CommandBody)
	}{
		{"operation", func(cb *proto.CommandBody) { cb.Op = "stop" }},
		{"arguments", func(cb *proto.CommandBody) { cb.Args = map[string]string{"force": "1"} }},
		{"time", func(cb *proto.CommandBody) { cb.Time = cb.Time.Add(time.Second) }},
	}
	c := newCluster(t, "host1")
	alice := c.tenant("alice")
	vk := blankVM(t, alice, "web", "host1")
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c.hostile("host1", func(r *http.Request) {
				if !strings.HasSuffix(r.URL.Path, "/command") {
					return
				}
				rewriteBody(r, func(b []byte) []byte {
					var env proto.Envelope
					json.Unmarshal(b, &env)
					var cb proto.CommandBody
					json.Unmarshal(env.Body, &cb)
					tt.alter(&cb)
					env.Body, _ = json.Marshal(cb)
					out, _ := json.Marshal(env)
					return out
				})
			})
			_, err := alice.Command(context.Background(), "web", "status")
			mustRedirection(t, err)
			if !auditHas(t, c.agents["host1"], vk.ID, "", "refused", "not authenticated") {
				t.Fatal("altered command not logged")
			}
		})
	}
}

func TestAttackOperationOutsideAutomata(t *testing.T) {
	c := newCluster(t, "host1")
	alice := c.tenant("alice")
	vk := blankVM(t, alice, "web", "host1")
	for _, op := range []string{"migrate", "human-monitor-command", "qmp", "device_add", "dump-guest-memory"} {
		t.Run(op, func(t *testing.T) {
			status, b := postAgent(t, c.agents["host1"], "/v1/vms/"+vk.ID+"/command", signedCommand(t, c, vk, op))
			if status/100 == 2 {
				t.Fatalf("agent accepted %s", op)
			}
			if msg := openSealedError(t, vk, b); !strings.Contains(msg, "not in the command automata") {
				t.Fatalf("refusal: %s", msg)
			}
			if !auditHas(t, c.agents["host1"], vk.ID, op, "refused", "not in the command automata") {
				t.Fatal("not logged")
			}
		})
	}
}

func TestAttackRawQMP(t *testing.T) {
	c := newCluster(t, "host1")
	alice := c.tenant("alice")
	vk := blankVM(t, alice, "web", "host1")
	h1 := c.agents["host1"]
	raw := []byte(`{"execute":"human-monitor-command","arguments":{"command-line":"info registers"}}`)
	for _, path := range []string{"/v1/vms/" + vk.ID + "/qmp", "/v1/qmp", "/v1/vms/" + vk.ID + "/command", "/v1/vms/" + vk.ID + "/admin"} {
		t.Run(path, func(t *testing.T) {
			status, b := postAgent(t, h1, path, raw)
			if status/100 == 2 {
				t.Fatalf("raw QMP accepted at %s: %s", path, b)
			}
			var e proto.Error
			if json.Unmarshal(b, &e) != nil || e.Message == "" {
				t.Fatalf("no clear error: %s", b)
			}
		})
	}
	if !auditHas(t, h1, "", "POST /v1/vms/"+vk.ID+"/qmp", "refused", "never raw QMP") {
		t.Fatal("raw QMP endpoint probe not logged")
	}
	if !auditHas(t, h1, vk.ID, "", "refused", "unknown field") {
		t.Fatal("raw QMP body on the command endpoint not logged")
	}
}

func TestAttackAdminOperationNotAllowed(t *testing.T) {
	c := newCluster(t, "host1")
	alice := c.tenant("alice")
	vk := blankVM(t, alice, "web", "host1") // default policy: status only
	ctx := context.Background()
	if r, err := c.admin.Admin(ctx, vk.ID, "status"); err != nil || r.State != "stopped" {
		t.Fatalf("allowed admin status: %v %+v", err, r)
	}
	for _, op := range []string{"start", "stop", "delete", "console", "pause"} {
		_, err := c.admin.Admin(ctx, vk.ID, op)
		var pe *proto.Error
		if !errors.As(err, &pe) || pe.Code != proto.CodeForbidden || !strings.Contains(pe.Message, "policy") {
			t.Fatalf("admin %s: want a policy refusal, got %v", op, err)
		}
		if !auditHas(t, c.agents["host1"], vk.ID, op, "refused", "policy does not let admins") {
			t.Fatalf("admin %s refusal not logged", op)
		}
	}
	// Widening the policy in flight breaks the registration's seal.
	c.hostile("host1", alterSpec(func(s *proto.VMSpec) { s.AdminAllowed = proto.Operations() }))
	_, err := alice.Create(ctx, client.CreateOptions{Name: "db", DiskSize: 8 << 20, Host: "host1"})
	if err == nil {
		t.Fatal("registration with a widened admin policy succeeded")
	}
	if !auditHas(t, c.agents["host1"], "", "register", "refused", "not sealed to this host for this tenant, VM and spec") {
		t.Fatal("tampered policy not logged")
	}
}

func TestAttackSubstituteBoot(t *testing.T) {
	g := buildGuest(t)
	c := newCluster(t, "host1")
	alice := c.tenant("alice")
	ctx := context.Background()
	h1 := c.agents["host1"]
	evil := filepath.Join(t.TempDir(), "evil")
	os.WriteFile(evil, []byte("not the tenant's kernel"), 0o600)
	evilBytes, _ := os.ReadFile(evil)

	t.Run("kernel", func(t *testing.T) {
		c.hostile("host1", func(r *http.Request) {
			if strings.HasSuffix(r.URL.Path, "/boot/kernel") {
				rewriteBody(r, func([]byte) []byte { return evilBytes })
			}
		})
		_, err := alice.Create(ctx, client.CreateOptions{Name: "k1", DiskSize: 8 << 20, Host: "host1", Kernel: g.Kernel, Initrd: g.Initrd, Cmdline: g.Cmdline})
		if err == nil || !strings.Contains(err.Error(), "substituted") {
			t.Fatalf("want a substitution refusal, got %v", err)
		}
		if !auditHas(t, h1, "", "register", "refused", "kernel has SHA-256") {
			t.Fatal("not logged")
		}
	})
	t.Run("initrd", func(t *testing.T) {
		c.hostile("host1", func(r *http.Request) {
			if strings.HasSuffix(r.URL.Path, "/boot/initrd") {
				rewriteBody(r, func([]byte) []byte { return evilBytes })
			}
		})
		_, err := alice.Create(ctx, client.CreateOptions{Name: "k2", DiskSize: 8 << 20, Host: "host1", Kernel: g.Kernel, Initrd: g.Initrd, Cmdline: g.Cmdline})
		if err == nil || !strings.Contains(err.Error(), "substituted") {
			t.Fatalf("want a substitution refusal, got %v", err)
		}
	})
	t.Run("command line", func(t *testing.T) {
		c.hostile("host1", alterSpec(func(s *proto.VMSpec) { s.Boot.Cmdline += " init=/bin/sh" }))
		_, err := alice.Create(ctx, client.CreateOptions{Name: "k3", DiskSize: 8 << 20, Host: "host1", Kernel: g.Kernel, Initrd: g.Initrd, Cmdline: g.Cmdline})
		if err == nil {
			t.Fatal("altered command line accepted")
		}
		if !auditHas(t, h1, "", "register", "refused", "not sealed to this host") {
			t.Fatal("not logged")
		}
	})
	t.Run("disk", func(t *testing.T) {
		// The operator's own LUKS image, under his key, in place of hers.
		img := filepath.Join(t.TempDir(), "evil.img")
		if err := disk.Create(img, bond.NewDiskKey(), []byte("pass"), 8<<20); err != nil {
			t.Fatal(err)
		}
		evilImg, _ := os.ReadFile(img)
		c.hostile("host1", func(r *http.Request) {
			if strings.HasSuffix(r.URL.Path, "/disk") {
				rewriteBody(r, func([]byte) []byte { return evilImg })
			}
		})
		_, err := alice.Create(ctx, client.CreateOptions{Name: "d1", Image: copyFile(t, g.Disk), Host: "host1"})
		if err == nil || !strings.Contains(err.Error(), "not the tenant's") {
			t.Fatalf("want a disk refusal, got %v", err)
		}
		if !auditHas(t, h1, "", "register", "refused", "uploaded disk is not the tenant's") {
			t.Fatal("not logged")
		}
	})
}

func TestAttackHostKeyNotSignedByCA(t *testing.T) {
	c := newCluster(t)
	// A rogue agent certified by a CA the tenant does not pin.
	rogueCA := filepath.Join(t.TempDir(), "rogue-ca")
	if err := ca.Init(rogueCA); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	id, err := agent.InitIdentity(dir, "rogue")
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := ca.SignHost(rogueCA, *id, nil, time.Hour, time.Now())
	cb, _ := json.Marshal(cert)
	if err := agent.InstallCert(dir, cb); err != nil {
		t.Fatal(err)
	}
	saved := c.caDir
	c.caDir = rogueCA // startAgent finds the cert installed and does not re-sign
	ra := c.startAgent("rogue", dir)
	c.caDir = saved
	if _, err := c.admin.AddHost(context.Background(), ra.URL); err != nil {
		t.Fatal(err)
	}
	alice := c.tenant("alice")
	_, err = alice.Create(context.Background(), client.CreateOptions{Name: "web", DiskSize: 8 << 20})
	if err == nil || !strings.Contains(err.Error(), "not signed by the pinned host CA") {
		t.Fatalf("want a CA refusal, got %v", err)
	}
	if keys, _ := alice.Store.Keys(); len(keys) != 0 {
		t.Fatal("a key was made for a rogue host")
	}
	if vms := mustGet(t, ra.URL+"/v1/vms"); strings.Contains(string(vms), "web") {
		t.Fatal("the rogue host received the VM")
	}
}
