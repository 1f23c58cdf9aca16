package admin

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/vmbond/vmbond/internal/ca"
	"github.com/vmbond/vmbond/internal/proto"
)

// t0 is the fixed "now" of every test.
var t0 = time.Date(2025, 3, 14, 12, 0, 0, 0, time.UTC)

// fixture is an admin CA with a fresh revocation list and a few admins.
type fixture struct {
	t     testing.TB
	dir   string
	caPub ed25519.PublicKey
	rs    *RevocationState
}

type testAdmin struct {
	name string
	priv ed25519.PrivateKey
	cred *Credential
	body *CredentialBody
}

func newFixture(t testing.TB) *fixture {
	t.Helper()
	dir := t.TempDir()
	if err := InitCA(dir); err != nil {
		t.Fatal(err)
	}
	f := &fixture{t: t, dir: dir, caPub: readPub(t, filepath.Join(dir, CAPubFile))}
	f.rs = NewRevocationState(f.caPub)
	f.revoke(1)
	return f
}

func readPub(t testing.TB, path string) ed25519.PublicKey {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := ca.ParsePublicKey(b)
	if err != nil {
		t.Fatal(err)
	}
	return pub
}

// admin issues a one-day credential for a new key.
func (f *fixture) admin(name string) *testAdmin {
	f.t.Helper()
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		f.t.Fatal(err)
	}
	cred, err := SignCredential(f.dir, name, []string{"operator"}, pub, 0, 0, t0)
	if err != nil {
		f.t.Fatal(err)
	}
	body, err := VerifyCredential(f.caPub, cred, t0)
	if err != nil {
		f.t.Fatal(err)
	}
	return &testAdmin{name: name, priv: priv, cred: cred, body: body}
}

// revoke installs revocation list number, issued at t0, in the fixture's state.
func (f *fixture) revoke(number uint64, serials ...string) *RevocationList {
	f.t.Helper()
	l, err := SignRevocations(f.dir, serials, t0, number)
	if err != nil {
		f.t.Fatal(err)
	}
	if err := f.rs.Update(l); err != nil {
		f.t.Fatal(err)
	}
	return l
}

func wantErr(t *testing.T, err error, want string) {
	t.Helper()
	switch {
	case want == "" && err != nil:
		t.Fatalf("unexpected error: %v", err)
	case want != "" && err == nil:
		t.Fatalf("no error, want one containing %q", want)
	case want != "" && !strings.Contains(err.Error(), want):
		t.Fatalf("error %q does not contain %q", err, want)
	}
}

