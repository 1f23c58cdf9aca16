package server

import (
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/vmbond/vmbond/internal/proto"
)

func (s *Server) createVM(c *call) error {
	var req proto.CreateVMRequest
	if _, err := decodeBody(c, "CreateVMRequest", &req); err != nil {
		return err
	}
	spec, err := req.Registration.DecodeSpec()
	if err != nil {
		return errorf(http.StatusBadRequest, proto.CodeBadRequest, "invalid registration: %v", err)
	}
	if spec.Tenant != c.who.tenant {
		return errorf(http.StatusForbidden, proto.CodeForbidden, "the spec is for tenant %q but the token is tenant %q's", spec.Tenant, c.who.tenant)
	}
	host, err := s.store.host(spec.Host)
	if errors.Is(err, errNotFound) {
		return errorf(http.StatusNotFound, proto.CodeNotFound, "host %q is not enrolled", spec.Host)
	}
	if err != nil {
		return internalError("look up host", err)
	}
	rec := vmRecord{
		ID:           spec.VM,
		Name:         spec.Name,
		Tenant:       spec.Tenant,
		Host:         spec.Host,
		Spec:         req.Registration.Spec,
		Registration: req.Registration,
		State:        stateRegistering,
		Created:      time.Now().UTC(),
	}
	if err := s.store.createVM(rec); err != nil {
		return storeError("register vm", err)
	}
	c.note("vm", rec.ID, "host", host.ID)

	ans, err := s.pushVM(c.r.Context(), c, rec, host)
	if err != nil || !ans.ok() {
		if derr := s.store.deleteVM(rec.ID); derr != nil {
			return internalError("forget failed registration", derr)
		}
		if err != nil {
			c.note("decision", "registration failed, record removed")
			return err
		}
		c.note("decision", "agent refused, record removed", "agent", ans.describe())
		ans.relay(c.w)
		return nil
	}
	if err := s.store.setVMState(rec.ID, stateRegistered); err != nil {
		// The agent has the VM; keep the answer truthful and log the fault.
		c.note("decision", "registered on agent, state not recorded", "store_error", err.Error())
	} else {
		c.note("decision", "registered")
	}
	ans.relay(c.w)
	return nil
}

// pushVM sends the VM's uploaded image and boot files and then its
// registration to the host agent. It returns the first non-2xx answer, or
// the register answer.
func (s *Server) pushVM(ctx context.Context, c *call, rec vmRecord, host hostRecord) (*agentAnswer, error) {
	base := agentURL(host.URL, "/v1/vms/"+rec.ID)
	files := append([]string{"disk"}, bootFiles()...)
	for _, file := range files {
		path := s.uploadPath(rec.ID, file)
		target := base + "/" + file
		if file != "disk" {
			target = base + "/boot/" + file
		}
		ans, err := s.pushFile(ctx, path, target)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, unavailable("push "+file+" of vm "+rec.ID+" to host "+host.ID, err)
		}
		c.note("pushed_"+file, ans.status)
		if !ans.ok() {
			return ans, nil
		}
	}
	reg, err := json.Marshal(rec.Registration)
	if err != nil {
		return nil, internalError("encode registration", err)
	}
	// The registration is not abandoned if the client goes away: the record
	// must end up matching what the agent did.
	ans, err := s.agents.do(context.WithoutCancel(ctx), http.MethodPost, base+"/register", reg, 0)
	if err != nil {
		return nil, unavailable("register vm "+rec.ID+" on host "+host.ID, err)
	}
	c.note("register_status", ans.status)
	return ans, nil
}

// pushFile streams one uploaded file to the agent; fs.ErrNotExist if none
// was uploaded.
func (s *Server) pushFile(ctx context.Context, path, target string) (*agentAnswer, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	return s.agents.push(ctx, target, f, fi.Size())
}

