package admin

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"time"

	"github.com/vmbond/vmbond/internal/proto"
)

// NonceSize is the size of a request nonce.
const NonceSize = 16

// DefaultSkew is how far a request's time may be from the agent's clock.
const DefaultSkew = 5 * time.Minute

// RequestBody is one operation an admin asks an agent to run, signed with
// the admin's own key. Host and VM bind it to one target; Nonce and Time
// make it fresh, so the agent can refuse replays by keeping the nonces it
// has seen within the skew window.
type RequestBody struct {
	Version string            `json:"version"`
	Admin   string            `json:"admin"`
	Host    string            `json:"host"`
	VM      string            `json:"vm,omitempty"` // empty for host-wide operations
	Op      string            `json:"op"`
	Args    map[string]string `json:"args,omitempty"`
	Nonce   []byte            `json:"nonce"` // NonceSize random bytes
	Time    time.Time         `json:"time"`
}

// SignedRequest is an admin's request as it travels: the admin's credential,
// the exact request body bytes and the admin's signature over them.
type SignedRequest struct {
	Credential Credential `json:"credential"`
	Body       []byte     `json:"body"` // JSON of RequestBody
	Sig        []byte     `json:"sig"`
}

// Digest returns the SHA-256 of the request body bytes: what approvals sign
// and what a replay cache or an audit log records. It identifies the request
// only once VerifyRequest has accepted sr.
func (sr *SignedRequest) Digest() []byte {
	d := sha256.Sum256(sr.Body)
	return d[:]
}

// SignRequest signs r with the admin's private key priv and attaches cred.
// An empty Version, Admin, Nonce or Time is filled in (protocol version,
// credential name, fresh random nonce, current time); the rest of r must be
// set by the caller. It refuses a credential for a key other than priv's.
func SignRequest(priv ed25519.PrivateKey, cred *Credential, r RequestBody) (*SignedRequest, error) {
	cb, err := credentialFor(priv, cred)
	if err != nil {
		return nil, fmt.Errorf("sign request: %w", err)
	}
	if r.Version == "" {
		r.Version = proto.Version
	}
	if r.Admin == "" {
		r.Admin = cb.Name
	}
	if r.Nonce == nil {
		r.Nonce = make([]byte, NonceSize)
		if _, err := rand.Read(r.Nonce); err != nil {
			return nil, fmt.Errorf("sign request: %w", err)
		}
	}
	if r.Time.IsZero() {
		r.Time = time.Now()
	}
	r.Time = r.Time.UTC()
	r.Args = maps.Clone(r.Args)
	if err := r.check(); err != nil {
		return nil, fmt.Errorf("sign request: %w", err)
	}
	if r.Admin != cb.Name {
		return nil, fmt.Errorf("sign request: request names admin %s but the credential is %s's", r.Admin, cb.Name)
	}
	body, err := json.Marshal(r)
	if err != nil {
		return nil, fmt.Errorf("sign request: %w", err)
	}
	sig, err := sign(priv, ctxRequest, body)
	if err != nil {
		return nil, fmt.Errorf("sign request: %w", err)
	}
	return &SignedRequest{Credential: *cloneCredential(cred), Body: body, Sig: sig}, nil
}

// check validates a request body's fields. It authenticates nothing.
func (r *RequestBody) check() error {
	if r.Version != proto.Version {
		return fmt.Errorf("request version %q, want %q", r.Version, proto.Version)
	}
	if err := proto.ValidID("admin", r.Admin); err != nil {
		return err
	}
	if err := proto.ValidID("host", r.Host); err != nil {
		return err
	}
	if r.VM != "" {
		if err := proto.ValidID("vm", r.VM); err != nil {
			return err
		}
	}
	if err := proto.ValidID("operation", r.Op); err != nil {
		return err
	}
	for k := range r.Args {
		if k == "" {
			return errors.New("request has an argument with an empty name")
		}
	}
	if len(r.Nonce) != NonceSize {
		return fmt.Errorf("request nonce is %d bytes, want %d", len(r.Nonce), NonceSize)
	}
	if r.Time.IsZero() {
		return errors.New("request has no time")
	}
	return nil
}

// VerifyRequest checks an admin's signed request at the time now: the
// credential against the pinned admin CA key caPub (signature and validity),
// against the revocation state rs (serial not revoked, list not older than
// maxAge), the request signature against the credential's key, that the
// request names the credential's admin, and that its time is within skew of
// now (zero maxAge and skew mean DefaultMaxRevocationAge and DefaultSkew).
//
// The caller still decides what the request may do: that Host is this host,
// that the nonce was not seen before (SignedRequest.Digest or the nonce can
// key a replay cache kept for the skew window), and whether the credential's
// roles, the tenant's policy or a quorum (CheckQuorum over sr.Digest())
// allow Op.
func VerifyRequest(caPub ed25519.PublicKey, rs *RevocationState, sr *SignedRequest, now time.Time, maxAge, skew time.Duration) (*RequestBody, *CredentialBody, error) {
	if sr == nil {
		return nil, nil, errors.New("verify admin request: no request")
	}
	if rs == nil {
		return nil, nil, errors.New("verify admin request: no revocation state: admin operations refused")
	}
	if skew == 0 {
		skew = DefaultSkew
	}
	if skew < 0 {
		return nil, nil, fmt.Errorf("verify admin request: negative clock skew %s", skew)
	}
	cb, err := VerifyCredential(caPub, &sr.Credential, now)
	if err != nil {
		return nil, nil, fmt.Errorf("verify admin request: %w", err)
	}
	if err := rs.Check(cb, now, maxAge); err != nil {
		return nil, nil, fmt.Errorf("verify admin request by %s: %w", cb.Name, err)
	}
	if !verify(cb.Key, ctxRequest, sr.Body, sr.Sig) {
		return nil, nil, fmt.Errorf("verify admin request by %s: signature does not verify with the key of %s's credential", cb.Name, cb.Name)
	}
	var r RequestBody
	if err := proto.DecodeStrict(sr.Body, &r); err != nil {
		return nil, nil, fmt.Errorf("verify admin request by %s: decode: %w", cb.Name, err)
	}
	if err := r.check(); err != nil {
		return nil, nil, fmt.Errorf("verify admin request by %s: %w", cb.Name, err)
	}
	if r.Admin != cb.Name {
		return nil, nil, fmt.Errorf("verify admin request: request names admin %s but is signed with %s's credential", r.Admin, cb.Name)
	}
	if d := now.Sub(r.Time); d > skew {
		return nil, nil, fmt.Errorf("verify admin request by %s: request is %s old, limit %s", cb.Name, fmtDuration(d), fmtDuration(skew))
	} else if -d > skew {
		return nil, nil, fmt.Errorf("verify admin request by %s: request is dated %s in the future, limit %s", cb.Name, fmtDuration(-d), fmtDuration(skew))
	}
	return &r, cb, nil
}

func cloneCredential(c *Credential) *Credential {
	return &Credential{Body: append([]byte(nil), c.Body...), Sig: append([]byte(nil), c.Sig...)}
}
