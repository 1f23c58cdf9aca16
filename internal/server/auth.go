package server

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strings"

	"github.com/vmbond/vmbond/internal/fsutil"
	"github.com/vmbond/vmbond/internal/proto"
)

// Bearer tokens separate the tenants' inventories on this server. They are
// not the security guarantee: the agents and the tenants' keys are.

// adminIdentity is the identity of the admin token in the logs. It says
// nothing to the agents: admin operations carry the admin's own signature
// (admin.Envelope), which the server relays unchanged.
const adminIdentity = "admin"

type role int

const (
	roleNone   role = iota // no token needed
	roleAny                // admin or tenant
	roleAdmin              // admin only
	roleTenant             // tenant only
)

func (r role) String() string {
	switch r {
	case roleAny:
		return "any authenticated caller"
	case roleAdmin:
		return "the admin"
	case roleTenant:
		return "a tenant"
	}
	return "anyone"
}

// caller is who made a request.
type caller struct {
	admin  bool
	tenant string // tenant name, "" for the admin or anonymous
}

func (c caller) String() string {
	switch {
	case c.admin:
		return adminIdentity
	case c.tenant != "":
		return "tenant:" + c.tenant
	}
	return "anonymous"
}

// newToken returns 32 random bytes in hex.
func newToken() (string, error) {
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("generate token: %w", err)
	}
	return hex.EncodeToString(b[:]), nil
}

func hashToken(tok string) string {
	h := sha256.Sum256([]byte(tok))
	return hex.EncodeToString(h[:])
}

// loadAdminToken returns the admin token hash from the database. On first
// start it makes the token, writes it to DataDir/admin.token and stores its
// hash. If a previous first start crashed after writing the file, the file's
// token is adopted.
func (s *Server) loadAdminToken() (string, error) {
	h, err := s.store.adminTokenHash()
	if err != nil {
		return "", fmt.Errorf("read admin token hash: %w", err)
	}
	if h != "" {
		return h, nil
	}
	path := filepath.Join(s.cfg.DataDir, "admin.token")
	tok := ""
	raw, err := os.ReadFile(path)
	switch {
	case err == nil:
		tok = strings.TrimSpace(string(raw))
		if tok == "" {
			return "", fmt.Errorf("admin token file %s is empty; remove it to make a new token", path)
		}
		s.log.Warn("adopting existing admin token file", "path", path)
	case errors.Is(err, fs.ErrNotExist):
		if tok, err = newToken(); err != nil {
			return "", err
		}
		if err := fsutil.WriteFileAtomic(path, []byte(tok+"\n"), 0o600); err != nil {
			return "", fmt.Errorf("write admin token: %w", err)
		}
		s.log.Info("generated the admin token", "path", path)
	default:
		return "", fmt.Errorf("read admin token file: %w", err)
	}
	h = hashToken(tok)
	if err := s.store.setAdminTokenHash(h); err != nil {
		return "", fmt.Errorf("store admin token hash: %w", err)
	}
	return h, nil
}

// authenticate maps the request's bearer token to a caller.
func (s *Server) authenticate(r *http.Request) (caller, *apiError) {
	auth := r.Header.Get("Authorization")
	if auth == "" {
		return caller{}, errorf(http.StatusUnauthorized, proto.CodeUnauthorized, "missing Authorization: Bearer <token> header")
	}
	scheme, tok, ok := strings.Cut(auth, " ")
	tok = strings.TrimSpace(tok)
	if !ok || !strings.EqualFold(scheme, "Bearer") || tok == "" {
		return caller{}, errorf(http.StatusUnauthorized, proto.CodeUnauthorized, "malformed Authorization header: want Bearer <token>")
	}
	h := hashToken(tok)
	if subtle.ConstantTimeCompare([]byte(h), []byte(s.adminHash)) == 1 {
		return caller{admin: true}, nil
	}
	name, err := s.store.tenantByToken(h)
	if err != nil {
		return caller{}, internalError("look up token", err)
	}
	if name == "" {
		return caller{}, errorf(http.StatusUnauthorized, proto.CodeUnauthorized, "unknown token")
	}
	return caller{tenant: name}, nil
}

// authorize checks the caller against the role a route needs.
func authorize(c caller, need role) *apiError {
	switch need {
	case roleAdmin:
		if !c.admin {
			return errorf(http.StatusForbidden, proto.CodeForbidden, "only the admin may do this")
		}
	case roleTenant:
		if c.tenant == "" {
			return errorf(http.StatusForbidden, proto.CodeForbidden, "only a tenant may do this (the admin token has no VMs of its own)")
		}
	}
	return nil
}
