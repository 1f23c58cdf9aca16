package cli

import (
	"errors"
	"fmt"
	"io"

	"github.com/spf13/cobra"
)

func (a *app) auditCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "audit",
		Short: "Check the agents' tamper-evident decision logs",
	}
	cmd.AddCommand(&cobra.Command{
		Use:   "verify",
		Short: "Collect every host's log through the server and verify each chain",
		Long: `Have the server collect every agent's decision log, then check each one
here: the hash chain from the first entry, and the head the agent signed with
the host key its CA certificate vouches for. Any altered, dropped, reordered
or forged entry is named. Exit status 1 if any log fails.`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(c *cobra.Command, _ []string) error {
			cl, err := a.client()
			if err != nil {
				return err
			}
			res, err := cl.VerifyAudit(c.Context())
			if err != nil {
				return err
			}
			bad := 0
			for _, h := range res {
				if !h.OK {
					bad++
				}
			}
			perr := a.print(res, func(w io.Writer) {
				for _, h := range res {
					switch {
					case h.OK:
						fmt.Fprintf(w, "%s: ok, %d entries, chain intact, signed through entry %d\n", h.Host, h.Report.Entries, h.Report.Signed)
					default:
						fmt.Fprintf(w, "%s: FAILED: %s\n", h.Host, h.Error)
					}
				}
			})
			if perr != nil {
				return perr
			}
			if bad > 0 {
				return fmt.Errorf("%d of %d host logs failed verification", bad, len(res))
			}
			if len(res) == 0 {
				return errors.New("the server collected no logs")
			}
			return nil
		},
	})
	return cmd
}

func (a *app) vmAuditCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "audit NAME",
		Short: "Show and verify every decision the VM's host made about it",
		Args:  exactArgs(1, "the VM name or ID"),
		RunE: func(c *cobra.Command, args []string) error {
			cl, err := a.client()
			if err != nil {
				return err
			}
			evs, rep, err := cl.VMAudit(c.Context(), args[0])
			if err != nil {
				return err
			}
			return a.print(evs, func(w io.Writer) {
				for _, e := range evs {
					fmt.Fprintf(w, "%s  %-8s %-14s %-9s %s\n", e.Time.Format("2006-01-02T15:04:05Z"), e.Decision, e.Op, e.Actor, e.Reason)
				}
				fmt.Fprintf(w, "verified: %d entries in the host's chain (%d of others, redacted), signed through entry %d\n", rep.Entries, rep.Redacted, rep.Signed)
			})
		},
	}
}
