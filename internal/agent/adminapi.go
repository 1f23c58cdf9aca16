package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"

	"github.com/vmbond/vmbond/internal/admin"
	"github.com/vmbond/vmbond/internal/proto"
)

// authenticateAdmin verifies an admin's signed request: credential from the
// admin CA, not expired, not revoked under a fresh revocation list, signature,
// clock, nonce, and that it names this host and VM. Nothing the server says
// about who the admin is counts.
func (a *Agent) authenticateAdmin(env *admin.Envelope, vm string, d *decision) (*admin.RequestBody, *admin.CredentialBody, int, *proto.Error) {
	if a.adminCA == nil {
		return nil, nil, http.StatusForbidden, a.refuse(*d, proto.CodeForbidden, "no admin CA is installed on host "+a.HostID()+": every admin operation is refused")
	}
	skew := a.cfg.ClockSkew
	if len(env.Approvals) > 0 {
		skew = a.cfg.ApprovalWindow // a request waits for its approvals
	}
	now := a.cfg.Now()
	req, cred, err := admin.VerifyRequest(a.adminCA, a.revocations, &env.Request, now, a.cfg.RevocationMaxAge, skew)
	if err != nil {
		return nil, nil, http.StatusForbidden, a.refuse(*d, proto.CodeForbidden, err.Error())
	}
	d.actor, d.op, d.request = "admin:"+cred.Name, req.Op, env.Request.Body
	if req.Host != a.HostID() || req.VM != vm {
		return nil, nil, http.StatusForbidden, a.refuse(*d, proto.CodeRefused,
			fmt.Sprintf("request is for VM %q on host %s but was delivered for VM %q on host %s: redirected", req.VM, req.Host, vm, a.HostID()))
	}
	fresh, err := a.store.useNonce("admin/"+cred.Name, req.Nonce, now, req.Time.Add(skew))
	if err != nil {
		return nil, nil, http.StatusServiceUnavailable, a.refuse(*d, proto.CodeUnavailable, "record nonce: "+err.Error())
	}
	if !fresh {
		return nil, nil, http.StatusForbidden, a.refuse(*d, proto.CodeReplay, "request was already executed once: replay refused")
	}
	return req, cred, 0, nil
}

// needQuorum checks approvals when an operation needs them.
func (a *Agent) needQuorum(env *admin.Envelope, cred *admin.CredentialBody, why string) error {
	err := admin.CheckQuorum(a.adminCA, a.revocations, cred.Name, env.Request.Digest(), env.Approvals, a.cfg.Quorum, a.cfg.Now(), a.cfg.RevocationMaxAge)
	if err != nil {
		return fmt.Errorf("%s: it needs approval by %d other admins (vmbond admin request): %w", why, a.cfg.Quorum, err)
	}
	return nil
}

// approvers names who approved, for the audit log (CheckQuorum has already
// verified the approvals that count).
func approvers(env *admin.Envelope) string {
	var names []string
	for _, ap := range env.Approvals {
		var b admin.ApprovalBody
		if json.Unmarshal(ap.Body, &b) == nil && !slices.Contains(names, b.Admin) {
			names = append(names, b.Admin)
		}
	}
	return strings.Join(names, ",")
}

