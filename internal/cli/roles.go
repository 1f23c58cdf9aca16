package cli

import (
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmbond/vmbond/internal/admin"
	"github.com/vmbond/vmbond/internal/agent"
	"github.com/vmbond/vmbond/internal/ca"
	"github.com/vmbond/vmbond/internal/proto"
	"github.com/vmbond/vmbond/internal/server"
)

func (a *app) agentCmd() *cobra.Command {
	var dataDir, listen, qemu string
	var cfg agent.Config
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run the trusted host agent",
		Long: `Run the trusted host agent: it holds this host's identity, opens the disk
keys tenants sealed to it (in memory only), serves each VM's disk to QEMU
through its encrypting NBD server and drives QEMU with fixed command automata.

First time on a host:
  vmbond agent init --data /var/lib/vmbond-agent --host-id host1
  (security officer) vmbond ca sign-host --ca DIR /var/lib/vmbond-agent/identity.json --out host.cert
  vmbond agent install-cert --data /var/lib/vmbond-agent host.cert
  vmbond agent --data /var/lib/vmbond-agent --listen 127.0.0.1:7001`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(c *cobra.Command, _ []string) error {
			cfg.DataDir, cfg.QEMU, cfg.Logger = dataDir, qemu, a.logger()
			ag, err := agent.New(cfg)
			if err != nil {
				return err
			}
			defer ag.Close()
			l, err := net.Listen("tcp", listen)
			if err != nil {
				return fmt.Errorf("listen on %s: %w", listen, err)
			}
			fmt.Fprintf(a.stderr, "vmbond agent %s listening on %s (audit log %s)\n", ag.HostID(), l.Addr(), ag.AuditPath())
			return ag.Serve(c.Context(), l)
		},
	}
	cmd.PersistentFlags().StringVar(&dataDir, "data", "/var/lib/vmbond-agent", "agent data directory")
	cmd.Flags().StringVar(&listen, "listen", "127.0.0.1:7001", "address of the agent API")
	cmd.Flags().StringVar(&qemu, "qemu", "qemu-system-x86_64", "QEMU binary")
	cmd.Flags().DurationVar(&cfg.Retention, "retention", agent.DefaultRetention, "how long deleted VMs stay restorable (initial value; later changes need a quorum)")
	cmd.Flags().IntVar(&cfg.BudgetPerAdmin, "budget-per-admin", agent.DefaultBudgetPerAdmin, "deletions one admin may make per window on this host without a quorum")
	cmd.Flags().IntVar(&cfg.BudgetPerHost, "budget-per-host", agent.DefaultBudgetPerHost, "deletions all admins together may make per window on this host without a quorum")
	cmd.Flags().DurationVar(&cfg.BudgetWindow, "budget-window", agent.DefaultBudgetWindow, "the budgets' window")
	cmd.Flags().IntVar(&cfg.Quorum, "quorum", agent.DefaultQuorum, "approvals by other admins a critical operation needs")
	cmd.Flags().DurationVar(&cfg.RevocationMaxAge, "revocation-max-age", 24*time.Hour, "refuse every admin operation when the newest revocation list is older")

	var hostID string
	initCmd := &cobra.Command{
		Use:   "init",
		Short: "Create this host's identity keys (once)",
		Args:  exactArgs(0, "no arguments"),
		RunE: func(c *cobra.Command, _ []string) error {
			id, err := agent.InitIdentity(dataDir, hostID)
			if err != nil {
				return err
			}
			return a.print(id, func(w io.Writer) {
				fmt.Fprintf(w, "host %s identity in %s\nhave the security officer certify it: vmbond ca sign-host --ca DIR %s --out host.cert\n",
					id.HostID, dataDir, filepath.Join(dataDir, agent.IdentityFile))
			})
		},
	}
	initCmd.Flags().StringVar(&hostID, "host-id", "", "this host's identifier (required)")
	initCmd.MarkFlagRequired("host-id")

	install := &cobra.Command{
		Use:   "install-cert CERT",
		Short: "Install the host certificate signed by the host CA",
		Args:  exactArgs(1, "the certificate file"),
		RunE: func(c *cobra.Command, args []string) error {
			b, err := os.ReadFile(args[0])
			if err != nil {
				return err
			}
			if err := agent.InstallCert(dataDir, b); err != nil {
				return err
			}
			fmt.Fprintln(a.stdout, "host certificate installed")
			return nil
		},
	}
	installAdmin := &cobra.Command{
		Use:   "install-admin-ca ADMIN-CA.pub",
		Short: "Trust the security officer's admin CA (without it, admin operations are refused)",
		Args:  exactArgs(1, "the admin CA public key"),
		RunE: func(c *cobra.Command, args []string) error {
			if err := installAdminCA(dataDir, args[0]); err != nil {
				return err
			}
			fmt.Fprintln(a.stdout, "admin CA installed; restart the agent")
			return nil
		},
	}
	cmd.AddCommand(initCmd, install, installAdmin)
	return cmd
}

