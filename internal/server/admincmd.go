package server

import (
	"context"
	"net/http"
	"strings"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/vmbond/vmbond/internal/admin"
	"github.com/vmbond/vmbond/internal/proto"
)

// Admin operations are admin.Envelope values: a request signed by the admin
// and, for what needs a quorum, other admins' approvals. The server can
// neither make nor alter one; it relays the exact bytes it received. It reads
// the public request body (unauthenticated here: the agents verify the
// signatures) only to route the envelope, to log it and to apply the
// platform-wide delete budget, which is an early refusal and nothing more.

// adminEnvelope is an admin's envelope as received.
type adminEnvelope struct {
	raw []byte            // the exact request body, relayed verbatim
	env admin.Envelope    // decoded strictly
	req admin.RequestBody // the signed request's public body, not verified
}

// decodeEnvelope reads and strictly decodes an admin.Envelope request body.
func decodeEnvelope(c *call) (*adminEnvelope, error) {
	var in adminEnvelope
	raw, err := decodeBody(c, "admin envelope", &in.env)
	if err != nil {
		return nil, err
	}
	in.raw = raw
	req, err := requestBody(&in.env)
	if err != nil {
		return nil, err
	}
	in.req = *req
	return &in, nil
}

// requestBody decodes and checks the public body of an envelope's signed
// request and the shape of its approvals. Nothing is authenticated here.
func requestBody(env *admin.Envelope) (*admin.RequestBody, error) {
	if len(env.Request.Body) == 0 {
		return nil, errorf(http.StatusBadRequest, proto.CodeBadRequest, "admin envelope has no signed request body")
	}
	var req admin.RequestBody
	if err := proto.DecodeStrict(env.Request.Body, &req); err != nil {
		return nil, errorf(http.StatusBadRequest, proto.CodeBadRequest, "invalid admin request body JSON: %v", err)
	}
	if err := proto.ValidID("admin", req.Admin); err != nil {
		return nil, errorf(http.StatusBadRequest, proto.CodeBadRequest, "admin request: %v", err)
	}
	if err := proto.ValidID("host", req.Host); err != nil {
		return nil, errorf(http.StatusBadRequest, proto.CodeBadRequest, "admin request: %v", err)
	}
	if req.VM != "" {
		if err := proto.ValidID("vm", req.VM); err != nil {
			return nil, errorf(http.StatusBadRequest, proto.CodeBadRequest, "admin request: %v", err)
		}
	}
	if err := proto.ValidID("operation", req.Op); err != nil {
		return nil, errorf(http.StatusBadRequest, proto.CodeBadRequest, "admin request: %v", err)
	}
	if n := len(env.Approvals); n > admin.MaxApprovals {
		return nil, errorf(http.StatusBadRequest, proto.CodeBadRequest, "admin envelope carries %d approvals, at most %d accepted", n, admin.MaxApprovals)
	}
	for i, a := range env.Approvals {
		if a == nil {
			return nil, errorf(http.StatusBadRequest, proto.CodeBadRequest, "approval #%d is empty", i+1)
		}
	}
	return &req, nil
}

// checkVMRequest refuses a request that does not name the VM rec, on its
// host, with an operation of the command automata.
func checkVMRequest(req *admin.RequestBody, rec vmRecord) error {
	switch {
	case req.VM == "":
		return errorf(http.StatusBadRequest, proto.CodeBadRequest, "signed request names no vm (host-wide operations go to POST /v1/hosts/{host}/admin) but the path names %q", rec.ID)
	case req.VM != rec.ID:
		return errorf(http.StatusBadRequest, proto.CodeBadRequest, "signed request names vm %q but the path names %q", req.VM, rec.ID)
	case req.Host != rec.Host:
		return errorf(http.StatusBadRequest, proto.CodeBadRequest, "signed request is for host %q but vm %q is on host %q", req.Host, rec.ID, rec.Host)
	case !proto.IsOperation(req.Op):
		return errorf(http.StatusBadRequest, proto.CodeBadRequest, "unknown operation %q", req.Op)
	}
	return nil
}

// relayAdmin posts an admin envelope's bytes to path on host's agent. The
// relay is not abandoned if the caller goes away: what the server records
// (deleted, executed, budget) must match what the agent did.
func (s *Server) relayAdmin(c *call, host hostRecord, path string, body []byte) (*agentAnswer, error) {
	ans, err := s.agents.do(context.WithoutCancel(c.r.Context()), http.MethodPost, agentURL(host.URL, path), body, 0)
	if err != nil {
		return nil, unavailable("relay to host "+host.ID, err)
	}
	c.note("host", host.ID, "agent_status", ans.status)
	if !ans.ok() {
		c.note("agent", ans.describe())
	}
	return ans, nil
}

// adminCommand relays an admin's signed request for one VM, verbatim, to
// the VM's agent. The agent runs it only if the admin's credential, the
// tenant's authenticated policy and the host's budgets (or a quorum) allow.
func (s *Server) adminCommand(c *call) error {
	rec, err := s.lookupVM(c, true)
	if err != nil {
		return err
	}
	in, err := decodeEnvelope(c)
	if err != nil {
		return err
	}
	c.note("vm", rec.ID, "admin", in.req.Admin, "op", in.req.Op, "approvals", len(in.env.Approvals))
	if err := checkVMRequest(&in.req, rec); err != nil {
		return err
	}
	host, err := s.store.host(rec.Host)
	if err != nil {
		return storeError("look up host "+rec.Host, err)
	}
	done := func(bool) {}
	if in.req.Op == proto.OpDelete {
		if done, err = s.reserveDelete(c, in.req.Admin, len(in.env.Approvals) > 0); err != nil {
			return err
		}
	}
	ans, err := s.relayAdmin(c, host, "/v1/vms/"+rec.ID+"/admin", in.raw)
	done(err == nil && ans.ok())
	if err != nil {
		return err
	}
	if ans.ok() && in.req.Op == proto.OpDelete {
		s.markDeleted(c, rec.ID)
	}
	ans.relay(c.w)
	return nil
}

