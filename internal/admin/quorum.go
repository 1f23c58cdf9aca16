package admin

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/vmbond/vmbond/internal/proto"
)

// MaxApprovals bounds how many approvals CheckQuorum looks at, so that a
// hostile relay cannot make an agent verify signatures without end.
const MaxApprovals = 64

// ApprovalBody is what an admin signs to approve another admin's request.
type ApprovalBody struct {
	Version string    `json:"version"`
	Admin   string    `json:"admin"`
	Request []byte    `json:"request"` // SHA-256 of the request body bytes
	Expires time.Time `json:"expires"`
}

// Approval is one admin's signed approval of a request, with the approving
// admin's credential attached.
type Approval struct {
	Credential Credential `json:"credential"`
	Body       []byte     `json:"body"` // JSON of ApprovalBody
	Sig        []byte     `json:"sig"`
}

// Approve signs an approval of the request whose digest is requestDigest
// (SignedRequest.Digest), valid until expires, with the approving admin's
// private key priv, and attaches the admin's credential cred.
func Approve(priv ed25519.PrivateKey, cred *Credential, requestDigest []byte, expires time.Time) (*Approval, error) {
	cb, err := credentialFor(priv, cred)
	if err != nil {
		return nil, fmt.Errorf("approve: %w", err)
	}
	if len(requestDigest) != sha256.Size {
		return nil, fmt.Errorf("approve: request digest is %d bytes, want %d", len(requestDigest), sha256.Size)
	}
	if expires.IsZero() {
		return nil, errors.New("approve: no expiry time")
	}
	body, err := json.Marshal(ApprovalBody{
		Version: proto.Version,
		Admin:   cb.Name,
		Request: bytes.Clone(requestDigest),
		Expires: expires.UTC(),
	})
	if err != nil {
		return nil, fmt.Errorf("approve: %w", err)
	}
	sig, err := sign(priv, ctxApproval, body)
	if err != nil {
		return nil, fmt.Errorf("approve: %w", err)
	}
	return &Approval{Credential: *cloneCredential(cred), Body: body, Sig: sig}, nil
}

// QuorumError says why a set of approvals did not reach the quorum: how many
// counted, how many were needed, and why each other approval did not count.
type QuorumError struct {
	Valid     int      // approvals that counted
	Needed    int      // approvals needed
	Approvers []string // admins whose approvals counted
	Rejected  []error  // why each other approval did not count
}

func (e *QuorumError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "quorum not met: %d valid approval", e.Valid)
	if e.Valid != 1 {
		b.WriteString("s")
	}
	fmt.Fprintf(&b, " of %d needed", e.Needed)
	if len(e.Approvers) > 0 {
		fmt.Fprintf(&b, " (counted: %s)", strings.Join(e.Approvers, ", "))
	}
	for _, r := range e.Rejected {
		b.WriteString("; ")
		b.WriteString(r.Error())
	}
	return b.String()
}

// CheckQuorum reports whether approvals hold at least m valid approvals of
// the request requestDigest made by the admin requester. An approval counts
// only if its credential is signed by the admin CA caPub, valid at now and
// not revoked in rs (whose list must be younger than maxAge), its signature
// verifies with that credential's key, it is over exactly requestDigest, it
// has not expired, it is not by the requester, and no approval by the same
// admin (or the same key) has counted already. Falling short returns a
// *QuorumError that names why each other approval did not count.
func CheckQuorum(caPub ed25519.PublicKey, rs *RevocationState, requester string, requestDigest []byte, approvals []*Approval, m int, now time.Time, maxAge time.Duration) error {
	if m < 1 {
		return fmt.Errorf("check quorum: quorum size %d, want at least 1", m)
	}
	if err := proto.ValidID("admin", requester); err != nil {
		return fmt.Errorf("check quorum: requester: %w", err)
	}
	if len(requestDigest) != sha256.Size {
		return fmt.Errorf("check quorum: request digest is %d bytes, want %d", len(requestDigest), sha256.Size)
	}
	if len(approvals) > MaxApprovals {
		return fmt.Errorf("check quorum: %d approvals, at most %d accepted", len(approvals), MaxApprovals)
	}
	if err := checkCAPub(caPub); err != nil {
		return fmt.Errorf("check quorum: %w", err)
	}
	if rs == nil {
		return errors.New("check quorum: no revocation state: admin operations refused")
	}
	if err := rs.Fresh(now, maxAge); err != nil {
		return fmt.Errorf("check quorum: %w", err)
	}
	qe := &QuorumError{Needed: m}
	byKey := make(map[string]string) // credential key -> admin counted with it
	for i, a := range approvals {
		cb, err := checkApproval(caPub, rs, requestDigest, a, i, now, maxAge)
		switch {
		case err != nil:
		case cb.Name == requester:
			err = fmt.Errorf("approval by %s: self approval does not count", cb.Name)
		case slices.Contains(qe.Approvers, cb.Name):
			err = fmt.Errorf("approval by %s: duplicate, %s's approval already counted once", cb.Name, cb.Name)
		case byKey[string(cb.Key)] != "":
			err = fmt.Errorf("approval by %s: same key as the approval by %s, counted once", cb.Name, byKey[string(cb.Key)])
		}
		if err != nil {
			qe.Rejected = append(qe.Rejected, err)
			continue
		}
		qe.Valid++
		qe.Approvers = append(qe.Approvers, cb.Name)
		byKey[string(cb.Key)] = cb.Name
	}
	if qe.Valid >= m {
		return nil
	}
	return qe
}

// checkApproval verifies one approval (the i-th, from 0) on its own: its
// credential, its signature, its digest and its expiry. It returns the
// approver's credential, or an error that names the approval.
func checkApproval(caPub ed25519.PublicKey, rs *RevocationState, requestDigest []byte, a *Approval, i int, now time.Time, maxAge time.Duration) (*CredentialBody, error) {
	if a == nil {
		return nil, fmt.Errorf("approval #%d: empty", i+1)
	}
	cb, err := VerifyCredential(caPub, &a.Credential, now)
	if err != nil {
		return nil, fmt.Errorf("approval #%d: %w", i+1, err)
	}
	if err := rs.Check(cb, now, maxAge); err != nil {
		return nil, fmt.Errorf("approval by %s: %w", cb.Name, err)
	}
	if !verify(cb.Key, ctxApproval, a.Body, a.Sig) {
		return nil, fmt.Errorf("approval by %s: signature does not verify with the key of %s's credential", cb.Name, cb.Name)
	}
	var b ApprovalBody
	if err := proto.DecodeStrict(a.Body, &b); err != nil {
		return nil, fmt.Errorf("approval by %s: decode: %w", cb.Name, err)
	}
	if b.Version != proto.Version {
		return nil, fmt.Errorf("approval by %s: version %q, want %q", cb.Name, b.Version, proto.Version)
	}
	if b.Admin != cb.Name {
		return nil, fmt.Errorf("approval by %s: names admin %q", cb.Name, b.Admin)
	}
	if !bytes.Equal(b.Request, requestDigest) {
		return nil, fmt.Errorf("approval by %s: approves a different request", cb.Name)
	}
	if now.After(b.Expires) {
		return nil, fmt.Errorf("approval by %s expired at %s", cb.Name, stamp(b.Expires))
	}
	return cb, nil
}
