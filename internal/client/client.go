// Package client is the tenant's (and admin's) side of vmbond: it runs on the
// user's own machine, keeps the tenant's disk keys, seals them to hosts the
// pinned host CA certified, authenticates every command, and checks every
// answer. It trusts neither the management server nor the network: whatever
// the server does, a command runs only on the VM it was made for, and any
// redirection is reported as such.
package client

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/vmbond/vmbond/internal/bond"
	"github.com/vmbond/vmbond/internal/ca"
	"github.com/vmbond/vmbond/internal/proto"
)

// RedirectionError reports that the server sent a tenant's registration,
// command or verification somewhere other than the VM and host it was for,
// or answered in place of the agent.
type RedirectionError struct {
	VM     string
	Detail string
}

func (e *RedirectionError) Error() string {
	return "VM redirection detected for " + e.VM + ": " + e.Detail
}

// Client talks to the management server on behalf of a tenant or an admin.
type Client struct {
	Config *Config
	Store  *Keystore
	HTTP   *http.Client
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// New returns a client for the keystore in dir.
func New(dir string) (*Client, error) {
	ks := &Keystore{Dir: dir}
	cfg, err := ks.LoadConfig()
	if err != nil {
		return nil, err
	}
	return &Client{Config: cfg, Store: ks, HTTP: &http.Client{Timeout: 10 * time.Minute}}, nil
}

func (c *Client) now() time.Time {
	if c.Now != nil {
		return c.Now()
	}
	return time.Now()
}

// roundTrip sends a request to the server and returns the status and body.
func (c *Client) roundTrip(ctx context.Context, method, path string, body io.Reader, size int64) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimRight(c.Config.Server, "/")+path, body)
	if err != nil {
		return 0, nil, err
	}
	if size >= 0 {
		req.ContentLength = size
	}
	req.Header.Set("Authorization", "Bearer "+c.Config.Token)
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return 0, nil, fmt.Errorf("%s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return 0, nil, fmt.Errorf("%s %s: read answer: %w", method, path, err)
	}
	return resp.StatusCode, b, nil
}

// apiError turns a non-2xx answer into an error.
func apiError(status int, b []byte) error {
	var e proto.Error
	if json.Unmarshal(b, &e) == nil && e.Code != "" {
		return &e
	}
	return fmt.Errorf("server answered %d: %s", status, strings.TrimSpace(string(b)))
}

// call sends JSON and decodes a JSON answer.
func (c *Client) call(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	size := int64(0)
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body, size = bytes.NewReader(b), int64(len(b))
	}
	status, b, err := c.roundTrip(ctx, method, path, body, size)
	if err != nil {
		return err
	}
	if status/100 != 2 {
		return apiError(status, b)
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			return fmt.Errorf("%s %s: decode answer: %w", method, path, err)
		}
	}
	return nil
}

func (c *Client) hostCA() (ed25519.PublicKey, error) {
	if c.Config.HostCA == "" {
		return nil, errors.New("no host CA pinned: run `vmbond login --host-ca FILE` with the security officer's host-ca.pub")
	}
	return ca.ParsePublicKey([]byte(c.Config.HostCA))
}

// verifyHost checks a host's certificate against the pinned host CA.
func (c *Client) verifyHost(h *proto.HostInfo) (*proto.HostCertBody, error) {
	caPub, err := c.hostCA()
	if err != nil {
		return nil, err
	}
	body, err := ca.VerifyHost(caPub, &h.Cert, c.now())
	if err != nil {
		return nil, fmt.Errorf("refusing host %s: %w", h.ID, err)
	}
	if body.Identity.HostID != h.ID {
		return nil, fmt.Errorf("refusing host %s: its certificate is for host %s", h.ID, body.Identity.HostID)
	}
	return body, nil
}

// Hosts lists the hosts the server knows.
func (c *Client) Hosts(ctx context.Context) ([]proto.HostInfo, error) {
	var hs []proto.HostInfo
	return hs, c.call(ctx, "GET", "/v1/hosts", nil, &hs)
}

// List lists the caller's VMs as the server sees them.
func (c *Client) List(ctx context.Context) ([]proto.VMInfo, error) {
	var vs []proto.VMInfo
	return vs, c.call(ctx, "GET", "/v1/vms", nil, &vs)
}