// hostAdmin relays an admin's signed host-wide request (set-retention,
// set-budget: the agent demands a quorum) verbatim to the host's agent.
func (s *Server) hostAdmin(c *call) error {
	id, err := pathID(c, "host", "host")
	if err != nil {
		return err
	}
	host, err := s.store.host(id)
	if err != nil {
		return storeError("look up host "+id, err)
	}
	in, err := decodeEnvelope(c)
	if err != nil {
		return err
	}
	c.note("admin", in.req.Admin, "op", in.req.Op, "approvals", len(in.env.Approvals))
	if err := checkHostRequest(&in.req, id); err != nil {
		return err
	}
	ans, err := s.relayAdmin(c, host, "/v1/admin", in.raw)
	if err != nil {
		return err
	}
	ans.relay(c.w)
	return nil
}

// checkHostRequest refuses a request that is not host-wide for host.
func checkHostRequest(req *admin.RequestBody, host string) error {
	switch {
	case req.VM != "":
		return errorf(http.StatusBadRequest, proto.CodeBadRequest, "signed request names vm %q: vm operations go to POST /v1/vms/%s/admin", req.VM, req.VM)
	case req.Host != host:
		return errorf(http.StatusBadRequest, proto.CodeBadRequest, "signed request is for host %q but the path names %q", req.Host, host)
	}
	return nil
}

// deleteBudget counts the admin deletes being relayed right now, so that
// concurrent deletes cannot all slip under the budget.
type deleteBudget struct {
	mu      sync.Mutex
	pending map[string]int // admin name -> deletes in flight
}

// reserveDelete applies the platform-wide delete budget to a delete by the
// admin name. Unless approved (the envelope carries approvals, which the
// agent checks), a delete past the budget is refused with 429. It returns
// the function to call with the relay's outcome: a successful delete is
// counted in the database, whether approved or not.
func (s *Server) reserveDelete(c *call, name string, approved bool) (func(ok bool), error) {
	limit, window := s.cfg.AdminDeleteBudget, s.cfg.AdminDeleteWindow
	if limit < 0 || window < 0 {
		return func(bool) {}, nil
	}
	b := &s.budget
	b.mu.Lock()
	defer b.mu.Unlock()
	now := s.cfg.Now()
	n, err := s.store.deletesSince(name, now.Add(-window))
	if err != nil {
		return nil, internalError("read the delete budget", err)
	}
	n += b.pending[name]
	c.note("platform_deletes", n, "platform_budget", limit)
	if n >= limit && !approved {
		c.note("decision", "refused: platform-wide delete budget spent")
		return nil, errorf(http.StatusTooManyRequests, proto.CodeRefused,
			"platform-wide delete budget: admin %s deleted %d VMs in the last %s; further deletes need a quorum request (vmbond admin request)",
			name, n, windowText(window))
	}
	b.pending[name]++
	return func(ok bool) {
		b.mu.Lock()
		defer b.mu.Unlock()
		if b.pending[name]--; b.pending[name] <= 0 {
			delete(b.pending, name)
		}
		if !ok {
			return
		}
		if err := s.store.recordDelete(name, s.cfg.Now(), window); err != nil {
			c.note("budget_error", err.Error())
		}
	}, nil
}

// windowText says a budget window for people: "hour", "2h", "30m".
func windowText(d time.Duration) string {
	if d == time.Hour {
		return "hour"
	}
	s := d.String()
	for _, suffix := range []string{"0s", "0m"} {
		if len(s) > len(suffix)+1 && strings.HasSuffix(s, suffix) && s[len(s)-len(suffix)-1] >= 'a' {
			s = s[:len(s)-len(suffix)]
		}
	}
	return s
}

// deletesSince counts the relayed deletes by the admin name after since.
func (s *store) deletesSince(name string, since time.Time) (int, error) {
	var times []time.Time
	err := s.db.View(func(tx *bolt.Tx) error {
		_, err := getJSON(tx.Bucket([]byte(bucketDeletes)), name, &times)
		return err
	})
	n := 0
	for _, t := range times {
		if t.After(since) {
			n++
		}
	}
	return n, err
}

// recordDelete counts a relayed delete by the admin name at now, dropping
// the times older than window.
func (s *store) recordDelete(name string, now time.Time, window time.Duration) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte(bucketDeletes))
		var times []time.Time
		if _, err := getJSON(b, name, &times); err != nil {
			return err
		}
		kept := times[:0]
		for _, t := range times {
			if t.After(now.Add(-window)) {
				kept = append(kept, t)
			}
		}
		return putJSON(b, name, append(kept, now.UTC()))
	})
}

// hostResult is the outcome of one request to one host's agent: its HTTP
// status (0 if unreachable) and, unless 2xx, why.
type hostResult struct {
	Host   string `json:"host"`
	Status int    `json:"status"`
	Error  string `json:"error,omitempty"`
}

func resultOf(host string, ans *agentAnswer, err error) hostResult {
	r := hostResult{Host: host}
	switch {
	case err != nil:
		r.Error = err.Error()
	case !ans.ok():
		r.Status, r.Error = ans.status, ans.describe()
	default:
		r.Status = ans.status
	}
	return r
}
