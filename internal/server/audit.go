package server

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/vmbond/vmbond/internal/fsutil"
)

// The agents keep the decision logs; each answers GET /v1/audit with its
// whole log and a signed head. The server cannot check either (the admins'
// tools do); it collects the logs so that they survive a host that goes
// away, keeping the last copy from each host in DataDir/audit/{host}.json.

const (
	// auditTimeout bounds the collection of one host's log.
	auditTimeout = 30 * time.Second
	// maxAuditLog bounds one host's log as the server reads it.
	maxAuditLog = 256 << 20
)

// auditResult is one host's part of GET /v1/audit: the agent's answer, or,
// if the host could not give its log, the last saved copy (Saved says when
// it was saved) with Error set.
type auditResult struct {
	Host   string          `json:"host"`
	Status int             `json:"status"` // the agent's HTTP status, 0 if unreachable
	Error  string          `json:"error,omitempty"`
	Saved  time.Time       `json:"saved,omitzero"` // set when Log is a saved copy
	Log    json.RawMessage `json:"log,omitempty"`
}

func (s *Server) auditPath(host string) string {
	return filepath.Join(s.cfg.DataDir, "audit", host+".json")
}

// collectAudit fetches every host's decision log concurrently, saves each
// one and answers them all, falling back to the saved copy of a host that
// does not answer.
func (s *Server) collectAudit(c *call) error {
	return eachHost(s, c, "failed", func(h hostRecord) auditResult { return s.auditHost(c, h) },
		func(r auditResult) bool { return r.Error != "" })
}

// eachHost runs per on every enrolled host at once and answers the results
// as a JSON list, noting how many failed under the log key failedKey.
func eachHost[R any](s *Server, c *call, failedKey string, per func(hostRecord) R, failed func(R) bool) error {
	hosts, err := s.store.hosts()
	if err != nil {
		return internalError("list hosts", err)
	}
	results := make([]R, len(hosts))
	var wg sync.WaitGroup
	for i, h := range hosts {
		wg.Go(func() { results[i] = per(h) })
	}
	wg.Wait()
	n := 0
	for _, r := range results {
		if failed(r) {
			n++
		}
	}
	c.note("hosts", len(results), failedKey, n)
	writeJSON(c.w, http.StatusOK, results)
	return nil
}

func (s *Server) auditHost(c *call, h hostRecord) auditResult {
	r := auditResult{Host: h.ID}
	ans, err := s.agents.doLimit(c.r.Context(), http.MethodGet, agentURL(h.URL, "/v1/audit"), nil, auditTimeout, maxAuditLog)
	switch {
	case err != nil:
		r.Error = err.Error()
	case !ans.ok():
		r.Status, r.Error = ans.status, ans.describe()
	case !json.Valid(ans.body):
		r.Status, r.Error = ans.status, "agent answered a log that is not JSON"
	default:
		r.Status, r.Log = ans.status, json.RawMessage(ans.body)
		if err := fsutil.WriteFileAtomic(s.auditPath(h.ID), ans.body, 0o600); err != nil {
			r.Error = "collected but not saved: " + err.Error()
			s.log.Error("save audit log", "host", h.ID, "error", err)
		}
		return r
	}
	s.log.Warn("audit: host did not give its log", "host", h.ID, "status", r.Status, "error", r.Error)
	saved, at, err := s.savedAudit(h.ID)
	switch {
	case err != nil:
		r.Error += "; no saved copy: " + err.Error()
	default:
		r.Log, r.Saved = saved, at.UTC()
		r.Error += "; log is the copy saved at " + r.Saved.Format(time.RFC3339)
	}
	return r
}

// savedAudit reads the last saved log of host and when it was saved.
func (s *Server) savedAudit(host string) (json.RawMessage, time.Time, error) {
	path := s.auditPath(host)
	fi, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, time.Time{}, errors.New("none was ever collected")
	}
	if err != nil {
		return nil, time.Time{}, err
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, time.Time{}, err
	}
	if !json.Valid(raw) {
		return nil, time.Time{}, fmt.Errorf("%s is not JSON", path)
	}
	return raw, fi.ModTime(), nil
}

// vmAudit relays the agent's view of one VM's decisions (redacted for the
// tenant by the agent) verbatim, to the VM's owner or the admin.
func (s *Server) vmAudit(c *call) error {
	rec, err := s.lookupVM(c, true)
	if err != nil {
		return err
	}
	ans, err := s.relayToAgent(c, rec, http.MethodGet, "/audit", nil)
	if err != nil {
		return err
	}
	ans.relay(c.w)
	return nil
}
