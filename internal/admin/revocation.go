package admin

import (
	"bytes"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/vmbond/vmbond/internal/ca"
	"github.com/vmbond/vmbond/internal/proto"
)

// DefaultMaxRevocationAge is how old the newest revocation list an agent
// holds may be before it refuses admin operations.
const DefaultMaxRevocationAge = 24 * time.Hour

// RevocationBody is what the admin CA signs to withdraw credentials before
// they expire. Lists are numbered; each list is complete, not a delta, and
// replaces every list with a lower number.
type RevocationBody struct {
	Version string    `json:"version"`
	Number  uint64    `json:"number"`
	Issued  time.Time `json:"issued"`
	Serials []string  `json:"serials"` // revoked credential serials, sorted
}

// RevocationList is a signed revocation list: the exact body bytes and the
// admin CA's signature over them.
type RevocationList struct {
	Body []byte `json:"body"` // JSON of RevocationBody
	Sig  []byte `json:"sig"`
}

// SignRevocations issues revocation list number, revoking serials, with the
// admin CA key in caDir. Numbers start at 1 and must grow with every list.
func SignRevocations(caDir string, serials []string, issued time.Time, number uint64) (*RevocationList, error) {
	if number == 0 {
		return nil, errors.New("sign revocation list: numbers start at 1")
	}
	if issued.IsZero() {
		return nil, fmt.Errorf("sign revocation list #%d: no issue time", number)
	}
	sorted := slices.Clone(serials)
	slices.Sort(sorted)
	sorted = slices.Compact(sorted)
	if sorted == nil {
		sorted = []string{}
	}
	for _, s := range sorted {
		if err := validSerial(s); err != nil {
			return nil, fmt.Errorf("sign revocation list #%d: %w", number, err)
		}
	}
	priv, err := ca.LoadPrivateKey(filepath.Join(caDir, CAKeyFile))
	if err != nil {
		return nil, fmt.Errorf("sign revocation list #%d: %w", number, err)
	}
	body, err := json.Marshal(RevocationBody{
		Version: proto.Version,
		Number:  number,
		Issued:  issued.UTC(),
		Serials: sorted,
	})
	if err != nil {
		return nil, fmt.Errorf("sign revocation list #%d: %w", number, err)
	}
	sig, err := sign(priv, ctxRevocations, body)
	if err != nil {
		return nil, fmt.Errorf("sign revocation list #%d: %w", number, err)
	}
	return &RevocationList{Body: body, Sig: sig}, nil
}

// VerifyRevocations checks a revocation list against the pinned admin CA key
// and returns its body. How old the list may be is the holder's decision; see
// RevocationState.Check.
func VerifyRevocations(caPub ed25519.PublicKey, list *RevocationList) (*RevocationBody, error) {
	if err := checkCAPub(caPub); err != nil {
		return nil, err
	}
	if list == nil {
		return nil, errors.New("no revocation list")
	}
	if !verify(caPub, ctxRevocations, list.Body, list.Sig) {
		return nil, errors.New("revocation list is not signed by the pinned admin CA")
	}
	var b RevocationBody
	if err := proto.DecodeStrict(list.Body, &b); err != nil {
		return nil, fmt.Errorf("decode revocation list: %w", err)
	}
	if b.Version != proto.Version {
		return nil, fmt.Errorf("revocation list version %q, want %q", b.Version, proto.Version)
	}
	if b.Number == 0 {
		return nil, errors.New("revocation list has number 0")
	}
	if b.Issued.IsZero() {
		return nil, fmt.Errorf("revocation list #%d has no issue time", b.Number)
	}
	for _, s := range b.Serials {
		if err := validSerial(s); err != nil {
			return nil, fmt.Errorf("revocation list #%d: %w", b.Number, err)
		}
	}
	return &b, nil
}