func TestInitCAAndGenerateKey(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	if err := ca.Init(dir); err != nil {
		t.Fatal(err)
	}
	if err := InitCA(dir); err != nil {
		t.Fatalf("admin CA next to the host CA: %v", err)
	}
	for name, mode := range map[string]os.FileMode{CAKeyFile: 0o600, CAPubFile: 0o644, ca.HostKeyFile: 0o600} {
		st, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != mode {
			t.Errorf("%s mode %v, want %v", name, st.Mode().Perm(), mode)
		}
	}
	priv, err := ca.LoadPrivateKey(filepath.Join(dir, CAKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if !priv.Public().(ed25519.PublicKey).Equal(readPub(t, filepath.Join(dir, CAPubFile))) {
		t.Fatal("admin CA public key does not match its private key")
	}
	if host := readPub(t, filepath.Join(dir, ca.HostPubFile)); host.Equal(priv.Public()) {
		t.Fatal("admin CA and host CA share a key")
	}
	before, _ := os.ReadFile(filepath.Join(dir, CAKeyFile))
	wantErr(t, InitCA(dir), "refusing to overwrite")
	if after, _ := os.ReadFile(filepath.Join(dir, CAKeyFile)); string(after) != string(before) {
		t.Fatal("second InitCA changed the admin CA key")
	}
	// A public key alone (the key moved offline, say) also blocks re-init.
	other := t.TempDir()
	if err := os.WriteFile(filepath.Join(other, CAPubFile), before, 0o644); err != nil {
		t.Fatal(err)
	}
	wantErr(t, InitCA(other), "refusing to overwrite")
	if _, err := os.Stat(filepath.Join(other, CAKeyFile)); !os.IsNotExist(err) {
		t.Fatal("refused InitCA left a key behind")
	}

	home := filepath.Join(t.TempDir(), "admin")
	pubPath, err := GenerateKey(home)
	if err != nil {
		t.Fatal(err)
	}
	if pubPath != filepath.Join(home, PubFile) {
		t.Fatalf("GenerateKey returned %s", pubPath)
	}
	st, err := os.Stat(filepath.Join(home, KeyFile))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("admin key: %v, %v", st, err)
	}
	apriv, err := ca.LoadPrivateKey(filepath.Join(home, KeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if !apriv.Public().(ed25519.PublicKey).Equal(readPub(t, pubPath)) {
		t.Fatal("admin public key does not match its private key")
	}
	_, err = GenerateKey(home)
	wantErr(t, err, "refusing to overwrite")
}

func TestCredential(t *testing.T) {
	f := newFixture(t)
	other := newFixture(t) // a different admin CA
	pub, _, _ := ed25519.GenerateKey(rand.Reader)
	sign := func(validity, max time.Duration) (*Credential, error) {
		return SignCredential(f.dir, "bob", []string{"operator", "security"}, pub, validity, max, t0)
	}
	good, err := sign(0, 0)
	if err != nil {
		t.Fatal(err)
	}
	foreign, err := SignCredential(other.dir, "bob", nil, pub, 0, 0, t0)
	if err != nil {
		t.Fatal(err)
	}
	tampered := *cloneCredential(good)
	tampered.Body = []byte(strings.Replace(string(tampered.Body), `"bob"`, `"bob2"`, 1))
	tests := []struct {
		name string
		cred *Credential
		now  time.Time
		want string
	}{
		{"valid", good, t0, ""},
		{"valid near end", good, t0.Add(24*time.Hour - time.Second), ""},
		{"expired", good, t0.Add(25 * time.Hour), "credential of bob expired at 2025-03-15T12:00:00Z"},
		{"not yet valid", good, t0.Add(-time.Hour), "credential of bob is not valid until 2025-03-14T11:55:00Z"},
		{"wrong CA", foreign, t0, "not signed by the pinned admin CA"},
		{"tampered", &tampered, t0, "not signed by the pinned admin CA"},
		{"nil", nil, t0, "no admin credential"},
		{"no signature", &Credential{Body: good.Body}, t0, "not signed by the pinned admin CA"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, err := VerifyCredential(f.caPub, tt.cred, tt.now)
			wantErr(t, err, tt.want)
			if err == nil {
				if b.Name != "bob" || !b.Key.Equal(pub) || !b.HasRole("security") || b.HasRole("root") || len(b.Serial) != 32 {
					t.Fatalf("body %+v", b)
				}
				if d := b.NotAfter.Sub(t0); d != DefaultValidity {
					t.Fatalf("default validity %s", d)
				}
			}
		})
	}

	signTests := []struct {
		name     string
		validity time.Duration
		max      time.Duration
		want     string
	}{
		{"default", 0, 0, ""},
		{"seven days", 7 * 24 * time.Hour, 0, ""},
		{"over default max", 8 * 24 * time.Hour, 0, "validity 192h exceeds the maximum 168h"},
		{"over configured max", 2 * time.Hour, time.Hour, "validity 2h exceeds the maximum 1h"},
		{"default over configured max", 0, 12 * time.Hour, "validity 24h exceeds the maximum 12h"},
		{"within configured max", 30 * 24 * time.Hour, 30 * 24 * time.Hour, ""},
		{"negative", -time.Hour, 0, "negative validity"},
	}
	for _, tt := range signTests {
		t.Run("sign "+tt.name, func(t *testing.T) {
			_, err := sign(tt.validity, tt.max)
			wantErr(t, err, tt.want)
		})
	}
	for _, tt := range []struct {
		name  string
		admin string
		roles []string
		key   ed25519.PublicKey
		dir   string
		want  string
	}{
		{"bad name", "Bob!", nil, pub, f.dir, `invalid admin "Bob!"`},
		{"empty name", "", nil, pub, f.dir, "invalid admin"},
		{"bad role", "bob", []string{"a b"}, pub, f.dir, `invalid role "a b"`},
		{"duplicate role", "bob", []string{"x", "x"}, pub, f.dir, `role "x" listed twice`},
		{"short key", "bob", nil, pub[:5], f.dir, "admin key is 5 bytes"},
		{"no CA", "bob", nil, pub, t.TempDir(), "admin-ca.key"},
	} {
		t.Run("sign "+tt.name, func(t *testing.T) {
			_, err := SignCredential(tt.dir, tt.admin, tt.roles, tt.key, 0, 0, t0)
			wantErr(t, err, tt.want)
		})
	}
}

func TestRevocation(t *testing.T) {
	f := newFixture(t)
	bob, carol := f.admin("bob"), f.admin("carol")
	wantErr(t, f.rs.Check(bob.body, t0, 0), "")

	l2 := f.revoke(2, bob.body.Serial)
	wantErr(t, f.rs.Check(bob.body, t0, 0), "credential of bob (serial "+bob.body.Serial+") is revoked by revocation list #2")
	wantErr(t, f.rs.Check(carol.body, t0, 0), "")

	// The relay offers the old list again: rollback refused, bob stays revoked.
	l1, err := SignRevocations(f.dir, nil, t0, 1)
	if err != nil {
		t.Fatal(err)
	}
	wantErr(t, f.rs.Update(l1), "refusing rollback from list #2")
	wantErr(t, f.rs.Check(bob.body, t0, 0), "is revoked")
	// The same list again is harmless; a different list under its number is not.
	wantErr(t, f.rs.Update(l2), "")
	l2b, err := SignRevocations(f.dir, nil, t0, 2)
	if err != nil {
		t.Fatal(err)
	}
	wantErr(t, f.rs.Update(l2b), "list #2 differs from the list #2 already held")
	wantErr(t, f.rs.Check(bob.body, t0, 0), "is revoked")

	// A restarted agent reloads its persisted list; rollback still refused.
	rs2 := NewRevocationState(f.caPub)
	wantErr(t, rs2.Update(f.rs.Current()), "")
	wantErr(t, rs2.Update(l1), "refusing rollback")
	wantErr(t, rs2.Check(bob.body, t0, 0), "is revoked")

	// A later list can un-revoke.
	f.revoke(3)
	wantErr(t, f.rs.Check(bob.body, t0, 0), "")

	other := newFixture(t)
	forged, err := SignRevocations(other.dir, nil, t0, 99)
	if err != nil {
		t.Fatal(err)
	}
	wantErr(t, f.rs.Update(forged), "not signed by the pinned admin CA")
	wantErr(t, f.rs.Update(nil), "no revocation list")
	wantErr(t, (&RevocationState{}).Update(l2), "admin CA public key is 0 bytes")
	wantErr(t, f.rs.Update(&RevocationList{Body: l2.Body, Sig: bob.cred.Sig}), "not signed")
	// A credential signature is not a revocation list signature.
	wantErr(t, f.rs.Update(&RevocationList{Body: bob.cred.Body, Sig: bob.cred.Sig}), "not signed")

	_, err = SignRevocations(f.dir, []string{"nothex"}, t0, 4)
	wantErr(t, err, `invalid credential serial "nothex"`)
	_, err = SignRevocations(f.dir, nil, t0, 0)
	wantErr(t, err, "numbers start at 1")
	b, err := VerifyRevocations(f.caPub, l2)
	if err != nil || b.Number != 2 || len(b.Serials) != 1 || b.Serials[0] != bob.body.Serial {
		t.Fatalf("VerifyRevocations: %+v, %v", b, err)
	}
}

func TestRevocationFailsClosed(t *testing.T) {
	f := newFixture(t)
	bob := f.admin("bob")
	tests := []struct {
		name   string
		rs     *RevocationState
		now    time.Time
		maxAge time.Duration
		want   string
	}{
		{"fresh", f.rs, t0.Add(23 * time.Hour), 0, ""},
		{"stale", f.rs, t0.Add(26 * time.Hour), 0,
			"revocation list is 26h old, limit 24h: admin operations refused until a fresh list arrives"},
		{"stale under configured limit", f.rs, t0.Add(90 * time.Minute), time.Hour, "revocation list is 1h30m old, limit 1h"},
		{"no list", NewRevocationState(f.caPub), t0, 0,
			"no revocation list held: admin operations refused until a fresh list arrives"},
		{"zero value", &RevocationState{}, t0, 0, "no revocation list held"},
		{"far future list", f.rs, t0.Add(-48 * time.Hour), 0, "in the future"},
		{"negative limit", f.rs, t0, -time.Hour, "negative"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			wantErr(t, tt.rs.Check(bob.body, tt.now, tt.maxAge), tt.want)
			wantErr(t, tt.rs.Fresh(tt.now, tt.maxAge), tt.want)
		})
	}
}

// resign re-encodes a signed request's body after edit, keeping the original
// signature: what a hostile relay would try.
func resign(t *testing.T, sr *SignedRequest, edit func(*RequestBody)) *SignedRequest {
	t.Helper()
	var r RequestBody
	if err := proto.DecodeStrict(sr.Body, &r); err != nil {
		t.Fatal(err)
	}
	edit(&r)
	body, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	return &SignedRequest{Credential: sr.Credential, Body: body, Sig: sr.Sig}
}

func TestVerifyRequest(t *testing.T) {
	f := newFixture(t)
	bob, mallory, revoked := f.admin("bob"), f.admin("mallory"), f.admin("eve")
	f.revoke(2, revoked.body.Serial)
	req := RequestBody{Host: "host-1", VM: "vm-7", Op: proto.OpDelete, Args: map[string]string{"retain": "72h"}, Time: t0}
	good, err := SignRequest(bob.priv, bob.cred, req)
	if err != nil {
		t.Fatal(err)
	}
	fromRevoked, err := SignRequest(revoked.priv, revoked.cred, req)
	if err != nil {
		t.Fatal(err)
	}
	// Bob's body signed with a key that is not his credential's.
	_, stranger, _ := ed25519.GenerateKey(rand.Reader)
	strangeSig, _ := sign(stranger, ctxRequest, good.Body)
	// Mallory signs a request claiming to be bob, with her own credential.
	claimBody, _ := json.Marshal(RequestBody{Version: proto.Version, Admin: "bob", Host: "host-1", VM: "vm-7", Op: "delete", Nonce: make([]byte, 16), Time: t0})
	claimSig, _ := sign(mallory.priv, ctxRequest, claimBody)
	// Bob's approval signature presented as a request signature.
	appr, err := Approve(bob.priv, bob.cred, good.Digest(), t0.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	futureReq := req
	futureReq.Time = t0.Add(6 * time.Minute)
	future, err := SignRequest(bob.priv, bob.cred, futureReq)
	if err != nil {
		t.Fatal(err)
	}
	short := *good
	short.Credential = Credential{}

	tests := []struct {
		name   string
		sr     *SignedRequest
		rs     *RevocationState
		now    time.Time
		maxAge time.Duration
		want   string
	}{
		{"valid", good, f.rs, t0, 0, ""},
		{"valid within skew", good, f.rs, t0.Add(4 * time.Minute), 0, ""},
		{"tampered op", resign(t, good, func(r *RequestBody) { r.Op = proto.OpStop }), f.rs, t0, 0, "signature does not verify"},
		{"tampered vm", resign(t, good, func(r *RequestBody) { r.VM = "vm-8" }), f.rs, t0, 0, "signature does not verify"},
		{"tampered host", resign(t, good, func(r *RequestBody) { r.Host = "host-2" }), f.rs, t0, 0, "signature does not verify"},
		{"tampered args", resign(t, good, func(r *RequestBody) { r.Args["retain"] = "0s" }), f.rs, t0, 0, "signature does not verify"},
		{"args added", resign(t, good, func(r *RequestBody) { r.Args["force"] = "true" }), f.rs, t0, 0, "signature does not verify"},
		{"tampered time", resign(t, good, func(r *RequestBody) { r.Time = r.Time.Add(time.Hour) }), f.rs, t0.Add(time.Hour), 0, "signature does not verify"},
		{"signed by another key", &SignedRequest{Credential: *bob.cred, Body: good.Body, Sig: strangeSig}, f.rs, t0, 0,
			"signature does not verify with the key of bob's credential"},
		{"credential swapped", &SignedRequest{Credential: *mallory.cred, Body: good.Body, Sig: good.Sig}, f.rs, t0, 0,
			"signature does not verify with the key of mallory's credential"},
		{"claims another admin", &SignedRequest{Credential: *mallory.cred, Body: claimBody, Sig: claimSig}, f.rs, t0, 0,
			"request names admin bob but is signed with mallory's credential"},
		{"approval signature as request", &SignedRequest{Credential: *bob.cred, Body: appr.Body, Sig: appr.Sig}, f.rs, t0, 0,
			"signature does not verify"},
		{"revoked", fromRevoked, f.rs, t0, 0, "credential of eve (serial " + revoked.body.Serial + ") is revoked"},
		{"stale list fails closed", good, f.rs, t0.Add(23 * time.Hour), time.Hour, "revocation list is 23h old, limit 1h"},
		{"no list", good, NewRevocationState(f.caPub), t0, 0, "no revocation list held"},
		{"no state", good, nil, t0, 0, "no revocation state"},
		{"expired credential", good, f.rs, t0.Add(25 * time.Hour), 48 * time.Hour, "credential of bob expired at"},
		{"too old", good, f.rs, t0.Add(6 * time.Minute), 0, "request is 6m old, limit 5m"},
		{"from the future", future, f.rs, t0, 0, "request is dated 6m in the future, limit 5m"},
		{"no credential", &short, f.rs, t0, 0, "not signed by the pinned admin CA"},
		{"nil", nil, f.rs, t0, 0, "no request"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, c, err := VerifyRequest(f.caPub, tt.rs, tt.sr, tt.now, tt.maxAge, 0)
			wantErr(t, err, tt.want)
			if err == nil {
				if r.Admin != "bob" || c.Name != "bob" || r.Op != "delete" || r.VM != "vm-7" || r.Host != "host-1" ||
					r.Args["retain"] != "72h" || len(r.Nonce) != NonceSize || !r.Time.Equal(t0) {
					t.Fatalf("request %+v, credential %+v", r, c)
				}
			}
		})
	}
	if string(good.Digest()) == string(resign(t, good, func(r *RequestBody) { r.VM = "vm-8" }).Digest()) {
		t.Fatal("digest does not depend on the body")
	}
	_, _, err = VerifyRequest(f.caPub, f.rs, good, t0, 0, time.Second)
	wantErr(t, err, "")
	_, _, err = VerifyRequest(f.caPub[:3], f.rs, good, t0, 0, 0)
	wantErr(t, err, "admin CA public key is 3 bytes")
}

func TestSignRequest(t *testing.T) {
	f := newFixture(t)
	bob, carol := f.admin("bob"), f.admin("carol")
	base := RequestBody{Host: "host-1", VM: "vm-7", Op: "pause"}
	sr, err := SignRequest(bob.priv, bob.cred, base)
	if err != nil {
		t.Fatal(err)
	}
	sr2, err := SignRequest(bob.priv, bob.cred, base)
	if err != nil {
		t.Fatal(err)
	}
	if string(sr.Digest()) == string(sr2.Digest()) {
		t.Fatal("two requests share a nonce")
	}
	// SignRequest fills in version, admin, nonce and time.
	var r RequestBody
	if err := proto.DecodeStrict(sr.Body, &r); err != nil {
		t.Fatal(err)
	}
	if r.Version != proto.Version || r.Admin != "bob" || len(r.Nonce) != NonceSize || time.Since(r.Time) > time.Minute {
		t.Fatalf("filled-in request %+v", r)
	}
	for _, tt := range []struct {
		name string
		priv ed25519.PrivateKey
		cred *Credential
		edit func(*RequestBody)
		want string
	}{
		{"credential of another key", bob.priv, carol.cred, nil, "credential of carol is for a different key"},
		{"other admin's name", bob.priv, bob.cred, func(r *RequestBody) { r.Admin = "carol" }, "request names admin carol but the credential is bob's"},
		{"bad host", bob.priv, bob.cred, func(r *RequestBody) { r.Host = "" }, "invalid host"},
		{"bad vm", bob.priv, bob.cred, func(r *RequestBody) { r.VM = "VM 7" }, "invalid vm"},
		{"bad op", bob.priv, bob.cred, func(r *RequestBody) { r.Op = "" }, "invalid operation"},
		{"short nonce", bob.priv, bob.cred, func(r *RequestBody) { r.Nonce = []byte{1} }, "nonce is 1 bytes"},
		{"empty arg name", bob.priv, bob.cred, func(r *RequestBody) { r.Args = map[string]string{"": "x"} }, "empty name"},
		{"wrong version", bob.priv, bob.cred, func(r *RequestBody) { r.Version = "v0" }, "request version"},
		{"no credential", bob.priv, nil, nil, "no admin credential"},
		{"bad key", bob.priv[:10], bob.cred, nil, "private key is 10 bytes"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r := base
			if tt.edit != nil {
				tt.edit(&r)
			}
			_, err := SignRequest(tt.priv, tt.cred, r)
			wantErr(t, err, tt.want)
		})
	}
}

