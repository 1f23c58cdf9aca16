package server

import (
	"errors"
	"net/http"
	"net/url"
	"time"

	"github.com/vmbond/vmbond/internal/proto"
)

// routes builds the API. Every error is answered as JSON proto.Error.
func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	s.handle(mux, "GET /v1/health", roleNone, s.health)
	s.handle(mux, "POST /v1/tenants", roleAdmin, s.createTenant)
	s.handle(mux, "GET /v1/tenants", roleAdmin, s.listTenants)
	s.handle(mux, "POST /v1/hosts", roleAdmin, s.addHost)
	s.handle(mux, "GET /v1/hosts", roleAny, s.listHosts)
	s.handle(mux, "POST /v1/placements", roleTenant, s.place)
	s.handle(mux, "PUT /v1/vms/{vm}/disk", roleTenant, s.uploadDisk)
	s.handle(mux, "PUT /v1/vms/{vm}/boot/{file}", roleTenant, s.uploadBoot)
	s.handle(mux, "POST /v1/vms", roleTenant, s.createVM)
	s.handle(mux, "GET /v1/vms", roleAny, s.listVMs)
	s.handle(mux, "GET /v1/vms/{vm}", roleAny, s.getVM)
	s.handle(mux, "GET /v1/vms/{vm}/descriptor", roleTenant, s.relayDescriptor)
	s.handle(mux, "POST /v1/vms/{vm}/verify", roleTenant, s.relayVerify)
	s.handle(mux, "POST /v1/vms/{vm}/command", roleTenant, s.relayCommand)
	s.handle(mux, "POST /v1/vms/{vm}/admin", roleAdmin, s.adminCommand)
	s.handle(mux, "GET /v1/vms/{vm}/audit", roleAny, s.vmAudit)
	s.handle(mux, "POST /v1/hosts/{host}/admin", roleAdmin, s.hostAdmin)
	s.handle(mux, "POST /v1/revocations", roleAdmin, s.postRevocations)
	s.handle(mux, "GET /v1/revocations", roleAny, s.getRevocations)
	s.handle(mux, "POST /v1/requests", roleAdmin, s.createRequest)
	s.handle(mux, "GET /v1/requests", roleAdmin, s.listRequests)
	s.handle(mux, "GET /v1/requests/{id}", roleAdmin, s.getRequest)
	s.handle(mux, "POST /v1/requests/{id}/approvals", roleAdmin, s.approveRequest)
	s.handle(mux, "POST /v1/requests/{id}/execute", roleAdmin, s.executeRequest)
	s.handle(mux, "GET /v1/audit", roleAdmin, s.collectAudit)
	return s.jsonMux(mux)
}

// storeError maps a store error to an answer.
func storeError(doing string, err error) error {
	var ce *conflictError
	switch {
	case errors.As(err, &ce):
		return errorf(http.StatusConflict, proto.CodeConflict, "%s", ce.msg)
	case errors.Is(err, errExists):
		return errorf(http.StatusConflict, proto.CodeConflict, "%s: already exists", doing)
	case errors.Is(err, errNotFound):
		return errorf(http.StatusNotFound, proto.CodeNotFound, "%s: not found", doing)
	}
	var ae *apiError
	if errors.As(err, &ae) {
		return ae
	}
	return internalError(doing, err)
}

func (s *Server) health(c *call) error {
	writeJSON(c.w, http.StatusOK, map[string]bool{"ok": true})
	return nil
}

func (s *Server) createTenant(c *call) error {
	var req proto.CreateTenantRequest
	if _, err := decodeBody(c, "CreateTenantRequest", &req); err != nil {
		return err
	}
	if err := proto.ValidID("tenant", req.Name); err != nil {
		return errorf(http.StatusBadRequest, proto.CodeBadRequest, "%v", err)
	}
	if req.Name == adminIdentity {
		return errorf(http.StatusBadRequest, proto.CodeBadRequest, "tenant name %q is reserved for the admin", req.Name)
	}
	tok, err := newToken()
	if err != nil {
		return internalError("generate tenant token", err)
	}
	err = s.store.createTenant(tenantRecord{Name: req.Name, TokenSHA256: hashToken(tok), Created: time.Now().UTC()})
	if errors.Is(err, errExists) {
		return errorf(http.StatusConflict, proto.CodeConflict, "tenant %q already exists", req.Name)
	}
	if err != nil {
		return internalError("store tenant", err)
	}
	c.note("decision", "tenant created", "tenant", req.Name)
	writeJSON(c.w, http.StatusCreated, proto.TenantCredential{Name: req.Name, Token: tok})
	return nil
}

func (s *Server) listTenants(c *call) error {
	ts, err := s.store.tenants()
	if err != nil {
		return internalError("list tenants", err)
	}
	vms, err := s.store.vms()
	if err != nil {
		return internalError("list vms", err)
	}
	count := map[string]int{}
	for _, v := range vms {
		if v.State != stateDeleted {
			count[v.Tenant]++
		}
	}
	out := make([]proto.TenantInfo, 0, len(ts))
	for _, t := range ts {
		out = append(out, proto.TenantInfo{Name: t.Name, Created: t.Created.Format(time.RFC3339), VMs: count[t.Name]})
	}
	writeJSON(c.w, http.StatusOK, out)
	return nil
}

