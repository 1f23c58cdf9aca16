package admin

import (
	"crypto/ed25519"
	"fmt"
	"regexp"
	"time"
)

// Ed25519ctx context strings, one per kind of signed object.
const (
	ctxCredential  = "vmbond/v1 admin credential"
	ctxRevocations = "vmbond/v1 admin revocation list"
	ctxRequest     = "vmbond/v1 admin request"
	ctxApproval    = "vmbond/v1 admin approval"
)

// sign signs msg with priv under the Ed25519ctx context ctx.
func sign(priv ed25519.PrivateKey, ctx string, msg []byte) ([]byte, error) {
	if len(priv) != ed25519.PrivateKeySize {
		return nil, fmt.Errorf("private key is %d bytes, want %d", len(priv), ed25519.PrivateKeySize)
	}
	return priv.Sign(nil, msg, &ed25519.Options{Context: ctx})
}

// verify reports whether sig is pub's Ed25519ctx signature of msg under ctx.
// Unlike ed25519.Verify it never panics on a key of the wrong length.
func verify(pub ed25519.PublicKey, ctx string, msg, sig []byte) bool {
	if len(pub) != ed25519.PublicKeySize || len(sig) != ed25519.SignatureSize {
		return false
	}
	return ed25519.VerifyWithOptions(pub, msg, sig, &ed25519.Options{Context: ctx}) == nil
}

// checkCAPub refuses a pinned CA key of the wrong size before any use.
func checkCAPub(caPub ed25519.PublicKey) error {
	if len(caPub) != ed25519.PublicKeySize {
		return fmt.Errorf("admin CA public key is %d bytes, want %d", len(caPub), ed25519.PublicKeySize)
	}
	return nil
}

var serialPattern = regexp.MustCompile(`^[0-9a-f]{32}$`)

// validSerial checks a credential serial: 32 lower-case hex digits.
func validSerial(s string) error {
	if !serialPattern.MatchString(s) {
		return fmt.Errorf("invalid credential serial %q: want 32 lower-case hex digits", s)
	}
	return nil
}

// stamp formats a time for error messages.
func stamp(t time.Time) string { return t.UTC().Format(time.RFC3339) }

// fmtDuration prints a duration for people: "26h", "1h30m", "45s".
func fmtDuration(d time.Duration) string {
	if d < 0 {
		return "-" + fmtDuration(-d)
	}
	if d < time.Second {
		return d.String()
	}
	d = d.Truncate(time.Second)
	s := d.String() // e.g. "26h0m0s"
	for _, suffix := range []string{"0s", "0m"} {
		if len(s) > len(suffix)+1 && s[len(s)-len(suffix):] == suffix && s[len(s)-len(suffix)-1] >= 'a' {
			s = s[:len(s)-len(suffix)]
		}
	}
	return s
}
