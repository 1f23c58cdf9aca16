package client

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/json"
	"fmt"

	"github.com/vmbond/vmbond/internal/audit"
	"github.com/vmbond/vmbond/internal/ca"
	"github.com/vmbond/vmbond/internal/proto"
)

// HostAudit is the verification of one host's decision log.
type HostAudit struct {
	Host   string        `json:"host"`
	Error  string        `json:"error,omitempty"` // fetching or trusting it failed
	Report *audit.Report `json:"report,omitempty"`
	OK     bool          `json:"ok"`
}

// collected is one entry of the server's GET /v1/audit answer.
type collected struct {
	Host  string          `json:"host"`
	Error string          `json:"error,omitempty"`
	Log   json.RawMessage `json:"log,omitempty"`
}

// VerifyAudit has the server collect every host's decision log and checks
// each against the host's signing key, taken from a certificate the pinned
// host CA signed: an altered, dropped, reordered or forged entry is named.
func (c *Client) VerifyAudit(ctx context.Context) ([]HostAudit, error) {
	caPub, err := c.hostCA()
	if err != nil {
		return nil, err
	}
	hosts, err := c.Hosts(ctx)
	if err != nil {
		return nil, err
	}
	var logs []collected
	if err := c.call(ctx, "GET", "/v1/audit", nil, &logs); err != nil {
		return nil, fmt.Errorf("collect audit logs: %w", err)
	}
	var out []HostAudit
	for _, l := range logs {
		ha := HostAudit{Host: l.Host}
		var b audit.Bundle
		switch {
		case len(l.Log) == 0:
			ha.Error = "no log collected: " + l.Error
		case json.Unmarshal(l.Log, &b) != nil:
			ha.Error = "the collected log is not an audit bundle"
		}
		if ha.Error == "" {
			ha.Report, ha.Error = verifyBundle(c, caPub, hosts, l.Host, &b)
			ha.OK = ha.Error == ""
		}
		out = append(out, ha)
	}
	return out, nil
}

func verifyBundle(c *Client, caPub ed25519.PublicKey, hosts []proto.HostInfo, host string, b *audit.Bundle) (*audit.Report, string) {
	var key []byte
	for i := range hosts {
		if hosts[i].ID == host {
			body, err := ca.VerifyHost(caPub, &hosts[i].Cert, c.now())
			if err != nil {
				return nil, err.Error()
			}
			key = body.Identity.SigningKey
		}
	}
	if key == nil {
		return nil, "no certified host " + host
	}
	v := audit.Verifier{HostKey: key, Host: host, Heads: []audit.Head{b.Head}, RequireSigned: true, NoRedacted: true}
	rep, err := v.Verify(bytes.NewReader(b.Log))
	if err != nil {
		return rep, err.Error()
	}
	return rep, ""
}

// VMAudit fetches the tenant's view of its VM's host log and verifies it
// with the host key pinned at creation; it returns the VM's own events.
func (c *Client) VMAudit(ctx context.Context, nameOrID string) ([]audit.Event, *audit.Report, error) {
	k, err := c.Store.Key(nameOrID)
	if err != nil {
		return nil, nil, err
	}
	var b audit.Bundle
	if err := c.call(ctx, "GET", "/v1/vms/"+k.ID+"/audit", nil, &b); err != nil {
		return nil, nil, err
	}
	var events []audit.Event
	v := audit.Verifier{HostKey: k.HostSign, Host: k.Host, Heads: []audit.Head{b.Head}, RequireSigned: true,
		Visit: func(e audit.Event) error {
			events = append(events, e)
			return nil
		}}
	rep, err := v.Verify(bytes.NewReader(b.Log))
	if err != nil {
		return nil, rep, fmt.Errorf("the audit log of host %s does not verify: %w", k.Host, err)
	}
	for _, e := range events {
		if e.VM != k.ID {
			return nil, rep, fmt.Errorf("the audit view of %s shows another VM's event (%s)", k.Name, e.VM)
		}
	}
	return events, rep, nil
}
