package server

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"sort"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/vmbond/vmbond/internal/admin"
	"github.com/vmbond/vmbond/internal/proto"
)

// Quorum requests: an admin's signed request waits on the server while other
// admins add their signed approvals, then any admin has the server relay the
// request with its approvals to the agent. The server verifies none of the
// signatures (the agent checks the request and the quorum); it stores and
// carries them, and reads their public bodies to file and route them.

// requestRecord is a stored quorum request, as GET /v1/requests answers it.
type requestRecord struct {
	ID         string         `json:"id"` // hex SHA-256 of the request body (SignedRequest.Digest)
	Envelope   admin.Envelope `json:"envelope"`
	Requester  string         `json:"requester"` // RequestBody.Admin, not verified here
	Host       string         `json:"host"`
	VM         string         `json:"vm,omitempty"`
	Op         string         `json:"op"`
	Created    time.Time      `json:"created"`
	Executed   bool           `json:"executed"`
	ExecutedAt time.Time      `json:"executed_at,omitzero"`
}

// requestID reads and validates a request id from the path: 64 lower-case
// hex digits.
func requestID(c *call) (string, error) {
	id := c.r.PathValue("id")
	if b, err := hex.DecodeString(id); err != nil || len(b) != 32 || id != strings.ToLower(id) {
		return "", errorf(http.StatusBadRequest, proto.CodeBadRequest, "invalid request id %q: want 64 lower-case hex digits", id)
	}
	return id, nil
}

// sameApproval reports whether a and b are the same approval, byte for byte.
func sameApproval(a, b *admin.Approval) bool {
	return bytes.Equal(a.Credential.Body, b.Credential.Body) && bytes.Equal(a.Credential.Sig, b.Credential.Sig) &&
		bytes.Equal(a.Body, b.Body) && bytes.Equal(a.Sig, b.Sig)
}

// addApproval appends a unless an identical approval is held; it reports
// whether it did.
func addApproval(env *admin.Envelope, a *admin.Approval) bool {
	for _, have := range env.Approvals {
		if sameApproval(have, a) {
			return false
		}
	}
	env.Approvals = append(env.Approvals, a)
	return true
}

// checkEnvelopeSize refuses an envelope the agent would refuse as too large.
func checkEnvelopeSize(env *admin.Envelope) error {
	raw, err := json.Marshal(env)
	if err != nil {
		return internalError("encode admin envelope", err)
	}
	if len(raw) > proto.MaxBody {
		return errorf(http.StatusConflict, proto.CodeConflict, "the request with its approvals would be %d bytes, more than the %d an agent accepts", len(raw), proto.MaxBody)
	}
	return nil
}

func (s *Server) createRequest(c *call) error {
	in, err := decodeEnvelope(c)
	if err != nil {
		return err
	}
	req := &in.req
	c.note("admin", req.Admin, "op", req.Op, "host", req.Host)
	if req.VM != "" {
		c.note("vm", req.VM)
		rec, err := s.store.vm(req.VM)
		if err != nil {
			return storeError("look up vm "+req.VM, err)
		}
		if err := checkVMRequest(req, rec); err != nil {
			return err
		}
	} else if _, err := s.store.host(req.Host); err != nil {
		return storeError("look up host "+req.Host, err)
	}
	env := admin.Envelope{Request: in.env.Request}
	for _, a := range in.env.Approvals {
		addApproval(&env, a)
	}
	if err := checkEnvelopeSize(&env); err != nil {
		return err
	}
	rec := requestRecord{
		ID:        hex.EncodeToString(in.env.Request.Digest()),
		Envelope:  env,
		Requester: req.Admin,
		Host:      req.Host,
		VM:        req.VM,
		Op:        req.Op,
		Created:   s.cfg.Now().UTC(),
	}
	if err := s.store.createRequest(rec); errors.Is(err, errExists) {
		return errorf(http.StatusConflict, proto.CodeConflict, "request %s is already stored", rec.ID)
	} else if err != nil {
		return internalError("store request", err)
	}
	c.note("request", rec.ID, "approvals", len(env.Approvals), "decision", "request stored")
	writeJSON(c.w, http.StatusCreated, rec)
	return nil
}

func (s *Server) listRequests(c *call) error {
	list, err := s.store.requests()
	if err != nil {
		return internalError("list requests", err)
	}
	sort.Slice(list, func(i, j int) bool {
		if !list[i].Created.Equal(list[j].Created) {
			return list[i].Created.After(list[j].Created)
		}
		return list[i].ID < list[j].ID
	})
	if list == nil {
		list = []requestRecord{}
	}
	c.note("requests", len(list))
	writeJSON(c.w, http.StatusOK, list)
	return nil
}

func (s *Server) getRequest(c *call) error {
	id, err := requestID(c)
	if err != nil {
		return err
	}
	rec, err := s.store.request(id)
	if err != nil {
		return storeError("look up request "+id, err)
	}
	writeJSON(c.w, http.StatusOK, rec)
	return nil
}

