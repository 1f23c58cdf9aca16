package cli

import (
	"crypto/ed25519"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmbond/vmbond/internal/admin"
	"github.com/vmbond/vmbond/internal/ca"
	"github.com/vmbond/vmbond/internal/client"
)

func parseArgs(kv []string) (map[string]string, error) {
	if len(kv) == 0 {
		return nil, nil
	}
	out := map[string]string{}
	for _, s := range kv {
		k, v, ok := strings.Cut(s, "=")
		if !ok || k == "" {
			return nil, usageError{fmt.Errorf("bad --arg %q (want key=value)", s)}
		}
		out[k] = v
	}
	return out, nil
}

func (a *app) adminCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "admin",
		Short: "Operate tenants' VMs and hosts as an admin, within what agents allow",
		Long: `Admin verbs. Every request is signed with your admin key and carries the
credential the security officer issued; the agents check it themselves
(expiry, revocation), run only what each tenant's policy allows, limit
deletions per admin and per host, and require approvals by other admins for
critical operations and for deletions past the budget.`,
	}
	keygen := &cobra.Command{
		Use:   "keygen DIR",
		Short: "Make your admin key pair (admin.key, admin.pub) in DIR",
		Args:  exactArgs(1, "a directory"),
		RunE: func(c *cobra.Command, args []string) error {
			pub, err := admin.GenerateKey(args[0])
			if err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "give %s to the security officer (vmbond ca sign-admin)\n", pub)
			return nil
		},
	}
	var host string
	var kv []string
	run := &cobra.Command{
		Use:   "run OPERATION [VM-ID]",
		Short: "Run an operation on a VM (as its tenant's policy allows) or, with --host, on a host",
		Args: func(c *cobra.Command, args []string) error {
			if len(args) < 1 || len(args) > 2 || (len(args) == 1) == (host == "") {
				return usageError{fmt.Errorf("give OPERATION and a VM-ID, or OPERATION with --host")}
			}
			return nil
		},
		RunE: func(c *cobra.Command, args []string) error {
			cl, err := a.client()
			if err != nil {
				return err
			}
			if len(args) == 2 {
				r, err := cl.Admin(c.Context(), args[1], args[0])
				if err != nil {
					return err
				}
				return a.print(r, func(w io.Writer) { fmt.Fprintf(w, "%s on %s: %s %s\n", r.Op, r.VM, r.State, r.Note) })
			}
			return usageError{fmt.Errorf("host operations are critical: file them with `vmbond admin request %s --host %s` for approval", args[0], host)}
		},
	}
	run.Flags().StringVar(&host, "host", "", "a host-wide operation's host")

	request := &cobra.Command{
		Use:   "request OPERATION [VM-ID]",
		Short: "File a request that other admins must approve (quorum)",
		Long: `File a signed request for approval by other admins: needed for critical
operations (set-retention --arg hours=N, set-budget --arg per_admin=N --arg
per_host=N, with --host) and for deletions past the budget. Then others run
"vmbond admin approve ID" and you run "vmbond admin execute ID".`,
		Args: func(c *cobra.Command, args []string) error {
			if len(args) < 1 || len(args) > 2 || (len(args) == 1) == (host == "") {
				return usageError{fmt.Errorf("give OPERATION and a VM-ID, or OPERATION with --host")}
			}
			return nil
		},
		RunE: func(c *cobra.Command, args []string) error {
			m, err := parseArgs(kv)
			if err != nil {
				return err
			}
			cl, err := a.client()
			if err != nil {
				return err
			}
			t := client.AdminTarget{Host: host}
			if len(args) == 2 {
				t.VM = args[1]
			}
			r, err := cl.RequestQuorum(c.Context(), t, args[0], m)
			if err != nil {
				return err
			}
			return a.print(r, func(w io.Writer) {
				fmt.Fprintf(w, "request %s filed; ask other admins to run: vmbond admin approve %s\n", r.ID, r.ID)
			})
		},
	}
	request.Flags().StringVar(&host, "host", "", "a host-wide operation's host")
	request.Flags().StringArrayVar(&kv, "arg", nil, "operation argument key=value (repeatable)")

	var validFor time.Duration
	approve := &cobra.Command{
		Use:   "approve REQUEST-ID",
		Short: "Approve another admin's request (your own does not count)",
		Args:  exactArgs(1, "a request ID"),
		RunE: func(c *cobra.Command, args []string) error {
			cl, err := a.client()
			if err != nil {
				return err
			}
			body, err := cl.ApproveRequest(c.Context(), args[0], validFor)
			if err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "you approved %s's request: %s on VM %q, host %s (approval valid %s)\n", body.Admin, body.Op, body.VM, body.Host, validFor)
			return nil
		},
	}
	approve.Flags().DurationVar(&validFor, "valid-for", time.Hour, "how long the approval stays valid")
	list := &cobra.Command{
		Use:   "list",
		Short: "List requests awaiting approval",
		Args:  exactArgs(0, "no arguments"),
		RunE: func(c *cobra.Command, _ []string) error {
			cl, err := a.client()
			if err != nil {
				return err
			}
			rs, err := cl.Requests(c.Context())
			if err != nil {
				return err
			}
			return a.print(rs, func(w io.Writer) {
				tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "ID\tREQUESTER\tOP\tVM\tHOST\tAPPROVALS\tEXECUTED")
				for _, r := range rs {
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%v\n", r.ID, r.Requester, r.Op, r.VM, r.Host, len(r.Envelope.Approvals), r.Executed)
				}
				tw.Flush()
			})
		},
	}
	execute := &cobra.Command{
		Use:   "execute REQUEST-ID",
		Short: "Deliver an approved request to its agent",
		Args:  exactArgs(1, "a request ID"),
		RunE: func(c *cobra.Command, args []string) error {
			cl, err := a.client()
			if err != nil {
				return err
			}
			r, err := cl.ExecuteRequest(c.Context(), args[0])
			if err != nil {
				return err
			}
			return a.print(r, func(w io.Writer) { fmt.Fprintf(w, "%s on %s%s: %s %s\n", r.Op, r.Host, "/"+r.VM, r.State, r.Note) })
		},
	}
	push := &cobra.Command{
		Use:   "push-revocations LIST",
		Short: "Deliver a revocation list (from vmbond ca revoke) to every agent",
		Args:  exactArgs(1, "the revocation list file"),
		RunE: func(c *cobra.Command, args []string) error {
			b, err := os.ReadFile(args[0])
			if err != nil {
				return err
			}
			var list admin.RevocationList
			if err := json.Unmarshal(b, &list); err != nil {
				return fmt.Errorf("read %s: %w", args[0], err)
			}
			cl, err := a.client()
			if err != nil {
				return err
			}
			out, err := cl.PushRevocations(c.Context(), &list)
			if err != nil {
				return err
			}
			fmt.Fprintln(a.stdout, string(out))
			return nil
		},
	}
	cmd.AddCommand(keygen, run, request, approve, list, execute, push)
	return cmd
}

