package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/vmbond/vmbond/internal/bond"
	"github.com/vmbond/vmbond/internal/disk"
	"github.com/vmbond/vmbond/internal/fsutil"
	"github.com/vmbond/vmbond/internal/proto"
)

// maxImage bounds an uploaded disk image; maxBootFile a kernel or initrd.
const (
	maxImage    = 1 << 40
	maxBootFile = 256 << 20
)

// Handler returns the agent's HTTP API. Every caller is treated as possibly
// hostile: the management server relays tenants' requests but can also forge,
// replay, alter and redirect them.
func (a *Agent) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/identity", a.handleIdentity)
	mux.HandleFunc("GET /v1/vms", a.handleList)
	mux.HandleFunc("PUT /v1/vms/{vm}/disk", a.handleUploadDisk)
	mux.HandleFunc("PUT /v1/vms/{vm}/boot/{file}", a.handleUploadBoot)
	mux.HandleFunc("POST /v1/vms/{vm}/register", a.handleRegister)
	mux.HandleFunc("GET /v1/vms/{vm}/descriptor", a.handleDescriptor)
	mux.HandleFunc("POST /v1/vms/{vm}/verify", a.handleVerify)
	mux.HandleFunc("POST /v1/vms/{vm}/command", a.handleCommand)
	mux.HandleFunc("POST /v1/vms/{vm}/admin", a.handleAdmin)
	mux.HandleFunc("POST /v1/admin", a.handleHostAdmin)
	mux.HandleFunc("POST /v1/revocations", a.handleRevocations)
	mux.HandleFunc("GET /v1/audit", a.handleAudit)
	mux.HandleFunc("GET /v1/vms/{vm}/audit", a.handleVMAudit)
	// Anything else (raw QMP, unknown operations) is refused and recorded.
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		e := a.refuse(decision{actor: "server", op: r.Method + " " + r.URL.Path}, proto.CodeNotFound,
			"no such agent endpoint: the agent accepts only the operations of its command automata, never raw QMP")
		writeJSON(w, http.StatusNotFound, e)
	})
	return mux
}

func fail(w http.ResponseWriter, status int, e *proto.Error) { writeJSON(w, status, e) }

func readBody(r *http.Request, v any) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(r.Body, proto.MaxBody+1))
	if err != nil {
		return nil, fmt.Errorf("read request body: %w", err)
	}
	if len(b) > proto.MaxBody {
		return nil, fmt.Errorf("request body over %d bytes", proto.MaxBody)
	}
	if err := proto.DecodeStrict(b, v); err != nil {
		return nil, fmt.Errorf("decode request body: %w", err)
	}
	return b, nil
}

func (a *Agent) handleIdentity(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	w.Write(a.cert)
}

func (a *Agent) handleList(w http.ResponseWriter, r *http.Request) {
	a.mu.Lock()
	out := make([]proto.VMState, 0, len(a.vms))
	for _, v := range a.vms {
		state := v.stateName()
		v.mu.Lock()
		s := proto.VMState{VM: v.spec.VM, Tenant: v.spec.Tenant, Name: v.spec.Name, State: state, PID: v.rec.PID}
		v.mu.Unlock()
		out = append(out, s)
	}
	a.mu.Unlock()
	slices.SortFunc(out, func(x, y proto.VMState) int { return strings.Compare(x.VM, y.VM) })
	writeJSON(w, http.StatusOK, out)
}

func (a *Agent) incoming(name string) string { return filepath.Join(a.cfg.DataDir, "incoming", name) }

// handleUploadDisk stores an encrypted image for a VM not yet registered. A
// registered VM's disk can never be replaced through the API: that would let
// the operator swap the tenant's disk or destroy it.
func (a *Agent) handleUploadDisk(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("vm")
	d := decision{actor: "server", vm: name, op: "upload-disk"}
	if err := proto.ValidID("vm", name); err != nil {
		fail(w, http.StatusBadRequest, a.refuse(d, proto.CodeBadRequest, err.Error()))
		return
	}
	if a.lookup(name) != nil {
		fail(w, http.StatusConflict, a.refuse(d, proto.CodeConflict, "VM "+name+" is registered: its disk cannot be replaced"))
		return
	}
	dir := a.incoming(name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		fail(w, http.StatusInternalServerError, &proto.Error{Code: proto.CodeInternal, Message: err.Error()})
		return
	}
	n, err := fsutil.WriteSparse(filepath.Join(dir, "disk.img"), http.MaxBytesReader(w, r.Body, maxImage))
	if err != nil {
		fail(w, http.StatusBadRequest, a.refuse(d, proto.CodeBadRequest, "receive disk image: "+err.Error()))
		return
	}
	a.allow(d, fmt.Sprintf("%d bytes of ciphertext received", n))
	w.WriteHeader(http.StatusNoContent)
}