// approveRequest adds one admin's approval to a stored request. The
// approval's public body must name the request; its signature is the
// agent's to check.
func (s *Server) approveRequest(c *call) error {
	id, err := requestID(c)
	if err != nil {
		return err
	}
	var ap admin.Approval
	if _, err := decodeBody(c, "Approval", &ap); err != nil {
		return err
	}
	var body admin.ApprovalBody
	if len(ap.Body) == 0 {
		return errorf(http.StatusBadRequest, proto.CodeBadRequest, "approval has no body")
	}
	if err := proto.DecodeStrict(ap.Body, &body); err != nil {
		return errorf(http.StatusBadRequest, proto.CodeBadRequest, "invalid approval body JSON: %v", err)
	}
	if got := hex.EncodeToString(body.Request); got != id {
		return errorf(http.StatusBadRequest, proto.CodeBadRequest, "approval is for request %s, not %s", got, id)
	}
	c.note("request", id, "approver", body.Admin)
	added := false
	rec, err := s.store.updateRequest(id, func(r *requestRecord) (bool, error) {
		if r.Executed {
			return false, errorf(http.StatusConflict, proto.CodeConflict, "request %s was already executed", id)
		}
		env := r.Envelope
		env.Approvals = append([]*admin.Approval(nil), env.Approvals...)
		if !addApproval(&env, &ap) {
			return false, nil
		}
		if len(env.Approvals) > admin.MaxApprovals {
			return false, errorf(http.StatusConflict, proto.CodeConflict, "request %s already holds %d approvals, the most an agent looks at", id, admin.MaxApprovals)
		}
		if err := checkEnvelopeSize(&env); err != nil {
			return false, err
		}
		r.Envelope, added = env, true
		return true, nil
	})
	if err != nil {
		return storeError("approve request "+id, err)
	}
	if added {
		c.note("decision", "approval added", "approvals", len(rec.Envelope.Approvals))
	} else {
		c.note("decision", "duplicate approval ignored")
	}
	writeJSON(c.w, http.StatusOK, rec)
	return nil
}

// executeRequest relays a stored request with its approvals to the agent
// and answers the agent's answer verbatim; a 2xx marks it executed.
func (s *Server) executeRequest(c *call) error {
	id, err := requestID(c)
	if err != nil {
		return err
	}
	body, err := readBody(c)
	if err != nil {
		return err
	}
	if len(bytes.TrimSpace(body)) > 0 {
		if err := proto.DecodeStrict(body, &struct{}{}); err != nil {
			return errorf(http.StatusBadRequest, proto.CodeBadRequest, "execute takes no body (or {}): %v", err)
		}
	}
	rec, err := s.store.request(id)
	if err != nil {
		return storeError("look up request "+id, err)
	}
	c.note("request", id, "admin", rec.Requester, "op", rec.Op, "approvals", len(rec.Envelope.Approvals))
	if rec.Executed {
		return errorf(http.StatusConflict, proto.CodeConflict, "request %s was already executed at %s", id, rec.ExecutedAt.Format(time.RFC3339))
	}
	hostID, path := rec.Host, "/v1/admin"
	if rec.VM != "" {
		vm, err := s.store.vm(rec.VM)
		if err != nil {
			return storeError("look up vm "+rec.VM, err)
		}
		hostID, path = vm.Host, "/v1/vms/"+vm.ID+"/admin"
		c.note("vm", vm.ID)
	}
	host, err := s.store.host(hostID)
	if err != nil {
		return storeError("look up host "+hostID, err)
	}
	raw, err := json.Marshal(admin.Envelope{Request: rec.Envelope.Request, Approvals: rec.Envelope.Approvals})
	if err != nil {
		return internalError("encode admin envelope", err)
	}
	done := func(bool) {}
	isDelete := rec.VM != "" && rec.Op == proto.OpDelete
	if isDelete {
		if done, err = s.reserveDelete(c, rec.Requester, len(rec.Envelope.Approvals) > 0); err != nil {
			return err
		}
	}
	ans, err := s.relayAdmin(c, host, path, raw)
	done(err == nil && ans.ok())
	if err != nil {
		return err
	}
	if ans.ok() {
		_, err := s.store.updateRequest(id, func(r *requestRecord) (bool, error) {
			r.Executed, r.ExecutedAt = true, s.cfg.Now().UTC()
			return true, nil
		})
		if err != nil {
			c.note("decision", "executed on agent, not recorded", "store_error", err.Error())
		} else {
			c.note("decision", "request executed")
		}
		if isDelete {
			s.markDeleted(c, rec.VM)
		}
	}
	ans.relay(c.w)
	return nil
}

// createRequest stores a new request; errExists if its id is taken.
func (s *store) createRequest(r requestRecord) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte(bucketRequests))
		if b.Get([]byte(r.ID)) != nil {
			return errExists
		}
		return putJSON(b, r.ID, r)
	})
}

func (s *store) request(id string) (requestRecord, error) {
	var r requestRecord
	err := s.db.View(func(tx *bolt.Tx) error {
		ok, err := getJSON(tx.Bucket([]byte(bucketRequests)), id, &r)
		if err == nil && !ok {
			err = errNotFound
		}
		return err
	})
	return r, err
}

func (s *store) requests() ([]requestRecord, error) {
	var out []requestRecord
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte(bucketRequests)).ForEach(func(k, v []byte) error {
			var r requestRecord
			if err := json.Unmarshal(v, &r); err != nil {
				return fmt.Errorf("decode request %q: %w", k, err)
			}
			out = append(out, r)
			return nil
		})
	})
	return out, err
}

// updateRequest changes a stored request in one transaction: fn edits the
// record and reports whether to write it. It returns the record as stored
// afterwards.
func (s *store) updateRequest(id string, fn func(*requestRecord) (bool, error)) (requestRecord, error) {
	var r requestRecord
	err := s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte(bucketRequests))
		ok, err := getJSON(b, id, &r)
		if err != nil {
			return err
		}
		if !ok {
			return errNotFound
		}
		write, err := fn(&r)
		if err != nil || !write {
			return err
		}
		return putJSON(b, id, r)
	})
	return r, err
}
