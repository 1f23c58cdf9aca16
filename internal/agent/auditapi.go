package agent

import (
	"bytes"
	"net/http"

	"github.com/vmbond/vmbond/internal/audit"
	"github.com/vmbond/vmbond/internal/proto"
)

// handleAudit hands out the whole decision log with a freshly signed head.
func (a *Agent) handleAudit(w http.ResponseWriter, r *http.Request) {
	var buf bytes.Buffer
	head, err := a.audit.Export(&buf, 0, a.id.signer)
	if err != nil {
		fail(w, http.StatusServiceUnavailable, &proto.Error{Code: proto.CodeUnavailable, Message: "export audit log: " + err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, audit.Bundle{Head: head, Log: buf.Bytes()})
}

// handleVMAudit hands out a tenant's view: the whole chain, with every entry
// that is not about this VM redacted to its hash.
func (a *Agent) handleVMAudit(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("vm")
	if err := proto.ValidID("vm", name); err != nil {
		fail(w, http.StatusBadRequest, &proto.Error{Code: proto.CodeBadRequest, Message: err.Error()})
		return
	}
	head, err := a.audit.SignHead(a.id.signer)
	if err == nil {
		var buf bytes.Buffer
		if err = a.audit.Redacted(&buf, 0, head.Seq, func(e audit.Event) bool { return e.VM == name }); err == nil {
			writeJSON(w, http.StatusOK, audit.Bundle{Head: head, Log: buf.Bytes()})
			return
		}
	}
	fail(w, http.StatusServiceUnavailable, &proto.Error{Code: proto.CodeUnavailable, Message: "export audit view: " + err.Error()})
}
