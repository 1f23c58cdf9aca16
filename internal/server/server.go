// Package server is vmbond's UNTRUSTED management server.
//
// It keeps the inventory of tenants, hosts and VMs, chooses hosts, stores the
// tenants' disk images and relays requests to the host agents. Assume its
// operators, database and code may be hostile: it only ever stores and relays
// public data, ciphertext (disk images) and MACed, signed or sealed messages
// that it can neither forge nor open. The security of a VM rests on the agent
// and the tenant's client, which detect anything the server changes.
//
// The trust boundary is enforced by TestTrustBoundary: this package links no
// code that can open a disk key or decrypt a sector.
package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"
)

// Defaults of Config.
const (
	DefaultAgentTimeout = 3 * time.Minute
	DefaultMaxImageSize = 64 << 30 // 64 GiB
	// MaxBootFileSize bounds an uploaded kernel or initrd.
	MaxBootFileSize = 256 << 20
	// DefaultAdminDeleteBudget and DefaultAdminDeleteWindow: how many VMs
	// one admin may delete through the server, platform-wide, per window
	// before the server asks for a quorum request instead.
	DefaultAdminDeleteBudget = 10
	DefaultAdminDeleteWindow = time.Hour
)

// Config configures a Server.
type Config struct {
	// DataDir holds server.db, admin.token, images/, boot/ and audit/ (the
	// last audit log collected from each host). Created 0700.
	DataDir string
	// Logger receives every request decision; slog.Default() if nil.
	Logger *slog.Logger
	// AgentTimeout bounds each request to an agent (for streamed uploads: the
	// longest stall). DefaultAgentTimeout if zero.
	AgentTimeout time.Duration
	// MaxImageSize bounds an uploaded disk image. DefaultMaxImageSize if zero.
	MaxImageSize int64
	// AdminDeleteBudget is how many VMs one admin (by the name in the signed
	// request) may delete through the server within AdminDeleteWindow
	// before further deletes without approvals are refused with 429. It is
	// an early refusal only: the agents' own budgets are the guarantee.
	// DefaultAdminDeleteBudget if zero; a negative value disables it.
	AdminDeleteBudget int
	// AdminDeleteWindow is the sliding window of AdminDeleteBudget.
	// DefaultAdminDeleteWindow if zero; a negative value disables the budget.
	AdminDeleteWindow time.Duration
	// Now is the clock of the delete budget and of stored records;
	// time.Now if nil.
	Now func() time.Time
}

// Server is the management server. Create it with New.
type Server struct {
	cfg       Config
	log       *slog.Logger
	store     *store
	agents    *agentClient
	adminHash string // hex SHA-256 of the admin token
	handler   http.Handler
	budget    deleteBudget
}

// New opens (or creates) the server's data directory and database. On first
// start it generates the admin token, writes it to DataDir/admin.token (0600)
// and logs where it is; the database keeps only its SHA-256.
func New(cfg Config) (*Server, error) {
	if cfg.DataDir == "" {
		return nil, errors.New("server: no data directory configured")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.AgentTimeout <= 0 {
		cfg.AgentTimeout = DefaultAgentTimeout
	}
	if cfg.MaxImageSize <= 0 {
		cfg.MaxImageSize = DefaultMaxImageSize
	}
	if cfg.AdminDeleteBudget == 0 {
		cfg.AdminDeleteBudget = DefaultAdminDeleteBudget
	}
	if cfg.AdminDeleteWindow == 0 {
		cfg.AdminDeleteWindow = DefaultAdminDeleteWindow
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	for _, d := range []string{cfg.DataDir, filepath.Join(cfg.DataDir, "images"), filepath.Join(cfg.DataDir, "boot"), filepath.Join(cfg.DataDir, "audit")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("server: create data directory: %w", err)
		}
	}
	if err := os.Chmod(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("server: restrict data directory: %w", err)
	}
	st, err := openStore(filepath.Join(cfg.DataDir, "server.db"))
	if err != nil {
		return nil, fmt.Errorf("server: %w", err)
	}
	s := &Server{
		cfg:    cfg,
		log:    cfg.Logger,
		store:  st,
		agents: newAgentClient(cfg.AgentTimeout),
		budget: deleteBudget{pending: map[string]int{}},
	}
	if s.adminHash, err = s.loadAdminToken(); err != nil {
		st.close()
		return nil, fmt.Errorf("server: %w", err)
	}
	s.handler = s.routes()
	return s, nil
}

// Handler returns the server's HTTP API.
func (s *Server) Handler() http.Handler { return s.handler }

// Close closes the database and idle agent connections.
func (s *Server) Close() error {
	s.agents.close()
	if err := s.store.close(); err != nil {
		return fmt.Errorf("server: close database: %w", err)
	}
	return nil
}

// Run serves the API on addr until ctx is done, then shuts down gracefully
// (waiting up to 30 seconds for requests in flight).
func Run(ctx context.Context, cfg Config, addr string) error {
	s, err := New(cfg)
	if err != nil {
		return err
	}
	defer s.Close()
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("server: listen on %s: %w", addr, err)
	}
	hs := &http.Server{
		Handler:           s.Handler(),
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}
	s.log.Info("management server listening", "addr", ln.Addr().String(), "data_dir", cfg.DataDir)
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("server: serve on %s: %w", addr, err)
	case <-ctx.Done():
	}
	s.log.Info("management server shutting down")
	shutCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	if err := hs.Shutdown(shutCtx); err != nil {
		hs.Close()
		return fmt.Errorf("server: shutdown: %w", err)
	}
	if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("server: serve on %s: %w", addr, err)
	}
	return nil
}
