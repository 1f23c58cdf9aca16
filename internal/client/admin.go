package client

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/vmbond/vmbond/internal/admin"
	"github.com/vmbond/vmbond/internal/ca"
	"github.com/vmbond/vmbond/internal/proto"
)

// adminIdentity loads the admin's key and credential.
func (c *Client) adminIdentity() (ed25519.PrivateKey, *admin.Credential, error) {
	if c.Config.AdminKey == "" || c.Config.AdminCred == "" {
		return nil, nil, errors.New("no admin credential configured: run `vmbond login --admin-key FILE --admin-cred FILE` (the security officer issues credentials with `vmbond ca sign-admin`)")
	}
	priv, err := ca.LoadPrivateKey(c.Config.AdminKey)
	if err != nil {
		return nil, nil, err
	}
	b, err := os.ReadFile(c.Config.AdminCred)
	if err != nil {
		return nil, nil, fmt.Errorf("read admin credential: %w", err)
	}
	var cred admin.Credential
	if err := json.Unmarshal(b, &cred); err != nil {
		return nil, nil, fmt.Errorf("read admin credential %s: %w", c.Config.AdminCred, err)
	}
	return priv, &cred, nil
}

// AdminTarget is what an admin request acts on: a VM, or a whole host.
type AdminTarget struct {
	VM   string
	Host string
}

// SignAdminRequest signs an operation as the configured admin. For a VM the
// host is looked up from the server's inventory; the agent checks it anyway.
func (c *Client) SignAdminRequest(ctx context.Context, t AdminTarget, op string, args map[string]string) (*admin.SignedRequest, error) {
	priv, cred, err := c.adminIdentity()
	if err != nil {
		return nil, err
	}
	var body admin.CredentialBody
	if err := json.Unmarshal(cred.Body, &body); err != nil {
		return nil, fmt.Errorf("read admin credential: %w", err)
	}
	if t.VM != "" && t.Host == "" {
		var info proto.VMInfo
		if err := c.call(ctx, "GET", "/v1/vms/"+t.VM, nil, &info); err != nil {
			return nil, fmt.Errorf("look up VM %s: %w", t.VM, err)
		}
		t.Host = info.Host
	}
	return admin.SignRequest(priv, cred, admin.RequestBody{
		Version: proto.Version, Admin: body.Name, Host: t.Host, VM: t.VM, Op: op, Args: args,
		Nonce: newNonce(16), Time: c.now().UTC(),
	})
}

// Admin runs an operation as an admin, without the tenant: the agent runs it
// only if the tenant's policy allows it and the admin's budget is not spent.
func (c *Client) Admin(ctx context.Context, vmID, op string) (*proto.AdminReply, error) {
	sr, err := c.SignAdminRequest(ctx, AdminTarget{VM: vmID}, op, nil)
	if err != nil {
		return nil, err
	}
	var r proto.AdminReply
	return &r, c.call(ctx, "POST", "/v1/vms/"+vmID+"/admin", admin.Envelope{Request: *sr}, &r)
}

// AdminRequest is the server's record of a request awaiting approvals.
type AdminRequest struct {
	ID        string         `json:"id"`
	Envelope  admin.Envelope `json:"envelope"`
	Requester string         `json:"requester"`
	Host      string         `json:"host"`
	VM        string         `json:"vm,omitempty"`
	Op        string         `json:"op"`
	Executed  bool           `json:"executed"`
}

// RequestQuorum files a signed request for other admins to approve.
func (c *Client) RequestQuorum(ctx context.Context, t AdminTarget, op string, args map[string]string) (*AdminRequest, error) {
	sr, err := c.SignAdminRequest(ctx, t, op, args)
	if err != nil {
		return nil, err
	}
	var r AdminRequest
	return &r, c.call(ctx, "POST", "/v1/requests", admin.Envelope{Request: *sr}, &r)
}

// Requests lists pending and executed requests.
func (c *Client) Requests(ctx context.Context) ([]AdminRequest, error) {
	var rs []AdminRequest
	return rs, c.call(ctx, "GET", "/v1/requests", nil, &rs)
}

// ApproveRequest signs an approval of request id, after checking that the
// request the server shows is the one with that digest: the approval is over
// the digest, so the server cannot swap the request under it.
func (c *Client) ApproveRequest(ctx context.Context, id string, validFor time.Duration) (*admin.RequestBody, error) {
	priv, cred, err := c.adminIdentity()
	if err != nil {
		return nil, err
	}
	var r AdminRequest
	if err := c.call(ctx, "GET", "/v1/requests/"+id, nil, &r); err != nil {
		return nil, err
	}
	digest := r.Envelope.Request.Digest()
	if hex.EncodeToString(digest) != id {
		return nil, fmt.Errorf("request %s: the server shows a request whose digest is %x", id, digest)
	}
	var body admin.RequestBody
	if err := proto.DecodeStrict(r.Envelope.Request.Body, &body); err != nil {
		return nil, fmt.Errorf("request %s: %w", id, err)
	}
	var me admin.CredentialBody
	if err := json.Unmarshal(cred.Body, &me); err != nil {
		return nil, fmt.Errorf("read admin credential: %w", err)
	}
	if me.Name == body.Admin {
		return &body, fmt.Errorf("request %s is your own: an approval by its requester never counts; ask other admins", id)
	}
	ap, err := admin.Approve(priv, cred, digest, c.now().Add(validFor))
	if err != nil {
		return nil, err
	}
	return &body, c.call(ctx, "POST", "/v1/requests/"+id+"/approvals", ap, nil)
}

// ExecuteRequest has the server deliver a request with its approvals.
func (c *Client) ExecuteRequest(ctx context.Context, id string) (*proto.AdminReply, error) {
	var r proto.AdminReply
	return &r, c.call(ctx, "POST", "/v1/requests/"+id+"/execute", nil, &r)
}

// PushRevocations hands a revocation list to the server for every agent.
func (c *Client) PushRevocations(ctx context.Context, list *admin.RevocationList) (json.RawMessage, error) {
	var out json.RawMessage
	return out, c.call(ctx, "POST", "/v1/revocations", list, &out)
}

// AdminLogin fills in the admin identity of a configuration after checking
// that the credential matches the key.
func AdminLogin(cfg *Config, keyFile, credFile string) error {
	cl := &Client{Config: &Config{AdminKey: keyFile, AdminCred: credFile}}
	priv, cred, err := cl.adminIdentity()
	if err != nil {
		return err
	}
	var body admin.CredentialBody
	if err := json.Unmarshal(cred.Body, &body); err != nil {
		return err
	}
	if !bytes.Equal(body.Key, priv.Public().(ed25519.PublicKey)) {
		return fmt.Errorf("credential %s is for another key than %s", credFile, keyFile)
	}
	cfg.AdminKey, cfg.AdminCred = keyFile, credFile
	return nil
}