func TestCheckQuorum(t *testing.T) {
	f := newFixture(t)
	alice, bob, carol, dave, eve := f.admin("alice"), f.admin("bob"), f.admin("carol"), f.admin("dave"), f.admin("eve")
	f.revoke(2, dave.body.Serial)
	req, err := SignRequest(alice.priv, alice.cred, RequestBody{Host: "host-1", VM: "vm-7", Op: proto.OpDelete, Time: t0})
	if err != nil {
		t.Fatal(err)
	}
	digest := req.Digest()
	otherDigest := make([]byte, len(digest))
	approve := func(a *testAdmin, d []byte, expires time.Time) *Approval {
		t.Helper()
		ap, err := Approve(a.priv, a.cred, d, expires)
		if err != nil {
			t.Fatal(err)
		}
		return ap
	}
	later := t0.Add(time.Hour)
	byBob, byCarol, byEve := approve(bob, digest, later), approve(carol, digest, later), approve(eve, digest, later)
	byBob2 := approve(bob, digest, later.Add(time.Minute)) // a second, distinct approval by bob
	self := approve(alice, digest, later)
	expired := approve(carol, digest, t0.Add(-time.Minute))
	wrongDigest := approve(carol, otherDigest, later)
	revokedApprover := approve(dave, digest, later)
	forged := *byCarol
	forged.Sig = byBob.Sig
	// Bob's valid approval body re-attached to carol's credential.
	stolen := &Approval{Credential: *carol.cred, Body: byBob.Body, Sig: byBob.Sig}
	// A credential from another CA.
	other := newFixture(t)
	outsider := approve(other.admin("zoe"), digest, later)

	tests := []struct {
		name      string
		approvals []*Approval
		m         int
		now       time.Time
		want      string
		valid     int
	}{
		{"met with distinct admins", []*Approval{byBob, byCarol}, 2, t0, "", 2},
		{"met with extra", []*Approval{self, byBob, expired, byCarol, byEve}, 3, t0, "", 3},
		{"self approval refused", []*Approval{self, byBob}, 2, t0,
			"quorum not met: 1 valid approval of 2 needed (counted: bob); approval by alice: self approval does not count", 1},
		{"duplicate counts once", []*Approval{byBob, byBob, byBob2}, 2, t0,
			"approval by bob: duplicate, bob's approval already counted once", 1},
		{"expired approval", []*Approval{byBob, expired}, 2, t0, "approval by carol expired at 2025-03-14T11:59:00Z", 1},
		{"different digest", []*Approval{byBob, wrongDigest}, 2, t0, "approval by carol: approves a different request", 1},
		{"revoked approver", []*Approval{byBob, revokedApprover}, 2, t0,
			"approval by dave: credential of dave (serial " + dave.body.Serial + ") is revoked by revocation list #2", 1},
		{"forged signature", []*Approval{byBob, &forged}, 2, t0, "approval by carol: signature does not verify", 1},
		{"body moved to another credential", []*Approval{byBob, stolen}, 2, t0, "approval by carol: signature does not verify", 1},
		{"other CA", []*Approval{byBob, outsider}, 2, t0, "approval #2: admin credential is not signed by the pinned admin CA", 1},
		{"nil approval", []*Approval{nil, byBob}, 2, t0, "approval #1: empty", 1},
		{"none", nil, 1, t0, "quorum not met: 0 valid approvals of 1 needed", 0},
		{"approver credential expired", []*Approval{byBob, byCarol}, 2, t0.Add(25 * time.Hour),
			"revocation list is 25h old", 0},
		{"zero quorum", []*Approval{byBob}, 0, t0, "quorum size 0", 0},
		{"too many", make([]*Approval, MaxApprovals+1), 1, t0, "at most 64", 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := CheckQuorum(f.caPub, f.rs, "alice", digest, tt.approvals, tt.m, tt.now, 0)
			wantErr(t, err, tt.want)
			var qe *QuorumError
			if errors.As(err, &qe) && qe.Valid != tt.valid {
				t.Fatalf("valid %d, want %d (%v)", qe.Valid, tt.valid, err)
			}
		})
	}
	// Credential expiry of an approver, with a list young enough to decide.
	err = CheckQuorum(f.caPub, f.rs, "alice", digest, []*Approval{byBob}, 1, t0.Add(25*time.Hour), 48*time.Hour)
	wantErr(t, err, "approval #1: credential of bob expired at")
	// Every rejection is named, with the tally.
	err = CheckQuorum(f.caPub, f.rs, "alice", digest, []*Approval{self, expired, byBob, byBob}, 3, t0, 0)
	for _, want := range []string{"1 valid approval of 3 needed", "alice: self approval", "carol expired at", "bob: duplicate"} {
		wantErr(t, err, want)
	}
	wantErr(t, CheckQuorum(f.caPub, NewRevocationState(f.caPub), "alice", digest, []*Approval{byBob}, 1, t0, 0), "no revocation list held")
	wantErr(t, CheckQuorum(f.caPub, nil, "alice", digest, []*Approval{byBob}, 1, t0, 0), "no revocation state")
	wantErr(t, CheckQuorum(f.caPub, f.rs, "", digest, []*Approval{byBob}, 1, t0, 0), "requester")
	wantErr(t, CheckQuorum(f.caPub, f.rs, "alice", digest[:5], []*Approval{byBob}, 1, t0, 0), "digest is 5 bytes")

	_, err = Approve(bob.priv, carol.cred, digest, later)
	wantErr(t, err, "credential of carol is for a different key")
	_, err = Approve(bob.priv, bob.cred, digest[:8], later)
	wantErr(t, err, "digest is 8 bytes")
	_, err = Approve(bob.priv, bob.cred, digest, time.Time{})
	wantErr(t, err, "no expiry")
}