// liveStates asks each host's agent for its public inventory, in parallel.
// A missing entry in the result means the host could not be asked.
func (s *Server) liveStates(ctx context.Context, hostIDs map[string]bool) map[string][]proto.VMState {
	out := map[string][]proto.VMState{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for id := range hostIDs {
		h, err := s.store.host(id)
		if err != nil {
			s.log.Warn("inventory: unknown host", "host", id, "error", err)
			continue
		}
		wg.Go(func() {
			list, err := s.agents.inventory(ctx, h.URL)
			if err != nil {
				s.log.Warn("inventory: host unreachable", "host", h.ID, "url", h.URL, "error", err)
				return
			}
			mu.Lock()
			out[h.ID] = list
			mu.Unlock()
		})
	}
	wg.Wait()
	return out
}

// vmInfo combines a record with its host's inventory.
func vmInfo(r vmRecord, live map[string][]proto.VMState) proto.VMInfo {
	info := proto.VMInfo{ID: r.ID, Name: r.Name, Tenant: r.Tenant, Host: r.Host, Created: r.Created.Format(time.RFC3339)}
	list, ok := live[r.Host]
	switch {
	case !ok:
		info.State = r.State + " (host unreachable)"
	default:
		info.State = r.State + " (not on host)"
		if r.State == stateDeleted {
			info.State = stateDeleted
		}
		for _, st := range list {
			if st.VM == r.ID && st.Tenant == r.Tenant {
				info.State = st.State
				break
			}
		}
	}
	return info
}

func (s *Server) listVMs(c *call) error {
	all, err := s.store.vms()
	if err != nil {
		return internalError("list vms", err)
	}
	var mine []vmRecord
	hosts := map[string]bool{}
	for _, r := range all {
		if c.who.admin || r.Tenant == c.who.tenant {
			mine = append(mine, r)
			hosts[r.Host] = true
		}
	}
	live := s.liveStates(c.r.Context(), hosts)
	out := make([]proto.VMInfo, 0, len(mine))
	for _, r := range mine {
		out = append(out, vmInfo(r, live))
	}
	c.note("vms", len(out))
	writeJSON(c.w, http.StatusOK, out)
	return nil
}

// lookupVM reads the VM of the request path and checks the caller may see
// it: its owner, or the admin if adminOK.
func (s *Server) lookupVM(c *call, adminOK bool) (vmRecord, error) {
	vm, err := pathID(c, "vm", "vm")
	if err != nil {
		return vmRecord{}, err
	}
	rec, err := s.store.vm(vm)
	if errors.Is(err, errNotFound) {
		return vmRecord{}, errorf(http.StatusNotFound, proto.CodeNotFound, "vm %q is not registered", vm)
	}
	if err != nil {
		return vmRecord{}, internalError("look up vm", err)
	}
	if c.who.admin && adminOK {
		return rec, nil
	}
	if c.who.tenant == "" || rec.Tenant != c.who.tenant {
		return vmRecord{}, errorf(http.StatusForbidden, proto.CodeForbidden, "vm %q belongs to another tenant", vm)
	}
	return rec, nil
}

func (s *Server) getVM(c *call) error {
	rec, err := s.lookupVM(c, true)
	if err != nil {
		return err
	}
	live := s.liveStates(c.r.Context(), map[string]bool{rec.Host: true})
	writeJSON(c.w, http.StatusOK, vmInfo(rec, live))
	return nil
}

// relayToAgent forwards body byte for byte to the same path on the VM's
// host agent and returns the agent's answer.
func (s *Server) relayToAgent(c *call, rec vmRecord, method, suffix string, body []byte) (*agentAnswer, error) {
	host, err := s.store.host(rec.Host)
	if err != nil {
		return nil, storeError("look up host "+rec.Host, err)
	}
	target := agentURL(host.URL, "/v1/vms/"+rec.ID+suffix)
	if q := c.r.URL.RawQuery; q != "" {
		target += "?" + q
	}
	ans, err := s.agents.do(c.r.Context(), method, target, body, 0)
	if err != nil {
		return nil, unavailable("relay to host "+host.ID, err)
	}
	c.note("vm", rec.ID, "host", host.ID, "agent_status", ans.status)
	if !ans.ok() {
		c.note("agent", ans.describe())
	}
	return ans, nil
}

// relayPath relays a tenant's request for one of its VMs verbatim.
func (s *Server) relayPath(c *call, method, suffix string) (*agentAnswer, []byte, vmRecord, error) {
	rec, err := s.lookupVM(c, false)
	if err != nil {
		return nil, nil, rec, err
	}
	var body []byte
	if method != http.MethodGet {
		if body, err = readBody(c); err != nil {
			return nil, nil, rec, err
		}
	}
	ans, err := s.relayToAgent(c, rec, method, suffix, body)
	return ans, body, rec, err
}

func (s *Server) relayDescriptor(c *call) error {
	ans, _, _, err := s.relayPath(c, http.MethodGet, "/descriptor")
	if err != nil {
		return err
	}
	ans.relay(c.w)
	return nil
}

func (s *Server) relayVerify(c *call) error {
	ans, _, _, err := s.relayPath(c, http.MethodPost, "/verify")
	if err != nil {
		return err
	}
	ans.relay(c.w)
	return nil
}

// relayCommand relays a tenant's MACed command. The server cannot check the
// MAC; it reads the public body only to record a successful delete.
func (s *Server) relayCommand(c *call) error {
	ans, body, rec, err := s.relayPath(c, http.MethodPost, "/command")
	if err != nil {
		return err
	}
	var env proto.Envelope
	if err := proto.DecodeStrict(body, &env); err == nil {
		if cmd, err := env.DecodeCommand(); err == nil {
			c.note("op", cmd.Op)
			switch {
			case !ans.ok() || cmd.Op != proto.OpDelete:
			case cmd.VM != rec.ID:
				c.note("decision", "delete names vm "+cmd.VM+", not marked")
			default:
				s.markDeleted(c, rec.ID)
			}
		}
	}
	ans.relay(c.w)
	return nil
}

func (s *Server) markDeleted(c *call, vm string) {
	if err := s.store.setVMState(vm, stateDeleted); err != nil {
		c.note("decision", "deleted on agent, state not recorded", "store_error", err.Error())
		return
	}
	c.note("decision", "vm marked deleted")
}