func (a *app) serverCmd() *cobra.Command {
	var dataDir, listen string
	cmd := &cobra.Command{
		Use:   "server",
		Short: "Run the (untrusted) management server",
		Long: `Run the management server: inventory, placement and relaying between
tenants and agents. It is untrusted by design: it never holds a disk key and
cannot forge or open what tenants and agents exchange.

On first start it writes an admin token to DATA/admin.token (mode 0600).`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(c *cobra.Command, _ []string) error {
			fmt.Fprintf(a.stderr, "vmbond server listening on %s (data %s)\n", listen, dataDir)
			return server.Run(c.Context(), server.Config{DataDir: dataDir, Logger: a.logger()}, listen)
		},
	}
	cmd.Flags().StringVar(&dataDir, "data", "/var/lib/vmbond-server", "server data directory")
	cmd.Flags().StringVar(&listen, "listen", "127.0.0.1:7000", "address of the server API")
	return cmd
}

func (a *app) caCmd() *cobra.Command {
	var dir string
	cmd := &cobra.Command{
		Use:   "ca",
		Short: "The security officer's offline certificate authority",
	}
	cmd.PersistentFlags().StringVar(&dir, "ca", "vmbond-ca", "CA directory (keep it offline)")
	initCmd := &cobra.Command{
		Use:   "init",
		Short: "Create the host CA",
		Args:  exactArgs(0, "no arguments"),
		RunE: func(c *cobra.Command, _ []string) error {
			if err := ca.Init(dir); err != nil {
				return err
			}
			if err := admin.InitCA(dir); err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "host CA and admin CA created in %s\ngive tenants %s to pin (vmbond login --host-ca)\ninstall %s on every agent (vmbond agent install-admin-ca)\n",
				dir, filepath.Join(dir, ca.HostPubFile), filepath.Join(dir, admin.CAPubFile))
			return nil
		},
	}
	var out string
	var contexts []string
	var validity time.Duration
	sign := &cobra.Command{
		Use:   "sign-host IDENTITY.json",
		Short: "Certify an agent's identity keys",
		Args:  exactArgs(1, "the agent's identity.json"),
		RunE: func(c *cobra.Command, args []string) error {
			b, err := os.ReadFile(args[0])
			if err != nil {
				return err
			}
			var id proto.HostIdentity
			if err := proto.DecodeStrict(b, &id); err != nil {
				return fmt.Errorf("read %s: %w", args[0], err)
			}
			cert, err := ca.SignHost(dir, id, contexts, validity, time.Now())
			if err != nil {
				return err
			}
			cb, _ := jsonMarshal(cert)
			if out == "" || out == "-" {
				_, err = a.stdout.Write(cb)
				return err
			}
			if err := os.WriteFile(out, cb, 0o644); err != nil {
				return err
			}
			fmt.Fprintf(a.stderr, "certified host %s (contexts: %s) until %s\n", id.HostID, strings.Join(contexts, ","), time.Now().Add(validity).Format(time.RFC3339))
			return nil
		},
	}
	sign.Flags().StringVar(&out, "out", "", "certificate file (default stdout)")
	sign.Flags().StringSliceVar(&contexts, "context", nil, "security contexts of the host (e.g. production,database)")
	sign.Flags().DurationVar(&validity, "validity", ca.DefaultHostValidity, "certificate lifetime")
	cmd.AddCommand(initCmd, sign)
	cmd.AddCommand(a.caAdminCmds(&dir)...)
	return cmd
}
