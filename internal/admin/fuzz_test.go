package admin

import (
	"crypto/ed25519"
	"encoding/json"
	"testing"
	"time"
)

// FuzzVerifyRequest feeds arbitrary bytes to VerifyRequest and CheckQuorum,
// both as a whole SignedRequest (JSON from the untrusted server) and as the
// request body under a genuine credential, and checks that nothing panics
// and that nothing but the genuine request verifies.
func FuzzVerifyRequest(f *testing.F) {
	fx := newFixture(f)
	bob, carol := fx.admin("bob"), fx.admin("carol")
	good, err := SignRequest(bob.priv, bob.cred, RequestBody{Host: "host-1", VM: "vm-7", Op: "delete", Args: map[string]string{"k": "v"}, Time: t0})
	if err != nil {
		f.Fatal(err)
	}
	ap, err := Approve(carol.priv, carol.cred, good.Digest(), t0.Add(time.Hour))
	if err != nil {
		f.Fatal(err)
	}
	goodJSON, _ := json.Marshal(good)
	apJSON, _ := json.Marshal([]*Approval{ap})
	f.Add(goodJSON)
	f.Add(good.Body)
	f.Add(apJSON)
	f.Add([]byte(`{"credential":{"body":"e30=","sig":""},"body":"bnVsbA==","sig":null}`))
	f.Add([]byte(`{"credential":{"body":null,"sig":"AAAA"},"body":"","sig":""}`))
	f.Add([]byte(`{"version":"vmbond/v1","admin":"bob","host":"h","op":"x","nonce":"AAAAAAAAAAAAAAAAAAAAAA==","time":"2025-03-14T12:00:00Z"}`))
	f.Add([]byte(`[null,{}]`))
	f.Add([]byte{0xff, 0x00})
	f.Fuzz(func(t *testing.T, data []byte) {
		var sr SignedRequest
		if json.Unmarshal(data, &sr) == nil {
			if _, _, err := VerifyRequest(fx.caPub, fx.rs, &sr, t0, 0, 0); err == nil && string(sr.Body) != string(good.Body) {
				t.Fatalf("forged request verified: %s", data)
			}
			_ = CheckQuorum(fx.caPub, fx.rs, "bob", sr.Digest(), []*Approval{{Credential: sr.Credential, Body: sr.Body, Sig: sr.Sig}}, 1, t0, 0)
		}
		// The bytes as a request body under bob's genuine credential, with
		// the bytes also serving as signature.
		for _, sig := range [][]byte{data, good.Sig, make([]byte, ed25519.SignatureSize)} {
			sr := &SignedRequest{Credential: *bob.cred, Body: data, Sig: sig}
			if _, _, err := VerifyRequest(fx.caPub, fx.rs, sr, t0, 0, 0); err == nil && string(data) != string(good.Body) {
				t.Fatalf("forged body verified: %q", data)
			}
		}
		// The bytes as a credential.
		_, _ = VerifyCredential(fx.caPub, &Credential{Body: data, Sig: data}, t0)
		// The bytes as approvals.
		var aps []*Approval
		if json.Unmarshal(data, &aps) == nil {
			_ = CheckQuorum(fx.caPub, fx.rs, "bob", good.Digest(), aps, 1, t0, 0)
		}
		// The bytes as a revocation list, offered to a state of its own so
		// that runs stay independent.
		var rl RevocationList
		if json.Unmarshal(data, &rl) == nil {
			rs := NewRevocationState(fx.caPub)
			_ = rs.Update(&rl)
		}
	})
}