// caAdminCmds are the security officer's admin-CA verbs.
func (a *app) caAdminCmds(dir *string) []*cobra.Command {
	var name, keyFile, out string
	var roles []string
	var validity, maxValidity time.Duration
	sign := &cobra.Command{
		Use:   "sign-admin --name NAME --key ADMIN.pub",
		Short: "Issue an admin credential (short-lived: default 24h)",
		Args:  exactArgs(0, "flags only"),
		RunE: func(c *cobra.Command, _ []string) error {
			if name == "" || keyFile == "" || out == "" {
				return usageError{fmt.Errorf("sign-admin needs --name, --key and --out")}
			}
			b, err := os.ReadFile(keyFile)
			if err != nil {
				return err
			}
			pub, err := ca.ParsePublicKey(b)
			if err != nil {
				return fmt.Errorf("read %s: %w", keyFile, err)
			}
			cred, err := admin.SignCredential(*dir, name, roles, ed25519.PublicKey(pub), validity, maxValidity, time.Now())
			if err != nil {
				return err
			}
			cb, _ := jsonMarshal(cred)
			if err := os.WriteFile(out, cb, 0o644); err != nil {
				return err
			}
			var body admin.CredentialBody
			json.Unmarshal(cred.Body, &body)
			fmt.Fprintf(a.stdout, "credential for %s (serial %s) valid until %s written to %s\n", name, body.Serial, body.NotAfter.Format(time.RFC3339), out)
			return nil
		},
	}
	sign.Flags().StringVar(&name, "name", "", "the admin's name")
	sign.Flags().StringVar(&keyFile, "key", "", "the admin's admin.pub")
	sign.Flags().StringVar(&out, "out", "", "credential file to write")
	sign.Flags().StringSliceVar(&roles, "role", []string{"operator"}, "roles")
	sign.Flags().DurationVar(&validity, "validity", 24*time.Hour, "lifetime")
	sign.Flags().DurationVar(&maxValidity, "max-validity", 7*24*time.Hour, "refuse lifetimes above this")

	var serials []string
	var number uint64
	revoke := &cobra.Command{
		Use:   "revoke --number N [--serial S ...] --out LIST",
		Short: "Sign a revocation list (agents refuse admin operations without a fresh one)",
		Long: `Sign the list of revoked admin credential serials. Number each list higher
than the last: agents refuse older lists. Agents refuse every admin operation
when their newest list is older than 24 hours (configurable), so re-sign a
list at least daily, even if nothing changed, and deliver it with
"vmbond admin push-revocations".`,
		Args: exactArgs(0, "flags only"),
		RunE: func(c *cobra.Command, _ []string) error {
			if number == 0 || out == "" {
				return usageError{fmt.Errorf("revoke needs --number (higher than the last list's) and --out")}
			}
			list, err := admin.SignRevocations(*dir, serials, time.Now(), number)
			if err != nil {
				return err
			}
			b, _ := jsonMarshal(list)
			if err := os.WriteFile(out, b, 0o644); err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "revocation list #%d (%d serials) written to %s\n", number, len(serials), out)
			return nil
		},
	}
	revoke.Flags().StringSliceVar(&serials, "serial", nil, "revoked credential serials")
	revoke.Flags().Uint64Var(&number, "number", 0, "list number, higher than the previous list's")
	revoke.Flags().StringVar(&out, "out", "", "list file to write")
	return []*cobra.Command{sign, revoke}
}

// installAdminCA copies the admin CA public key into an agent's data dir.
func installAdminCA(dataDir, pubFile string) error {
	b, err := os.ReadFile(pubFile)
	if err != nil {
		return err
	}
	if _, err := ca.ParsePublicKey(b); err != nil {
		return fmt.Errorf("read %s: %w", pubFile, err)
	}
	return os.WriteFile(filepath.Join(dataDir, "admin-ca.pub"), b, 0o644)
}
