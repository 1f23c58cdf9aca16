// Package agent is vmbond's trusted layer: the daemon that runs as root on
// every virtualisation host. It holds the host's identity keys, opens the disk
// keys tenants sealed to it (into memory only), serves each VM's disk to QEMU
// through its own encrypting NBD server, and drives QEMU over a private QMP
// socket with fixed command automata. It treats every request, including
// every request relayed by the management server, as possibly hostile, and
// records every decision in its audit log.
package agent

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/vmbond/vmbond/internal/admin"
	"github.com/vmbond/vmbond/internal/audit"
	"github.com/vmbond/vmbond/internal/bond"
	"github.com/vmbond/vmbond/internal/ca"
	"github.com/vmbond/vmbond/internal/proto"
)

// Config configures an Agent.
type Config struct {
	// DataDir holds the identity, the database, the audit log and the
	// encrypted disk images.
	DataDir string
	// RunDir holds the unix sockets of QEMU monitors and NBD exports. It
	// must be private to the agent. Empty means a directory derived from
	// DataDir under the system temp dir (unix socket paths are short).
	RunDir string
	// QEMU is the qemu-system binary. Empty means qemu-system-x86_64.
	QEMU string
	// ClockSkew is how far a command's time may be from the agent's clock.
	// Zero means 5 minutes.
	ClockSkew time.Duration
	// Retention is how long a deleted VM stays restorable. Zero means
	// DefaultRetention. A quorum of admins may change it (set-retention).
	Retention time.Duration
	// Budgets on destructive operations (delete, purge) per window, per
	// admin and per host; past them an operation needs a quorum. Zero
	// means the defaults; a quorum may change them (set-budget).
	BudgetPerAdmin, BudgetPerHost int
	BudgetWindow                  time.Duration
	// Quorum is how many other admins must approve a critical operation.
	Quorum int
	// RevocationMaxAge: with no admin revocation list younger than this,
	// every admin operation is refused. Zero means 24 hours.
	RevocationMaxAge time.Duration
	// ApprovalWindow is how old a request carrying approvals may be.
	ApprovalWindow time.Duration
	Logger         *slog.Logger
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// Agent is a running host agent.
type Agent struct {
	cfg   Config
	log   *slog.Logger
	id    *identity
	cert  []byte
	store *store
	audit *audit.Log
	// adminCA is nil when no admin CA is installed: admin operations are
	// then refused.
	adminCA     ed25519.PublicKey
	revocations *admin.RevocationState

	mu  sync.Mutex
	vms map[string]*vm
}

// New opens an agent's data directory. The identity must exist
// (InitIdentity) and be certified (InstallCert).
func New(cfg Config) (*Agent, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.QEMU == "" {
		cfg.QEMU = "qemu-system-x86_64"
	}
	if cfg.ClockSkew == 0 {
		cfg.ClockSkew = 5 * time.Minute
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.BudgetPerAdmin == 0 {
		cfg.BudgetPerAdmin = DefaultBudgetPerAdmin
	}
	if cfg.BudgetPerHost == 0 {
		cfg.BudgetPerHost = DefaultBudgetPerHost
	}
	if cfg.BudgetWindow == 0 {
		cfg.BudgetWindow = DefaultBudgetWindow
	}
	if cfg.Quorum == 0 {
		cfg.Quorum = DefaultQuorum
	}
	if cfg.RevocationMaxAge == 0 {
		cfg.RevocationMaxAge = admin.DefaultMaxRevocationAge
	}
	if cfg.ApprovalWindow == 0 {
		cfg.ApprovalWindow = DefaultApprovalWindow
	}
	if cfg.RunDir == "" {
		abs, err := filepath.Abs(cfg.DataDir)
		if err != nil {
			return nil, err
		}
		h := sha256.Sum256([]byte(abs))
		cfg.RunDir = filepath.Join(os.TempDir(), "vmbond-"+hex.EncodeToString(h[:6]))
	}
	id, err := loadIdentity(cfg.DataDir)
	if err != nil {
		return nil, err
	}
	cert, err := os.ReadFile(filepath.Join(cfg.DataDir, CertFile))
	if err != nil {
		return nil, fmt.Errorf("agent %s has no host certificate (have the security officer run `vmbond ca sign-host` on %s, then `vmbond agent install-cert`): %w",
			id.public.HostID, IdentityFile, err)
	}
	for _, d := range []string{cfg.RunDir, filepath.Join(cfg.DataDir, "vms"), filepath.Join(cfg.DataDir, "incoming"), filepath.Join(cfg.DataDir, "trash")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("create %s: %w", d, err)
		}
	}
	st, err := openStore(filepath.Join(cfg.DataDir, "agent.db"))
	if err != nil {
		return nil, err
	}
	al, err := audit.Open(filepath.Join(cfg.DataDir, "audit.log"))
	if err != nil {
		st.close()
		return nil, err
	}
	var adminCA ed25519.PublicKey
	if b, err := os.ReadFile(filepath.Join(cfg.DataDir, AdminCAFile)); err == nil {
		if adminCA, err = ca.ParsePublicKey(b); err != nil {
			st.close()
			al.Close()
			return nil, fmt.Errorf("read %s: %w", AdminCAFile, err)
		}
	}
	a := &Agent{
		cfg:   cfg,
		log:   cfg.Logger.With("host", id.public.HostID),
		id:    id,
		cert:  cert,
		store: st,
		audit: al,
		vms:   map[string]*vm{},

		adminCA: adminCA,
	}
	if adminCA != nil {
		a.revocations = admin.NewRevocationState(adminCA)
		var list admin.RevocationList
		if st.getMeta("revocations", &list) {
			if err := a.revocations.Update(&list); err != nil {
				a.log.Error("stored revocation list refused", "err", err)
			}
		}
	}
	if err := a.load(); err != nil {
		a.Close()
		return nil, err
	}
	return a, nil
}

// HostID is the agent's host identifier.
func (a *Agent) HostID() string { return a.id.public.HostID }

// AuditPath is the file of the agent's audit log.
func (a *Agent) AuditPath() string { return a.audit.Path() }

// load reopens every registered VM's key from its sealed blob and reattaches
// to QEMU processes that outlived a previous agent process.
func (a *Agent) load() error {
	recs, err := a.store.all()
	if err != nil {
		return fmt.Errorf("load VMs: %w", err)
	}
	for name, r := range recs {
		v, err := a.openVM(&r.Registration)
		if err != nil {
			a.log.Error("cannot reopen registered VM; leaving it stopped", "vm", name, "err", err)
			continue
		}
		v.rec = r
		a.vms[name] = v
		if r.Running {
			if err := a.reattach(context.Background(), v); err != nil {
				a.log.Warn("VM was running but cannot be reattached; marking it stopped", "vm", name, "err", err)
				v.rec.Running = false
				a.store.put(name, v.rec)
			}
		}
	}
	return nil
}

// Close stops serving disks of running VMs (QEMU keeps running and reconnects
// to its disk when the agent is back) and closes the database and log.
func (a *Agent) Close() error {
	a.mu.Lock()
	for _, v := range a.vms {
		v.detach()
	}
	a.mu.Unlock()
	a.audit.Close()
	return a.store.close()
}

// openVM opens a registration's sealed key and checks its spec MAC.
func (a *Agent) openVM(reg *proto.Registration) (*vm, error) {
	spec, err := reg.DecodeSpec()
	if err != nil {
		return nil, err
	}
	if spec.Host != a.HostID() {
		return nil, fmt.Errorf("spec is for host %q, this is %q", spec.Host, a.HostID())
	}
	key, err := bond.OpenDiskKey(a.id.sealKey, reg.SealedKey, bond.Binding{Tenant: spec.Tenant, VM: spec.VM, Host: a.HostID(), Spec: reg.Spec})
	if err != nil {
		return nil, err
	}
	keys, err := bond.Derive(key, spec.Tenant, spec.VM)
	if err != nil {
		return nil, err
	}
	if !keys.CheckSpecMAC(reg.Spec, reg.SpecMAC) {
		return nil, fmt.Errorf("spec of %s is not authenticated by its disk key", spec.VM)
	}
	return &vm{spec: spec, diskKey: key, keys: keys, dir: filepath.Join(a.cfg.DataDir, "vms", spec.VM)}, nil
}

func (a *Agent) lookup(name string) *vm {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.vms[name]
}

// decision is one audited outcome.
type decision struct {
	actor, vm, op string
	request       []byte
}

// refuse logs and audits a refusal and returns the error to send. If the
// audit log cannot be written the caller still refuses.
func (a *Agent) refuse(d decision, code, reason string) *proto.Error {
	a.record(d, audit.Refused, reason)
	return &proto.Error{Code: code, Message: reason}
}

// allow audits an allowed decision. It fails when the audit log cannot be
// written: the agent does not act without a record.
func (a *Agent) allow(d decision, note string) error {
	return a.record(d, audit.Allowed, note)
}

func (a *Agent) record(d decision, outcome, reason string) error {
	e := audit.Event{Host: a.HostID(), Actor: d.actor, VM: d.vm, Op: d.op, Decision: outcome, Reason: reason}
	if d.request != nil {
		e.Request = hex.EncodeToString(bond.RequestHash(d.request))
	}
	level := slog.LevelInfo
	if outcome == audit.Refused {
		level = slog.LevelWarn
	}
	a.log.Log(context.Background(), level, "decision", "decision", outcome, "actor", d.actor, "vm", d.vm, "op", d.op, "reason", reason)
	if _, err := a.audit.Append(e); err != nil {
		a.log.Error("audit log write failed", "err", err)
		return fmt.Errorf("record decision: %w", err)
	}
	return nil
}

func newDescriptorID() []byte {
	b := make([]byte, 32)
	rand.Read(b)
	return b
}

// sign signs bytes with the host signing key.
func (a *Agent) sign(b []byte) []byte { return ed25519.Sign(a.id.signer, b) }

// Serve serves the agent API on l until ctx is done.
func (a *Agent) Serve(ctx context.Context, l net.Listener) error {
	srv := &http.Server{Handler: a.Handler(), ReadHeaderTimeout: 10 * time.Second}
	ctx, cancel := context.WithCancel(ctx)
	purged := make(chan struct{})
	go func() {
		defer close(purged)
		a.purgeLoop(ctx)
	}()
	defer func() {
		cancel()
		<-purged
	}()
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve agent API: %w", err)
	}
	return nil
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}