func (a *Agent) handleUploadBoot(w http.ResponseWriter, r *http.Request) {
	name, file := r.PathValue("vm"), r.PathValue("file")
	d := decision{actor: "server", vm: name, op: "upload-" + file}
	if err := proto.ValidID("vm", name); err != nil || (file != "kernel" && file != "initrd") {
		fail(w, http.StatusBadRequest, a.refuse(d, proto.CodeBadRequest, "bad VM name or boot file (kernel or initrd)"))
		return
	}
	if a.lookup(name) != nil {
		fail(w, http.StatusConflict, a.refuse(d, proto.CodeConflict, "VM "+name+" is registered: its boot files cannot be replaced"))
		return
	}
	dir := a.incoming(name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		fail(w, http.StatusInternalServerError, &proto.Error{Code: proto.CodeInternal, Message: err.Error()})
		return
	}
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBootFile))
	if err == nil {
		err = os.WriteFile(filepath.Join(dir, file), b, 0o600)
	}
	if err != nil {
		fail(w, http.StatusBadRequest, a.refuse(d, proto.CodeBadRequest, "receive "+file+": "+err.Error()))
		return
	}
	a.allow(d, fmt.Sprintf("%d bytes", len(b)))
	w.WriteHeader(http.StatusNoContent)
}

// handleRegister takes a VM: it opens the sealed key (which fails unless the
// blob was sealed to this host for this tenant, VM and spec), checks the spec
// MAC, checks the disk and boot files against the key and the spec, and
// issues the first descriptor.
func (a *Agent) handleRegister(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("vm")
	var reg proto.Registration
	body, err := readBody(r, &reg)
	d := decision{actor: "server", vm: name, op: "register", request: body}
	if err != nil {
		fail(w, http.StatusBadRequest, a.refuse(d, proto.CodeBadRequest, err.Error()))
		return
	}
	spec, err := reg.DecodeSpec()
	if err != nil {
		fail(w, http.StatusBadRequest, a.refuse(d, proto.CodeBadRequest, err.Error()))
		return
	}
	d.actor = "tenant:" + spec.Tenant
	if spec.VM != name {
		fail(w, http.StatusForbidden, a.refuse(d, proto.CodeRefused, fmt.Sprintf("registration is for VM %s but was delivered for %s: redirected", spec.VM, name)))
		return
	}
	if spec.Host != a.HostID() {
		fail(w, http.StatusForbidden, a.refuse(d, proto.CodeRefused, fmt.Sprintf("registration is for host %s, this is %s: redirected", spec.Host, a.HostID())))
		return
	}
	a.mu.Lock()
	existing := a.vms[name]
	a.mu.Unlock()
	if a.store.purged(name) {
		fail(w, http.StatusConflict, a.refuse(d, proto.CodeConflict, "VM "+name+" was purged on this host; its key was destroyed and cannot be registered again"))
		return
	}
	if existing != nil {
		fail(w, http.StatusConflict, a.refuse(d, proto.CodeConflict, "VM "+name+" is already registered on this host; a second registration would replace its owner's key and is refused"))
		return
	}
	v, err := a.openVM(&reg)
	if err != nil {
		fail(w, http.StatusForbidden, a.refuse(d, proto.CodeAuthFailed, err.Error()))
		return
	}
	if err := a.adopt(v); err != nil {
		fail(w, http.StatusForbidden, a.refuse(d, proto.CodeRefused, err.Error()))
		return
	}
	v.rec = &record{Registration: reg, Epoch: 1, DescriptorID: newDescriptorID()}
	if err := a.allow(d, "registered"); err != nil {
		os.RemoveAll(v.dir)
		fail(w, http.StatusServiceUnavailable, &proto.Error{Code: proto.CodeUnavailable, Message: err.Error()})
		return
	}
	if err := a.store.put(name, v.rec); err != nil {
		os.RemoveAll(v.dir)
		fail(w, http.StatusInternalServerError, &proto.Error{Code: proto.CodeInternal, Message: "save registration: " + err.Error()})
		return
	}
	a.mu.Lock()
	a.vms[name] = v
	a.mu.Unlock()
	a.reply(w, v, body, "register", "stopped", "", nil)
}

