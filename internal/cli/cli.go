// Package cli owns the vmbond command line: one cobra tree for the three roles
// (agent, server, client verbs) and the security officer's CA verbs. It only
// parses flags, calls the role packages and prints results.
package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/vmbond/vmbond/internal/client"
)

// Exit codes.
const (
	exitOK          = 0
	exitError       = 1
	exitUsage       = 2
	exitRedirection = 3
)

type app struct {
	stdout, stderr io.Writer
	home           string
	output         string
}

// Main runs the command line and returns the process exit code.
func Main(args []string) int {
	return run(context.Background(), args, os.Stdout, os.Stderr)
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	a := &app{stdout: stdout, stderr: stderr}
	root := a.rootCmd()
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	err := root.ExecuteContext(ctx)
	if err == nil {
		return exitOK
	}
	var re *client.RedirectionError
	if errors.As(err, &re) {
		fmt.Fprintln(stderr, "error:", err)
		fmt.Fprintln(stderr, "vmbond stopped: the management server sent this request somewhere other than your VM. Nothing was run on another VM. Report this to your security officer.")
		return exitRedirection
	}
	var ue usageError
	if errors.As(err, &ue) || strings.HasPrefix(err.Error(), "unknown command") {
		fmt.Fprintln(stderr, "error:", err)
		return exitUsage
	}
	fmt.Fprintln(stderr, "error:", err)
	return exitError
}

type usageError struct{ error }

func (a *app) rootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:   "vmbond",
		Short: "Virtual machines the operator cannot take from you",
		Long: `vmbond binds tenants to their virtual machines on KVM/QEMU hosts whose
management plane they do not trust.

Roles (one binary):
  vmbond agent    the trusted host agent (runs as root on every host)
  vmbond server   the management server (untrusted: relays and stores only)
  vmbond vm ...   the tenant's verbs, run on the tenant's own machine
  vmbond ca ...   the security officer's offline CA

Quick start: see README.md, or run "make demo".`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().StringVar(&a.home, "home", client.DefaultDir(), "client keystore and configuration directory ($VMBOND_HOME)")
	root.PersistentFlags().StringVarP(&a.output, "output", "o", "text", "output format: text or json")
	root.PersistentPreRunE = func(*cobra.Command, []string) error {
		if a.output != "text" && a.output != "json" {
			return usageError{fmt.Errorf("unknown output format %q (text or json)", a.output)}
		}
		return nil
	}
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error { return usageError{err} })
	root.AddCommand(a.agentCmd(), a.serverCmd(), a.caCmd(), a.loginCmd(), a.tenantCmd(), a.hostCmd(),
		a.vmCmd(), a.adminCmd(), a.keyCmd(), a.diskCmd(), a.auditCmd())
	return root
}

// print writes v as JSON with -o json, else calls text.
func (a *app) print(v any, text func(w io.Writer)) error {
	switch a.output {
	case "json":
		enc := json.NewEncoder(a.stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	case "text", "":
		text(a.stdout)
		return nil
	}
	return usageError{fmt.Errorf("unknown output format %q (text or json)", a.output)}
}

func (a *app) client() (*client.Client, error) { return client.New(a.home) }

func (a *app) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(a.stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

func exactArgs(n int, names string) cobra.PositionalArgs {
	return func(c *cobra.Command, args []string) error {
		if len(args) != n {
			return usageError{fmt.Errorf("%s takes %s (see --help)", c.CommandPath(), names)}
		}
		return nil
	}
}