// handleAdmin runs an operation an admin asks for on a tenant's VM without
// the tenant: only what the tenant's authenticated policy allows, within the
// destruction budgets unless a quorum approved it, and never an early purge.
func (a *Agent) handleAdmin(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("vm")
	var env admin.Envelope
	_, err := readBody(r, &env)
	d := decision{actor: "admin", vm: name, op: "admin"}
	if err != nil {
		fail(w, http.StatusBadRequest, a.refuse(d, proto.CodeBadRequest, err.Error()))
		return
	}
	req, cred, status, perr := a.authenticateAdmin(&env, name, &d)
	if perr != nil {
		fail(w, status, perr)
		return
	}
	v := a.lookup(name)
	if v == nil {
		fail(w, http.StatusNotFound, a.refuse(d, proto.CodeNotFound, "no VM "+name+" on host "+a.HostID()))
		return
	}
	if _, ok := automatonFor(req.Op); !ok {
		fail(w, http.StatusForbidden, a.refuse(d, proto.CodeRefused, fmt.Sprintf("operation %q is not in the command automata", req.Op)))
		return
	}
	if req.Op == proto.OpPurge || req.Op == proto.OpRestore {
		fail(w, http.StatusForbidden, a.refuse(d, proto.CodeForbidden, req.Op+" is the tenant's alone: a deleted VM stays restorable until its retention period ends"))
		return
	}
	if !slices.Contains(v.spec.AdminAllowed, req.Op) {
		fail(w, http.StatusForbidden, a.refuse(d, proto.CodeForbidden,
			fmt.Sprintf("tenant %s's policy does not let admins run %q on %s without the tenant (allowed: %s)", v.spec.Tenant, req.Op, name, strings.Join(v.spec.AdminAllowed, ", "))))
		return
	}
	note := "allowed by tenant policy"
	if destructive(req.Op) {
		now := a.cfg.Now()
		byAdmin, byHost, err := a.store.budgetUse(cred.Name, now, a.cfg.BudgetWindow)
		if err != nil {
			fail(w, http.StatusServiceUnavailable, a.refuse(d, proto.CodeUnavailable, "read budget: "+err.Error()))
			return
		}
		st := a.currentSettings()
		if byAdmin >= st.BudgetPerAdmin || byHost >= st.BudgetPerHost {
			why := fmt.Sprintf("destruction budget spent: %d by %s and %d on host %s in the last %s (limits %d per admin, %d per host)",
				byAdmin, cred.Name, byHost, a.HostID(), a.cfg.BudgetWindow, st.BudgetPerAdmin, st.BudgetPerHost)
			if err := a.needQuorum(&env, cred, why); err != nil {
				fail(w, http.StatusForbidden, a.refuse(d, proto.CodeForbidden, err.Error()))
				return
			}
			note = "over budget, approved by " + approvers(&env)
		}
		if err := a.store.budgetSpend(cred.Name, now, a.cfg.BudgetWindow); err != nil {
			fail(w, http.StatusServiceUnavailable, a.refuse(d, proto.CodeUnavailable, "record budget: "+err.Error()))
			return
		}
	}
	if err := a.allow(d, note); err != nil {
		fail(w, http.StatusServiceUnavailable, &proto.Error{Code: proto.CodeUnavailable, Message: err.Error()})
		return
	}
	v.opMu.Lock()
	state, out, err := a.operate(r.Context(), v, req.Op)
	v.opMu.Unlock()
	if err != nil {
		a.record(d, "failed", err.Error())
		fail(w, http.StatusConflict, &proto.Error{Code: proto.CodeRefused, Message: err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, proto.AdminReply{VM: name, Host: a.HostID(), Op: req.Op, State: state, Note: out})
}

// handleHostAdmin runs a host-wide critical operation (retention, budgets):
// always with a quorum of other admins.
func (a *Agent) handleHostAdmin(w http.ResponseWriter, r *http.Request) {
	var env admin.Envelope
	_, err := readBody(r, &env)
	d := decision{actor: "admin", op: "admin"}
	if err != nil {
		fail(w, http.StatusBadRequest, a.refuse(d, proto.CodeBadRequest, err.Error()))
		return
	}
	req, cred, status, perr := a.authenticateAdmin(&env, "", &d)
	if perr != nil {
		fail(w, status, perr)
		return
	}
	if !critical(req.Op) || req.Op == proto.OpPurge {
		fail(w, http.StatusBadRequest, a.refuse(d, proto.CodeBadRequest, fmt.Sprintf("unknown host operation %q (set-retention, set-budget, wipe-host)", req.Op)))
		return
	}
	if err := a.needQuorum(&env, cred, req.Op+" is critical"); err != nil {
		fail(w, http.StatusForbidden, a.refuse(d, proto.CodeForbidden, err.Error()))
		return
	}
	if err := a.allow(d, "approved by "+approvers(&env)); err != nil {
		fail(w, http.StatusServiceUnavailable, &proto.Error{Code: proto.CodeUnavailable, Message: err.Error()})
		return
	}
	var note string
	if req.Op == OpWipeHost {
		note, err = a.wipeHost(r.Context())
	} else {
		note, err = a.applySetting(req)
	}
	if err != nil {
		a.record(d, "failed", err.Error())
		fail(w, http.StatusBadRequest, &proto.Error{Code: proto.CodeBadRequest, Message: err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, proto.AdminReply{Host: a.HostID(), Op: req.Op, Note: note})
}

// handleRevocations takes a revocation list signed by the admin CA. Anyone
// may deliver one; only a newer list than the one held is accepted.
func (a *Agent) handleRevocations(w http.ResponseWriter, r *http.Request) {
	var list admin.RevocationList
	body, err := readBody(r, &list)
	d := decision{actor: "server", op: "revocations", request: body}
	if err != nil {
		fail(w, http.StatusBadRequest, a.refuse(d, proto.CodeBadRequest, err.Error()))
		return
	}
	if a.adminCA == nil {
		fail(w, http.StatusForbidden, a.refuse(d, proto.CodeForbidden, "no admin CA is installed on host "+a.HostID()))
		return
	}
	if err := a.revocations.Update(&list); err != nil {
		fail(w, http.StatusForbidden, a.refuse(d, proto.CodeRefused, err.Error()))
		return
	}
	if err := a.store.putMeta("revocations", a.revocations.Current()); err != nil {
		fail(w, http.StatusServiceUnavailable, a.refuse(d, proto.CodeUnavailable, "store revocation list: "+err.Error()))
		return
	}
	a.allow(d, "revocation list accepted")
	w.WriteHeader(http.StatusNoContent)
}

// wipeHost soft-deletes every VM on the host: each stays restorable by its
// tenant for the retention period, like any delete.
func (a *Agent) wipeHost(ctx context.Context) (string, error) {
	a.mu.Lock()
	vms := make([]*vm, 0, len(a.vms))
	for _, v := range a.vms {
		vms = append(vms, v)
	}
	a.mu.Unlock()
	n := 0
	for _, v := range vms {
		v.opMu.Lock()
		var err error
		if v.deletedAt() == nil {
			_, _, err = a.deleteVM(ctx, v)
			n++
		}
		v.opMu.Unlock()
		if err != nil {
			return "", fmt.Errorf("wipe host: %s: %w", v.spec.VM, err)
		}
	}
	return fmt.Sprintf("%d VMs deleted, restorable by their tenants for %s", n, a.currentSettings().Retention), nil
}