// adopt moves the uploaded disk and boot files of a VM being registered into
// its directory after checking them: the disk must be a LUKS image under the
// tenant's key with the spec's size, boot files must match the spec's hashes.
// With no uploaded disk it creates a blank one.
func (a *Agent) adopt(v *vm) error {
	in := a.incoming(v.spec.VM)
	defer os.RemoveAll(in)
	if err := os.MkdirAll(v.dir, 0o700); err != nil {
		return err
	}
	ok := false
	defer func() {
		if !ok {
			os.RemoveAll(v.dir)
		}
	}()
	for _, f := range []string{"kernel", "initrd"} {
		if err := os.Rename(filepath.Join(in, f), filepath.Join(v.dir, f)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	if err := v.checkBootFiles(); err != nil {
		return err
	}
	img := filepath.Join(in, "disk.img")
	if _, err := os.Stat(img); err == nil {
		dk, err := disk.Open(img, v.diskKey)
		if err != nil {
			return fmt.Errorf("uploaded disk is not the tenant's: %w", err)
		}
		size := dk.Size()
		dk.Close()
		if size != v.spec.DiskSize {
			return fmt.Errorf("uploaded disk holds %d bytes but the spec says %d", size, v.spec.DiskSize)
		}
		if err := os.Rename(img, v.diskPath()); err != nil {
			return err
		}
	} else if err := disk.Create(v.diskPath(), v.diskKey, v.keys.LUKSPassphrase(), v.spec.DiskSize); err != nil {
		return fmt.Errorf("create blank disk: %w", err)
	}
	ok = true
	return nil
}

func (a *Agent) descriptorBox(v *vm) (*proto.DescriptorBox, error) {
	v.mu.Lock()
	d := &proto.Descriptor{ID: v.rec.DescriptorID, VM: v.spec.VM, Host: a.HostID(), Epoch: v.rec.Epoch, Issued: a.cfg.Now().UTC()}
	v.mu.Unlock()
	return v.keys.SealDescriptor(d)
}

func (a *Agent) handleDescriptor(w http.ResponseWriter, r *http.Request) {
	v := a.lookup(r.PathValue("vm"))
	if v == nil {
		fail(w, http.StatusNotFound, &proto.Error{Code: proto.CodeNotFound, Message: "no VM " + r.PathValue("vm") + " on host " + a.HostID()})
		return
	}
	box, err := a.descriptorBox(v)
	if err != nil {
		fail(w, http.StatusInternalServerError, &proto.Error{Code: proto.CodeInternal, Message: err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, box)
}

// handleVerify proves that this host holds the VM's disk key: a MAC of the
// client's challenge under a key derived from it, signed by the host key.
func (a *Agent) handleVerify(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("vm")
	var req proto.VerifyRequest
	body, err := readBody(r, &req)
	d := decision{actor: "server", vm: name, op: "verify", request: body}
	if err != nil || len(req.Challenge) != 32 {
		fail(w, http.StatusBadRequest, a.refuse(d, proto.CodeBadRequest, "verify needs a 32-byte challenge"))
		return
	}
	v := a.lookup(name)
	if v == nil {
		fail(w, http.StatusNotFound, a.refuse(d, proto.CodeNotFound, "no VM "+name+" on host "+a.HostID()))
		return
	}
	d.actor = "tenant:" + v.spec.Tenant
	vb, _ := json.Marshal(proto.VerifyBody{
		Version: proto.Version, Tenant: v.spec.Tenant, VM: name, Host: a.HostID(),
		Challenge: req.Challenge, Proof: v.keys.VerifyProof(a.HostID(), req.Challenge),
	})
	if err := a.allow(d, "key verification answered"); err != nil {
		fail(w, http.StatusServiceUnavailable, &proto.Error{Code: proto.CodeUnavailable, Message: err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, proto.VerifyReply{Body: vb, Sig: a.sign(vb)})
}

// handleCommand runs a tenant's command after checking, in order: it is for
// this VM and host, it is authenticated under the VM's key and current
// descriptor, it is fresh and not replayed, and its operation is in the
// automata.
func (a *Agent) handleCommand(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("vm")
	var env proto.Envelope
	_, err := readBody(r, &env)
	d := decision{actor: "server", vm: name, op: "command", request: env.Body}
	if err != nil {
		fail(w, http.StatusBadRequest, a.refuse(d, proto.CodeBadRequest, err.Error()))
		return
	}
	cmd, err := env.DecodeCommand()
	if err != nil {
		fail(w, http.StatusBadRequest, a.refuse(d, proto.CodeBadRequest, err.Error()))
		return
	}
	d.op = cmd.Op
	if cmd.VM != name {
		fail(w, http.StatusForbidden, a.refuse(d, proto.CodeRefused, fmt.Sprintf("command is for VM %s but was delivered for VM %s: redirected", cmd.VM, name)))
		return
	}
	if cmd.Host != a.HostID() {
		fail(w, http.StatusForbidden, a.refuse(d, proto.CodeRefused, fmt.Sprintf("command is for host %s but reached host %s: redirected", cmd.Host, a.HostID())))
		return
	}
	v := a.lookup(name)
	if v == nil {
		fail(w, http.StatusNotFound, a.refuse(d, proto.CodeNotFound, "no VM "+name+" on host "+a.HostID()+": redirected or deleted"))
		return
	}
	v.mu.Lock()
	descID := v.rec.DescriptorID
	v.mu.Unlock()
	if !v.keys.CheckCommandMAC(descID, env.Body, env.MAC) {
		fail(w, http.StatusForbidden, a.refuse(d, proto.CodeAuthFailed,
			"command is not authenticated by this VM's key and current descriptor: forged, altered, stale or meant for another VM"))
		return
	}
	d.actor = "tenant:" + v.spec.Tenant
	if cmd.Tenant != v.spec.Tenant {
		fail(w, http.StatusForbidden, a.refuse(d, proto.CodeRefused, "command names tenant "+cmd.Tenant+", VM belongs to "+v.spec.Tenant))
		return
	}
	now := a.cfg.Now()
	if skew := now.Sub(cmd.Time); skew > a.cfg.ClockSkew || skew < -a.cfg.ClockSkew {
		a.replyRefused(w, v, d, env.Body, cmd.Op, fmt.Sprintf("command time %s is %s from the agent's clock (limit %s): stale or replayed", cmd.Time.Format(time.RFC3339), skew.Round(time.Second), a.cfg.ClockSkew))
		return
	}
	if len(cmd.Nonce) != 16 {
		a.replyRefused(w, v, d, env.Body, cmd.Op, "command nonce must be 16 bytes")
		return
	}
	fresh, err := a.store.useNonce(name, cmd.Nonce, now, cmd.Time.Add(a.cfg.ClockSkew))
	if err != nil {
		fail(w, http.StatusServiceUnavailable, a.refuse(d, proto.CodeUnavailable, "record nonce: "+err.Error()))
		return
	}
	if !fresh {
		a.replyRefused(w, v, d, env.Body, cmd.Op, "command was already executed once: replay refused")
		return
	}
	if _, ok := automatonFor(cmd.Op); !ok {
		a.replyRefused(w, v, d, env.Body, cmd.Op, fmt.Sprintf("operation %q is not in the command automata", cmd.Op))
		return
	}
	if cmd.Op == proto.OpPurge && cmd.Args["confirm"] != cmd.VM {
		a.replyRefused(w, v, d, env.Body, cmd.Op, "purge destroys the key and disk for good: it needs the explicit confirmation confirm="+cmd.VM)
		return
	}
	if err := a.allow(d, "tenant command authenticated"); err != nil {
		fail(w, http.StatusServiceUnavailable, &proto.Error{Code: proto.CodeUnavailable, Message: err.Error()})
		return
	}
	a.execute(r.Context(), w, v, d, env.Body, cmd.Op)
}

// execute runs an authorised operation and seals the outcome to the tenant.
func (a *Agent) execute(ctx context.Context, w http.ResponseWriter, v *vm, d decision, request []byte, op string) {
	v.opMu.Lock()
	defer v.opMu.Unlock()
	state, output, err := a.operate(ctx, v, op)
	if err != nil {
		a.record(d, "failed", err.Error())
		a.reply(w, v, request, op, state, "", err)
		return
	}
	if op == proto.OpStart {
		v.mu.Lock()
		v.rec.Epoch++
		v.rec.DescriptorID = newDescriptorID()
		rec := *v.rec
		v.mu.Unlock()
		if err := a.store.put(v.spec.VM, &rec); err != nil {
			a.log.Error("save VM state", "vm", v.spec.VM, "err", err)
		}
	}
	a.reply(w, v, request, op, state, output, nil)
}

func (a *Agent) replyRefused(w http.ResponseWriter, v *vm, d decision, request []byte, op, reason string) {
	a.record(d, "refused", reason)
	a.reply(w, v, request, op, "", "", errors.New(reason))
}

// reply seals an answer to the tenant, bound to the request it answers.
func (a *Agent) reply(w http.ResponseWriter, v *vm, request []byte, op, state, output string, opErr error) {
	rb := &proto.ReplyBody{
		Version: proto.Version, VM: v.spec.VM, Host: a.HostID(), Op: op,
		Request: bond.RequestHash(request), OK: opErr == nil, State: state, Output: output, Time: a.cfg.Now().UTC(),
	}
	if opErr != nil {
		rb.Error = opErr.Error()
	}
	sealed, err := v.keys.SealReply(rb)
	if err != nil {
		fail(w, http.StatusInternalServerError, &proto.Error{Code: proto.CodeInternal, Message: err.Error()})
		return
	}
	status := http.StatusOK
	if opErr != nil {
		status = http.StatusConflict
	}
	writeJSON(w, status, sealed)
}