// TestJSON checks that every signed object survives the trip through the
// untrusted server as JSON and still verifies.
func TestJSON(t *testing.T) {
	f := newFixture(t)
	alice, bob := f.admin("alice"), f.admin("bob")
	rl := f.revoke(2)
	sr, err := SignRequest(alice.priv, alice.cred, RequestBody{Host: "h", VM: "v", Op: "delete", Args: map[string]string{"a": "b"}, Time: t0})
	if err != nil {
		t.Fatal(err)
	}
	ap, err := Approve(bob.priv, bob.cred, sr.Digest(), t0.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	trip := func(in, out any) {
		t.Helper()
		b, err := json.Marshal(in)
		if err != nil {
			t.Fatal(err)
		}
		if err := proto.DecodeStrict(b, out); err != nil {
			t.Fatalf("%s: %v", b, err)
		}
	}
	var cred Credential
	trip(alice.cred, &cred)
	if _, err := VerifyCredential(f.caPub, &cred, t0); err != nil {
		t.Fatal(err)
	}
	var rl2 RevocationList
	trip(rl, &rl2)
	if err := f.rs.Update(&rl2); err != nil {
		t.Fatal(err)
	}
	var sr2 SignedRequest
	trip(sr, &sr2)
	if _, _, err := VerifyRequest(f.caPub, f.rs, &sr2, t0, 0, 0); err != nil {
		t.Fatal(err)
	}
	var aps []*Approval
	trip([]*Approval{ap}, &aps)
	if err := CheckQuorum(f.caPub, f.rs, "alice", sr2.Digest(), aps, 1, t0, 0); err != nil {
		t.Fatal(err)
	}
	// The bodies are plain JSON of their documented types.
	var cb CredentialBody
	trip(json.RawMessage(cred.Body), &cb)
	var rb RevocationBody
	trip(json.RawMessage(rl2.Body), &rb)
	var ab ApprovalBody
	trip(json.RawMessage(ap.Body), &ab)
	var qb RequestBody
	trip(json.RawMessage(sr2.Body), &qb)
}

func TestFmtDuration(t *testing.T) {
	for d, want := range map[time.Duration]string{
		26 * time.Hour:                         "26h",
		90 * time.Minute:                       "1h30m",
		6 * time.Minute:                        "6m",
		10 * time.Second:                       "10s",
		2*time.Hour + 5*time.Second:            "2h0m5s",
		30*time.Minute + 1500*time.Millisecond: "30m1s",
		500 * time.Millisecond:                 "500ms",
		-6 * time.Minute:                       "-6m",
	} {
		if got := fmtDuration(d); got != want {
			t.Errorf("fmtDuration(%v) = %q, want %q", d, got, want)
		}
	}
}

// TestNoKeyOpeningImports checks that the package stays safe for the server
// to link: nothing that can open a tenant's disk key.
func TestNoKeyOpeningImports(t *testing.T) {
	out, err := exec.Command(filepath.Join(runtime.GOROOT(), "bin", "go"), "list", "-deps", "-f",
		"{{.ImportPath}}\t{{.Standard}}\t{{join .Imports \" \"}}", "github.com/vmbond/vmbond/internal/admin").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.SplitN(line, "\t", 3)
		if len(f) != 3 {
			t.Fatalf("unexpected go list line %q", line)
		}
		if strings.HasPrefix(f[0], "github.com/vmbond/vmbond/internal/bond") {
			t.Errorf("internal/admin links %s", f[0])
		}
		if f[1] == "true" {
			continue
		}
		for _, imp := range strings.Fields(f[2]) {
			if imp == "crypto/hpke" || imp == "crypto/hkdf" || strings.HasPrefix(imp, "github.com/vmbond/vmbond/internal/bond") {
				t.Errorf("%s (linked by internal/admin) imports %s", f[0], imp)
			}
		}
	}
}