func newNonce(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// Command runs one operation on a tenant's VM and returns the agent's
// authenticated answer. The command is bound to the VM's current descriptor,
// fresh, and MACed; the answer must be sealed under the VM's key and name the
// request, or the client reports a redirection.
func (c *Client) Command(ctx context.Context, nameOrID, op string) (*proto.ReplyBody, error) {
	return c.command(ctx, nameOrID, op, nil)
}

// Purge destroys a deleted VM's key and disk on its host now, before the
// retention period ends. confirm must be the VM's ID: there is no undo.
func (c *Client) Purge(ctx context.Context, nameOrID, confirm string) (*proto.ReplyBody, error) {
	return c.command(ctx, nameOrID, proto.OpPurge, map[string]string{"confirm": confirm})
}

func (c *Client) command(ctx context.Context, nameOrID, op string, args map[string]string) (*proto.ReplyBody, error) {
	k, err := c.Store.Key(nameOrID)
	if err != nil {
		return nil, err
	}
	keys, err := bond.Derive(k.DiskKey, k.Tenant, k.ID)
	if err != nil {
		return nil, err
	}
	desc, err := c.descriptor(ctx, k, keys)
	if err != nil {
		return nil, err
	}
	body, _ := json.Marshal(proto.CommandBody{
		Version: proto.Version, Tenant: k.Tenant, VM: k.ID, Host: k.Host, Op: op, Args: args,
		Nonce: newNonce(16), Time: c.now().UTC(),
	})
	env, _ := json.Marshal(proto.Envelope{Body: body, MAC: keys.CommandMAC(desc.ID, body)})
	status, b, err := c.roundTrip(ctx, "POST", "/v1/vms/"+k.ID+"/command", bytes.NewReader(env), int64(len(env)))
	if err != nil {
		return nil, err
	}
	return c.openReply(k, keys, status, b, op, body)
}

// openReply checks an agent's answer to a request.
func (c *Client) openReply(k *VMKey, keys *bond.Keys, status int, b []byte, op string, request []byte) (*proto.ReplyBody, error) {
	var sealed proto.SealedReply
	if err := json.Unmarshal(b, &sealed); err != nil || len(sealed.Box) == 0 {
		err := apiError(status, b)
		var pe *proto.Error
		if errors.As(err, &pe) && (pe.Code == proto.CodeAuthFailed || pe.Code == proto.CodeRefused) {
			return nil, &RedirectionError{VM: k.Name, Detail: "the command did not reach the agent holding this VM's key (an agent refused it: " + pe.Message + "); nothing ran on VM " + k.ID}
		}
		return nil, err
	}
	if sealed.VM != k.ID || sealed.Host != k.Host {
		return nil, &RedirectionError{VM: k.Name, Detail: fmt.Sprintf("answer came from VM %s on host %s, expected VM %s on host %s", sealed.VM, sealed.Host, k.ID, k.Host)}
	}
	r, err := keys.OpenReply(&sealed)
	if err != nil {
		return nil, &RedirectionError{VM: k.Name, Detail: "the answer is not sealed under this VM's key: it was not produced by the agent holding the key (" + err.Error() + ")"}
	}
	if !hmac.Equal(r.Request, bond.RequestHash(request)) || r.Op != op {
		return nil, &RedirectionError{VM: k.Name, Detail: "the answer is for another request: replayed or substituted by the server"}
	}
	if !r.OK {
		return r, fmt.Errorf("%s %s refused by the agent on %s: %s", op, k.Name, k.Host, r.Error)
	}
	return r, nil
}

// descriptor fetches and opens the VM's current descriptor.
func (c *Client) descriptor(ctx context.Context, k *VMKey, keys *bond.Keys) (*proto.Descriptor, error) {
	var box proto.DescriptorBox
	if err := c.call(ctx, "GET", "/v1/vms/"+k.ID+"/descriptor", nil, &box); err != nil {
		return nil, fmt.Errorf("fetch descriptor of %s: %w", k.Name, err)
	}
	if box.VM != k.ID || box.Host != k.Host {
		return nil, &RedirectionError{VM: k.Name, Detail: fmt.Sprintf("descriptor is for VM %s on host %s, expected VM %s on host %s", box.VM, box.Host, k.ID, k.Host)}
	}
	d, err := keys.OpenDescriptor(&box)
	if err != nil {
		return nil, &RedirectionError{VM: k.Name, Detail: "the descriptor was not issued by an agent holding this VM's key"}
	}
	return d, nil
}

// Verify challenges the VM's host to prove it holds the VM's key: the answer
// must be signed by the host key pinned at creation and carry a MAC of the
// challenge under a key derived from the disk key.
func (c *Client) Verify(ctx context.Context, nameOrID string) error {
	k, err := c.Store.Key(nameOrID)
	if err != nil {
		return err
	}
	keys, err := bond.Derive(k.DiskKey, k.Tenant, k.ID)
	if err != nil {
		return err
	}
	challenge := newNonce(32)
	var vr proto.VerifyReply
	if err := c.call(ctx, "POST", "/v1/vms/"+k.ID+"/verify", proto.VerifyRequest{Challenge: challenge}, &vr); err != nil {
		var pe *proto.Error
		if errors.As(err, &pe) && (pe.Code == proto.CodeNotFound || pe.Code == proto.CodeAuthFailed) {
			return &RedirectionError{VM: k.Name, Detail: "key verification reached an agent that does not have this VM (" + pe.Message + ")"}
		}
		return fmt.Errorf("verify %s: %w", k.Name, err)
	}
	if !ed25519.Verify(k.HostSign, vr.Body, vr.Sig) {
		return &RedirectionError{VM: k.Name, Detail: "key verification was answered by a host other than " + k.Host}
	}
	var body proto.VerifyBody
	if err := proto.DecodeStrict(vr.Body, &body); err != nil {
		return fmt.Errorf("verify %s: %w", k.Name, err)
	}
	if body.VM != k.ID || body.Host != k.Host || body.Tenant != k.Tenant || !hmac.Equal(body.Challenge, challenge) {
		return &RedirectionError{VM: k.Name, Detail: fmt.Sprintf("key verification answered for VM %s on host %s, expected %s on %s", body.VM, body.Host, k.ID, k.Host)}
	}
	if !hmac.Equal(body.Proof, keys.VerifyProof(k.Host, challenge)) {
		return &RedirectionError{VM: k.Name, Detail: "host " + k.Host + " does not hold this VM's disk key: another key was registered in its place"}
	}
	return nil
}

// CreateTenant creates a tenant account (admin).
func (c *Client) CreateTenant(ctx context.Context, name string) (*proto.TenantCredential, error) {
	var cred proto.TenantCredential
	return &cred, c.call(ctx, "POST", "/v1/tenants", proto.CreateTenantRequest{Name: name}, &cred)
}

// AddHost enrols an agent by URL (admin).
func (c *Client) AddHost(ctx context.Context, url string) (*proto.HostInfo, error) {
	var h proto.HostInfo
	return &h, c.call(ctx, "POST", "/v1/hosts", proto.AddHostRequest{URL: url}, &h)
}

func randomID(prefix string) string { return prefix + hex.EncodeToString(newNonce(5)) }
