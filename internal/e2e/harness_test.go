package e2e

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmbond/vmbond/internal/admin"
	"github.com/vmbond/vmbond/internal/agent"
	"github.com/vmbond/vmbond/internal/audit"
	"github.com/vmbond/vmbond/internal/ca"
	"github.com/vmbond/vmbond/internal/client"
	"github.com/vmbond/vmbond/internal/server"
)

// requireTool fails under CI and skips elsewhere when a tool is missing.
func requireTool(t testing.TB, name string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s is not installed (scripts/deps.sh installs it)", name)
		}
		t.Skipf("%s is not installed", name)
	}
}

// guest is the demo guest built by guest/build.sh.
type guest struct {
	Disk, DiskStay, Kernel, Initrd, Cmdline string
	DataSector                              int64
}

var (
	guestOnce sync.Once
	guestInfo guest
	guestErr  error
)

// buildGuest builds the tiny guest once per test binary.
func buildGuest(t testing.TB) guest {
	t.Helper()
	requireTool(t, "qemu-system-x86_64")
	guestOnce.Do(func() {
		root, _ := filepath.Abs("../..")
		out := filepath.Join(root, "build", "guest")
		cmd := exec.Command("bash", filepath.Join(root, "guest", "build.sh"), out)
		b, err := cmd.CombinedOutput()
		if err != nil {
			guestErr = err
			guestInfo.Cmdline = string(b)
			return
		}
		env := map[string]string{}
		data, _ := os.ReadFile(filepath.Join(out, "guest.env"))
		for _, line := range strings.Split(string(data), "\n") {
			if k, v, ok := strings.Cut(line, "="); ok {
				env[k] = strings.Trim(v, `"'`)
			}
		}
		guestInfo = guest{Disk: env["GUEST_DISK"], DiskStay: env["GUEST_DISK_STAY"], Kernel: env["GUEST_KERNEL"], Initrd: env["GUEST_INITRD"]}
		cmdline, _ := os.ReadFile(env["GUEST_CMDLINE_FILE"])
		guestInfo.Cmdline = strings.TrimSpace(string(cmdline))
		var n int64
		json.Unmarshal([]byte(env["GUEST_DATA_SECTOR"]), &n)
		guestInfo.DataSector = n
	})
	if guestErr != nil {
		t.Fatalf("build guest: %v\n%s", guestErr, guestInfo.Cmdline)
	}
	return guestInfo
}

// copyFile copies a guest image so each test boots its own.
func copyFile(t testing.TB, src string) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), filepath.Base(src))
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return dst
}

// testAgent is a real agent on a loopback port.
type testAgent struct {
	*agent.Agent
	URL     string
	DataDir string
	cancel  context.CancelFunc
	done    chan struct{}
}

// cluster is a CA, a server, agents and a tenant.
type cluster struct {
	t        testing.TB
	caDir    string
	server   *server.Server
	srvURL   string
	admin    *client.Client
	agents   map[string]*testAgent
	adminTok string
	// revList is the newest admin revocation list; skew moves the agents'
	// clock (agents' goroutines read it while tests change it).
	revList    *admin.RevocationList
	adminCAPub string
	skew       atomic.Int64
}

func (c *cluster) now() time.Time { return time.Now().Add(time.Duration(c.skew.Load())) }

// setClock moves the agents' clock d from real time.
func (c *cluster) setClock(d time.Duration) { c.skew.Store(int64(d)) }

// revocations signs revocation list number n revoking serials.
func (c *cluster) revocations(n uint64, serials ...string) *admin.RevocationList {
	c.t.Helper()
	l, err := admin.SignRevocations(c.caDir, serials, time.Now(), n)
	if err != nil {
		c.t.Fatal(err)
	}
	c.revList = l
	return l
}

// pushRevocations delivers the newest list straight to an agent.
func (c *cluster) pushRevocations(a *testAgent) {
	c.t.Helper()
	b, _ := json.Marshal(c.revList)
	resp, err := http.Post(a.URL+"/v1/revocations", "application/json", bytes.NewReader(b))
	if err != nil {
		c.t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		c.t.Fatalf("push revocations: %d", resp.StatusCode)
	}
}

// newAdmin makes an admin key, has the admin CA certify it, and returns a
// client logged in with the server's admin token and that credential.
func (c *cluster) newAdmin(name string) *client.Client {
	return c.newAdminIssued(name, time.Now(), 24*time.Hour)
}

// newAdminIssued is newAdmin with a credential issued at a given time.
func (c *cluster) newAdminIssued(name string, issued time.Time, validity time.Duration) *client.Client {
	c.t.Helper()
	dir := c.t.TempDir()
	pubPath, err := admin.GenerateKey(dir)
	if err != nil {
		c.t.Fatal(err)
	}
	b, _ := os.ReadFile(pubPath)
	pub, _ := ca.ParsePublicKey(b)
	cred, err := admin.SignCredential(c.caDir, name, []string{"operator"}, pub, validity, 7*24*time.Hour, issued)
	if err != nil {
		c.t.Fatal(err)
	}
	cb, _ := json.Marshal(cred)
	credPath := filepath.Join(dir, "cred.json")
	os.WriteFile(credPath, cb, 0o600)
	cl := c.login(dir, c.adminTok, "")
	if err := client.AdminLogin(cl.Config, filepath.Join(dir, admin.KeyFile), credPath); err != nil {
		c.t.Fatal(err)
	}
	return cl
}

