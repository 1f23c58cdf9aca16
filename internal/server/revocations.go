package server

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/vmbond/vmbond/internal/admin"
	"github.com/vmbond/vmbond/internal/proto"
)

// pushTimeout bounds each push of a revocation list to one agent.
const pushTimeout = 30 * time.Second

// The server keeps the newest revocation list it was given, as the exact
// bytes it received, and hands it to every agent: now, and again whenever a
// host is enrolled. It cannot check the admin CA's signature; the agents do,
// and they refuse any list older than the one they hold. Which list is
// "newest" is decided by the number in the public body only, so a forged
// list can at worst make the server store junk the agents refuse.

// revocationNumber strictly decodes a list's public body and returns its
// number.
func revocationNumber(list *admin.RevocationList) (uint64, error) {
	if len(list.Body) == 0 {
		return 0, errorf(http.StatusBadRequest, proto.CodeBadRequest, "revocation list has no body")
	}
	var b admin.RevocationBody
	if err := proto.DecodeStrict(list.Body, &b); err != nil {
		return 0, errorf(http.StatusBadRequest, proto.CodeBadRequest, "invalid revocation list body JSON: %v", err)
	}
	if b.Number == 0 {
		return 0, errorf(http.StatusBadRequest, proto.CodeBadRequest, "revocation list has number 0 (numbers start at 1)")
	}
	return b.Number, nil
}

// postRevocations stores a revocation list if it is newer than the stored
// one and pushes it, verbatim, to every enrolled host. An older list is
// still pushed (the agents refuse it and say so) but not stored.
func (s *Server) postRevocations(c *call) error {
	var list admin.RevocationList
	raw, err := decodeBody(c, "RevocationList", &list)
	if err != nil {
		return err
	}
	number, err := revocationNumber(&list)
	if err != nil {
		return err
	}
	stored, held, err := s.store.putRevocations(raw, number)
	if err != nil {
		return internalError("store revocation list", err)
	}
	c.note("list", number)
	switch {
	case stored:
		c.note("decision", "revocation list stored")
	default:
		c.note("decision", fmt.Sprintf("not stored: the stored list is #%d", held))
	}
	return eachHost(s, c, "push_failed", func(h hostRecord) hostResult {
		ans, err := s.agents.do(c.r.Context(), http.MethodPost, agentURL(h.URL, "/v1/revocations"), raw, pushTimeout)
		return resultOf(h.ID, ans, err)
	}, func(r hostResult) bool { return r.Error != "" })
}

// getRevocations answers the stored revocation list, as it was received.
func (s *Server) getRevocations(c *call) error {
	raw, err := s.store.revocations()
	if err != nil {
		return internalError("read revocation list", err)
	}
	if raw == nil {
		return errorf(http.StatusNotFound, proto.CodeNotFound, "no revocation list has been stored")
	}
	c.w.Header().Set("Content-Type", "application/json")
	c.w.Header().Set("Content-Length", fmt.Sprint(len(raw)))
	c.w.WriteHeader(http.StatusOK)
	c.w.Write(raw)
	return nil
}

// pushStoredRevocations gives a newly enrolled host the stored revocation
// list, best effort: a failure is logged, the enrolment stands.
func (s *Server) pushStoredRevocations(c *call, host, url string) {
	raw, err := s.store.revocations()
	if err != nil {
		c.note("revocations_push", "read stored list: "+err.Error())
		return
	}
	if raw == nil {
		return
	}
	ans, err := s.agents.do(context.WithoutCancel(c.r.Context()), http.MethodPost, agentURL(url, "/v1/revocations"), raw, pushTimeout)
	r := resultOf(host, ans, err)
	if r.Error != "" {
		c.note("revocations_push", r.Status, "revocations_error", r.Error)
		s.log.Warn("push stored revocation list to enrolled host failed", "host", host, "status", r.Status, "error", r.Error)
		return
	}
	c.note("revocations_push", r.Status)
}

// revocations returns the stored list's bytes, or nil if none.
func (s *store) revocations() ([]byte, error) {
	var raw []byte
	err := s.db.View(func(tx *bolt.Tx) error {
		if v := tx.Bucket([]byte(bucketAdmin)).Get([]byte(revocationsKey)); v != nil {
			raw = append([]byte(nil), v...)
		}
		return nil
	})
	return raw, err
}

// putRevocations stores raw, a list numbered number, if no list is stored
// or the stored one has a lower number. It reports whether it stored raw
// and the number of the list held afterwards.
func (s *store) putRevocations(raw []byte, number uint64) (bool, uint64, error) {
	stored, held := false, uint64(0)
	err := s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte(bucketAdmin))
		if cur := b.Get([]byte(revocationsKey)); cur != nil {
			var list admin.RevocationList
			var body admin.RevocationBody
			if err := json.Unmarshal(cur, &list); err != nil {
				return fmt.Errorf("decode stored revocation list: %w", err)
			}
			if err := json.Unmarshal(list.Body, &body); err != nil {
				return fmt.Errorf("decode stored revocation list body: %w", err)
			}
			if body.Number >= number {
				held = body.Number
				return nil
			}
		}
		stored, held = true, number
		return b.Put([]byte(revocationsKey), raw)
	})
	return stored, held, err
}