// RevocationState is the revocation list an agent holds: the newest verified
// list it has seen. It refuses to go back to an older list, and it fails
// closed: with no list, or one older than the allowed age, every admin
// credential is refused. The agent should persist Current and feed it back
// to Update after a restart, so that a rollback is refused across restarts
// too. A RevocationState is safe for concurrent use.
type RevocationState struct {
	caPub ed25519.PublicKey

	mu      sync.RWMutex
	list    *RevocationList // newest accepted, nil if none
	body    *RevocationBody
	revoked map[string]bool
}

// NewRevocationState returns an empty state that accepts lists signed by the
// admin CA key caPub.
func NewRevocationState(caPub ed25519.PublicKey) *RevocationState {
	return &RevocationState{caPub: slices.Clone(caPub)}
}

// Update verifies list and makes it the current one if its number is higher
// than the current list's. Offering the current list again is a no-op; an
// older list, or a different list under the current number, is refused.
func (s *RevocationState) Update(list *RevocationList) error {
	b, err := VerifyRevocations(s.caPub, list)
	if err != nil {
		return fmt.Errorf("update revocation list: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.body != nil {
		switch {
		case b.Number < s.body.Number:
			return fmt.Errorf("update revocation list: refusing rollback from list #%d (issued %s) to older list #%d (issued %s)",
				s.body.Number, stamp(s.body.Issued), b.Number, stamp(b.Issued))
		case b.Number == s.body.Number:
			if bytes.Equal(list.Body, s.list.Body) {
				return nil
			}
			return fmt.Errorf("update revocation list: list #%d differs from the list #%d already held", b.Number, b.Number)
		}
	}
	revoked := make(map[string]bool, len(b.Serials))
	for _, serial := range b.Serials {
		revoked[serial] = true
	}
	s.list = &RevocationList{Body: slices.Clone(list.Body), Sig: slices.Clone(list.Sig)}
	s.body, s.revoked = b, revoked
	return nil
}

// Current returns a copy of the newest list held, or nil if none.
func (s *RevocationState) Current() *RevocationList {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.list == nil {
		return nil
	}
	return &RevocationList{Body: slices.Clone(s.list.Body), Sig: slices.Clone(s.list.Sig)}
}

// Check refuses cred if its serial is revoked, and refuses every credential
// if no list is held or the newest list is older than maxAge at now. A zero
// maxAge means DefaultMaxRevocationAge. Check does not verify cred itself;
// call it on the body VerifyCredential returned.
func (s *RevocationState) Check(cred *CredentialBody, now time.Time, maxAge time.Duration) error {
	if cred == nil {
		return errors.New("no admin credential")
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	if err := s.fresh(now, maxAge); err != nil {
		return err
	}
	if s.revoked[cred.Serial] {
		return fmt.Errorf("credential of %s (serial %s) is revoked by revocation list #%d", cred.Name, cred.Serial, s.body.Number)
	}
	return nil
}

// Fresh reports, as Check does, whether the state holds a list young enough
// to decide on admin credentials at all.
func (s *RevocationState) Fresh(now time.Time, maxAge time.Duration) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.fresh(now, maxAge)
}

func (s *RevocationState) fresh(now time.Time, maxAge time.Duration) error {
	const refused = "admin operations refused until a fresh list arrives"
	if maxAge == 0 {
		maxAge = DefaultMaxRevocationAge
	}
	if maxAge < 0 {
		return fmt.Errorf("revocation list age limit %s is negative: %s", maxAge, refused)
	}
	if s.body == nil {
		return errors.New("no revocation list held: " + refused)
	}
	age := now.Sub(s.body.Issued)
	if age > maxAge {
		return fmt.Errorf("revocation list is %s old, limit %s: %s", fmtDuration(age), fmtDuration(maxAge), refused)
	}
	if -age > maxAge {
		// A list from the far future would stay "fresh" for too long: the
		// officer's clock or this host's is wrong.
		return fmt.Errorf("revocation list #%d is issued %s, %s in the future: check the clocks; %s",
			s.body.Number, stamp(s.body.Issued), fmtDuration(-age), refused)
	}
	return nil
}