// checkAgentURL accepts an absolute http or https URL with nothing after the
// path.
func checkAgentURL(raw string) (string, error) {
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		return "", errorf(http.StatusBadRequest, proto.CodeBadRequest, "invalid agent URL %q: want http(s)://host[:port][/path] without credentials, query or fragment", raw)
	}
	return u.String(), nil
}

func (s *Server) addHost(c *call) error {
	var req proto.AddHostRequest
	if _, err := decodeBody(c, "AddHostRequest", &req); err != nil {
		return err
	}
	u, err := checkAgentURL(req.URL)
	if err != nil {
		return err
	}
	cert, body, err := s.agents.identity(c.r.Context(), u)
	if err != nil {
		return unavailable("fetch the host certificate from the agent at "+u, err)
	}
	id := body.Identity.HostID
	decision := "host enrolled"
	if old, err := s.store.host(id); err == nil {
		decision = "host re-enrolled (url " + old.URL + " -> " + u + ")"
	} else if !errors.Is(err, errNotFound) {
		return internalError("look up host", err)
	}
	if err := s.store.putHost(hostRecord{ID: id, URL: u, Cert: cert, Enrolled: time.Now().UTC()}); err != nil {
		return internalError("store host", err)
	}
	counts, err := s.vmCounts()
	if err != nil {
		return err
	}
	c.note("decision", decision, "host", id, "url", u, "serial", body.Serial)
	s.pushStoredRevocations(c, id, u)
	writeJSON(c.w, http.StatusOK, proto.HostInfo{ID: id, URL: u, Cert: cert, VMs: counts[id]})
	return nil
}

// vmCounts counts the VMs that are not deleted, per host.
func (s *Server) vmCounts() (map[string]int, error) {
	vms, err := s.store.vms()
	if err != nil {
		return nil, internalError("list vms", err)
	}
	counts := map[string]int{}
	for _, v := range vms {
		if v.State != stateDeleted {
			counts[v.Host]++
		}
	}
	return counts, nil
}

// hostInfos lists every host with its VM count, sorted by id.
func (s *Server) hostInfos() ([]proto.HostInfo, error) {
	hs, err := s.store.hosts()
	if err != nil {
		return nil, internalError("list hosts", err)
	}
	counts, err := s.vmCounts()
	if err != nil {
		return nil, err
	}
	out := make([]proto.HostInfo, 0, len(hs))
	for _, h := range hs {
		out = append(out, proto.HostInfo{ID: h.ID, URL: h.URL, Cert: h.Cert, VMs: counts[h.ID]})
	}
	return out, nil
}

func (s *Server) listHosts(c *call) error {
	out, err := s.hostInfos()
	if err != nil {
		return err
	}
	writeJSON(c.w, http.StatusOK, out)
	return nil
}

// place chooses the host with the fewest VMs, ties broken by id.
func (s *Server) place(c *call) error {
	var req proto.PlacementRequest
	if _, err := decodeBody(c, "PlacementRequest", &req); err != nil {
		return err
	}
	if req.MemoryMiB < 0 || req.CPUs < 0 {
		return errorf(http.StatusBadRequest, proto.CodeBadRequest, "memory_mib and cpus must not be negative")
	}
	hosts, err := s.hostInfos()
	if err != nil {
		return err
	}
	if len(hosts) == 0 {
		return errorf(http.StatusServiceUnavailable, proto.CodeUnavailable, "no hosts are enrolled")
	}
	best := hosts[0]
	for _, h := range hosts[1:] {
		if h.VMs < best.VMs {
			best = h
		}
	}
	c.note("decision", "placed", "host", best.ID, "host_vms", best.VMs)
	writeJSON(c.w, http.StatusOK, best)
	return nil
}

func (s *Server) uploadDisk(c *call) error {
	vm, err := pathID(c, "vm", "vm")
	if err != nil {
		return err
	}
	n, err := s.receiveFile(c, vm, s.uploadPath(vm, "disk"), s.cfg.MaxImageSize)
	if err != nil {
		return err
	}
	c.note("decision", "disk image stored", "vm", vm, "bytes", n)
	writeJSON(c.w, http.StatusOK, map[string]any{"vm": vm, "file": "disk", "bytes": n})
	return nil
}

// bootFiles are the boot files a VM may have, in the order they are pushed.
func bootFiles() []string { return []string{"kernel", "initrd"} }

func (s *Server) uploadBoot(c *call) error {
	vm, err := pathID(c, "vm", "vm")
	if err != nil {
		return err
	}
	file := c.r.PathValue("file")
	if file != "kernel" && file != "initrd" {
		return errorf(http.StatusBadRequest, proto.CodeBadRequest, "unknown boot file %q: want kernel or initrd", file)
	}
	n, err := s.receiveFile(c, vm, s.uploadPath(vm, file), MaxBootFileSize)
	if err != nil {
		return err
	}
	c.note("decision", "boot file stored", "vm", vm, "file", file, "bytes", n)
	writeJSON(c.w, http.StatusOK, map[string]any{"vm": vm, "file": file, "bytes": n})
	return nil
}