// serialOf returns an admin client's credential serial.
func serialOf(t testing.TB, cl *client.Client) string {
	t.Helper()
	b, _ := os.ReadFile(cl.Config.AdminCred)
	var cred admin.Credential
	json.Unmarshal(b, &cred)
	var body admin.CredentialBody
	json.Unmarshal(cred.Body, &body)
	return body.Serial
}

func newCluster(t testing.TB, hosts ...string) *cluster {
	t.Helper()
	c := &cluster{t: t, caDir: filepath.Join(t.TempDir(), "ca"), agents: map[string]*testAgent{}}
	if err := ca.Init(c.caDir); err != nil {
		t.Fatal(err)
	}
	if err := admin.InitCA(c.caDir); err != nil {
		t.Fatal(err)
	}
	c.adminCAPub = filepath.Join(c.caDir, admin.CAPubFile)
	c.revocations(1)
	srvDir := t.TempDir()
	s, err := server.New(server.Config{DataDir: srvDir, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	c.server = s
	hs := httptest.NewServer(s.Handler())
	t.Cleanup(func() { hs.Close(); s.Close() })
	c.srvURL = hs.URL
	tok, err := os.ReadFile(filepath.Join(srvDir, "admin.token"))
	if err != nil {
		t.Fatal(err)
	}
	c.adminTok = strings.TrimSpace(string(tok))
	c.admin = c.newAdmin("ops")
	for _, h := range hosts {
		a := c.startAgent(h, t.TempDir())
		if _, err := c.admin.AddHost(context.Background(), a.URL); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

func testLogger(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	return slog.New(slog.DiscardHandler)
}

// startAgent initialises (if needed), certifies and starts an agent.
func (c *cluster) startAgent(host, dir string) *testAgent {
	t := c.t
	t.Helper()
	id, err := agent.InitIdentity(dir, host)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, agent.CertFile)); err != nil {
		cert, err := ca.SignHost(c.caDir, *id, nil, time.Hour, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		b, _ := json.Marshal(cert)
		if err := agent.InstallCert(dir, b); err != nil {
			t.Fatal(err)
		}
	}
	pub, _ := os.ReadFile(c.adminCAPub)
	if err := os.WriteFile(filepath.Join(dir, agent.AdminCAFile), pub, 0o644); err != nil {
		t.Fatal(err)
	}
	ag, err := agent.New(agent.Config{DataDir: dir, Logger: testLogger(t), Now: c.now})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ta := &testAgent{Agent: ag, URL: "http://" + l.Addr().String(), DataDir: dir, cancel: cancel, done: make(chan struct{})}
	go func() { ag.Serve(ctx, l); close(ta.done) }()
	c.agents[host] = ta
	c.pushRevocations(ta)
	t.Cleanup(func() { ta.stop() })
	return ta
}

func (a *testAgent) stop() {
	if a.cancel == nil {
		return
	}
	a.cancel()
	<-a.done
	a.Close()
	a.cancel = nil
}

// login makes a client keystore for a token.
func (c *cluster) login(dir, token, tenant string) *client.Client {
	c.t.Helper()
	pub, err := os.ReadFile(filepath.Join(c.caDir, ca.HostPubFile))
	if err != nil {
		c.t.Fatal(err)
	}
	ks := &client.Keystore{Dir: dir}
	if err := ks.SaveConfig(&client.Config{Server: c.srvURL, Token: token, Tenant: tenant, HostCA: string(pub)}); err != nil {
		c.t.Fatal(err)
	}
	cl, err := client.New(dir)
	if err != nil {
		c.t.Fatal(err)
	}
	return cl
}

// tenant creates a tenant account and its client.
func (c *cluster) tenant(name string) *client.Client {
	c.t.Helper()
	cred, err := c.admin.CreateTenant(context.Background(), name)
	if err != nil {
		c.t.Fatal(err)
	}
	return c.login(c.t.TempDir(), cred.Token, name)
}

// rewriteBody replaces a request's body.
func rewriteBody(r *http.Request, f func([]byte) []byte) {
	b, _ := io.ReadAll(r.Body)
	b = f(b)
	r.Body = io.NopCloser(bytes.NewReader(b))
	r.ContentLength = int64(len(b))
}

// auditHas reports whether an agent's audit log has a decision matching all
// the given fields (empty fields match anything) whose reason contains substr.
func auditHas(t testing.TB, a *testAgent, vm, op, decision, substr string) bool {
	t.Helper()
	evs, err := audit.ReadAll(a.AuditPath())
	if err != nil {
		t.Fatalf("audit log: %v", err)
	}
	for _, e := range evs {
		if (vm == "" || e.VM == vm) && (op == "" || e.Op == op) && e.Decision == decision && strings.Contains(e.Reason, substr) {
			return true
		}
	}
	return false
}

// waitConsole polls a VM's console (through the tenant's authenticated
// console command) until it contains want.
func waitConsole(t testing.TB, cl *client.Client, vm, want string, timeout time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		r, err := cl.Command(context.Background(), vm, "console")
		if err != nil {
			t.Fatalf("console: %v", err)
		}
		if strings.Contains(r.Output, want) {
			return r.Output
		}
		if time.Now().After(deadline) {
			t.Fatalf("console of %s never showed %q; it shows:\n%s", vm, want, r.Output)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// adminKeyAndCred reads an admin client's key and credential files.
func adminKeyAndCred(t testing.TB, cl *client.Client) (ed25519.PrivateKey, *admin.Credential) {
	t.Helper()
	priv, err := ca.LoadPrivateKey(cl.Config.AdminKey)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(cl.Config.AdminCred)
	var cred admin.Credential
	if err := json.Unmarshal(b, &cred); err != nil {
		t.Fatal(err)
	}
	return priv, &cred
}
