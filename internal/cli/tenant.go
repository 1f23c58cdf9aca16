package cli

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/vmbond/vmbond/internal/client"
	"github.com/vmbond/vmbond/internal/proto"
)

func jsonMarshal(v any) ([]byte, error) {
	b, err := json.MarshalIndent(v, "", "  ")
	return append(b, '\n'), err
}

func (a *app) loginCmd() *cobra.Command {
	var cfg client.Config
	var caFile, tokenFile, adminKey, adminCred string
	cmd := &cobra.Command{
		Use:   "login",
		Short: "Save the server address, your token and the pinned host CA",
		Long: `Save the management server's address, your API token and the security
officer's host CA public key in the keystore (--home). The host CA is what the
client trusts: it refuses to seal a key to any host the CA did not certify.`,
		Args: exactArgs(0, "no arguments"),
		RunE: func(c *cobra.Command, _ []string) error {
			if tokenFile != "" {
				b, err := os.ReadFile(tokenFile)
				if err != nil {
					return err
				}
				cfg.Token = strings.TrimSpace(string(b))
			}
			if cfg.Server == "" || cfg.Token == "" {
				return usageError{fmt.Errorf("login needs --server and --token (or --token-file)")}
			}
			if caFile != "" {
				b, err := os.ReadFile(caFile)
				if err != nil {
					return err
				}
				cfg.HostCA = string(b)
			}
			if adminKey != "" || adminCred != "" {
				if err := client.AdminLogin(&cfg, adminKey, adminCred); err != nil {
					return err
				}
			}
			ks := &client.Keystore{Dir: a.home}
			if err := ks.SaveConfig(&cfg); err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "saved to %s\n", a.home)
			return nil
		},
	}
	cmd.Flags().StringVar(&cfg.Server, "server", "", "management server URL, e.g. http://127.0.0.1:7000")
	cmd.Flags().StringVar(&cfg.Token, "token", "", "API token")
	cmd.Flags().StringVar(&tokenFile, "token-file", "", "read the API token from a file")
	cmd.Flags().StringVar(&cfg.Tenant, "tenant", "", "your tenant name (tenants only)")
	cmd.Flags().StringVar(&caFile, "host-ca", "", "the host CA public key to pin (host-ca.pub)")
	cmd.Flags().StringVar(&adminKey, "admin-key", "", "admins: your admin.key (from vmbond admin keygen)")
	cmd.Flags().StringVar(&adminCred, "admin-cred", "", "admins: the credential the security officer issued (vmbond ca sign-admin)")
	return cmd
}

func (a *app) tenantCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "tenant", Short: "Manage tenant accounts (admin)"}
	cmd.AddCommand(&cobra.Command{
		Use:   "create NAME",
		Short: "Create a tenant account and print its API token",
		Args:  exactArgs(1, "the tenant name"),
		RunE: func(c *cobra.Command, args []string) error {
			cl, err := a.client()
			if err != nil {
				return err
			}
			cred, err := cl.CreateTenant(c.Context(), args[0])
			if err != nil {
				return err
			}
			return a.print(cred, func(w io.Writer) { fmt.Fprintln(w, cred.Token) })
		},
	})
	return cmd
}

func (a *app) hostCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "host", Short: "Manage hosts (admin: add; anyone: list)"}
	cmd.AddCommand(&cobra.Command{
		Use:   "add AGENT-URL",
		Short: "Enrol an agent with the server",
		Args:  exactArgs(1, "the agent's URL"),
		RunE: func(c *cobra.Command, args []string) error {
			cl, err := a.client()
			if err != nil {
				return err
			}
			h, err := cl.AddHost(c.Context(), args[0])
			if err != nil {
				return err
			}
			return a.print(h, func(w io.Writer) { fmt.Fprintf(w, "host %s at %s\n", h.ID, h.URL) })
		},
	}, &cobra.Command{
		Use:   "list",
		Short: "List hosts",
		Args:  exactArgs(0, "no arguments"),
		RunE: func(c *cobra.Command, _ []string) error {
			cl, err := a.client()
			if err != nil {
				return err
			}
			hs, err := cl.Hosts(c.Context())
			if err != nil {
				return err
			}
			return a.print(hs, func(w io.Writer) {
				tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "HOST\tURL\tVMS")
				for _, h := range hs {
					fmt.Fprintf(tw, "%s\t%s\t%d\n", h.ID, h.URL, h.VMs)
				}
				tw.Flush()
			})
		},
	})
	return cmd
}

func (a *app) vmCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "vm",
		Short: "Create and operate your VMs (tenant)",
		Long: `Create and operate your VMs. Every command is authenticated with the VM's
disk key and bound to its current descriptor; every answer is checked. If the
server sends a command anywhere but your VM, vmbond says "VM redirection
detected" and exits with status 3.`,
	}
	var o client.CreateOptions
	var size string
	create := &cobra.Command{
		Use:   "create NAME",
		Short: "Create a VM from a local image (raw or qcow2) or a blank disk",
		Long: `Create a VM. The image is encrypted on this machine (LUKS1, AES-256-XTS) and
only ciphertext is uploaded; a fresh disk key is sealed to a host the pinned
host CA certified. The key is saved in your keystore first: back it up with
"vmbond key export", since a lost key is a lost disk.`,
		Args: exactArgs(1, "the VM name"),
		RunE: func(c *cobra.Command, args []string) error {
			o.Name = args[0]
			if size != "" {
				n, err := parseSize(size)
				if err != nil {
					return usageError{err}
				}
				o.DiskSize = n
			}
			if o.Image == "" && o.DiskSize == 0 {
				return usageError{fmt.Errorf("give --image FILE or --size SIZE")}
			}
			cl, err := a.client()
			if err != nil {
				return err
			}
			vk, err := cl.Create(c.Context(), o)
			if err != nil {
				return err
			}
			return a.print(map[string]string{"id": vk.ID, "name": vk.Name, "host": vk.Host}, func(w io.Writer) {
				fmt.Fprintf(w, "created %s (%s) on host %s; key verified\n", vk.Name, vk.ID, vk.Host)
				fmt.Fprintf(w, "your disk key is only in %s: back it up now with `vmbond key export --out FILE`\n", a.home)
			})
		},
	}
	create.Flags().StringVar(&o.Image, "image", "", "local raw or qcow2 image to encrypt and upload")
	create.Flags().StringVar(&size, "size", "", "disk size (e.g. 1G); required without --image")
	create.Flags().IntVar(&o.MemoryMiB, "memory", 256, "memory in MiB")
	create.Flags().IntVar(&o.CPUs, "cpus", 1, "virtual CPUs")
	create.Flags().StringSliceVar(&o.AdminAllowed, "admin-allow", []string{proto.OpStatus},
		"operations admins may run without you ("+strings.Join(proto.Operations(), ", ")+")")
	create.Flags().StringVar(&o.Host, "host", "", "host to run on (default: the server places it)")
	create.Flags().StringVar(&o.Kernel, "kernel", "", "direct kernel boot: kernel file (pinned by SHA-256)")
	create.Flags().StringVar(&o.Initrd, "initrd", "", "direct kernel boot: initrd file (pinned by SHA-256)")
	create.Flags().StringVar(&o.Cmdline, "cmdline", "", "direct kernel boot: kernel command line")
	cmd.AddCommand(create)

	for _, op := range []struct{ name, short string }{
		{proto.OpStart, "Boot the VM"},
		{proto.OpStatus, "Show the VM's run state"},
		{proto.OpPause, "Pause the VM's CPUs"},
		{proto.OpResume, "Resume a paused VM"},
		{proto.OpStop, "Power the VM off at once"},
		{proto.OpShutdown, "Ask the guest to shut down (ACPI power button)"},
		{proto.OpReset, "Reset the VM"},
		{proto.OpConsole, "Print the VM's serial console output"},
		{proto.OpDelete, "Delete the VM: it stops and stays restorable for the host's retention period (default 7 days)"},
		{proto.OpRestore, "Restore a deleted VM within its retention period"},
	} {
		op := op
		cmd.AddCommand(&cobra.Command{
			Use:   op.name + " NAME",
			Short: op.short,
			Args:  exactArgs(1, "the VM name or ID"),
			RunE: func(c *cobra.Command, args []string) error {
				cl, err := a.client()
				if err != nil {
					return err
				}
				r, err := cl.Command(c.Context(), args[0], op.name)
				if err != nil {
					return err
				}
				return a.print(r, func(w io.Writer) {
					if op.name == proto.OpConsole {
						io.WriteString(w, r.Output)
						return
					}
					fmt.Fprintf(w, "%s: %s\n", args[0], r.State)
				})
			},
		})
	}
	var confirm string
	purge := &cobra.Command{
		Use:   "purge NAME --confirm VM-ID",
		Short: "Destroy a deleted VM's key and disk now (no undo)",
		Long: `Destroy a deleted VM's key and disk on its host now, before its retention
period ends (crypto-erase: without the key, every copy of the ciphertext is
unreadable). Give the VM's ID to --confirm. Your own keystore copy of the key
is removed too.`,
		Args: exactArgs(1, "the VM name or ID"),
		RunE: func(c *cobra.Command, args []string) error {
			cl, err := a.client()
			if err != nil {
				return err
			}
			k, err := cl.Store.Key(args[0])
			if err != nil {
				return err
			}
			if confirm != k.ID {
				return usageError{fmt.Errorf("purge destroys %s for good: repeat its ID with --confirm %s", args[0], k.ID)}
			}
			r, err := cl.Purge(c.Context(), args[0], confirm)
			if err != nil {
				return err
			}
			if err := cl.Store.RemoveKey(k.ID); err != nil {
				return err
			}
			return a.print(r, func(w io.Writer) { fmt.Fprintf(w, "%s: %s\n", args[0], r.State) })
		},
	}
	purge.Flags().StringVar(&confirm, "confirm", "", "the VM's ID, to confirm")
	cmd.AddCommand(purge, a.vmAuditCmd())
	cmd.AddCommand(&cobra.Command{
		Use:   "verify NAME",
		Short: "Make the VM's host prove it holds your key for this VM",
		Args:  exactArgs(1, "the VM name or ID"),
		RunE: func(c *cobra.Command, args []string) error {
			cl, err := a.client()
			if err != nil {
				return err
			}
			if err := cl.Verify(c.Context(), args[0]); err != nil {
				return err
			}
			k, _ := cl.Store.Key(args[0])
			return a.print(map[string]any{"vm": k.ID, "host": k.Host, "verified": true}, func(w io.Writer) {
				fmt.Fprintf(w, "%s: host %s holds your key for VM %s\n", args[0], k.Host, k.ID)
			})
		},
	}, &cobra.Command{
		Use:   "list",
		Short: "List your VMs",
		Args:  exactArgs(0, "no arguments"),
		RunE: func(c *cobra.Command, _ []string) error {
			cl, err := a.client()
			if err != nil {
				return err
			}
			vs, err := cl.List(c.Context())
			if err != nil {
				return err
			}
			return a.print(vs, func(w io.Writer) {
				tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "NAME\tID\tTENANT\tHOST\tSTATE")
				for _, v := range vs {
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", v.Name, v.ID, v.Tenant, v.Host, v.State)
				}
				tw.Flush()
			})
		},
	})
	return cmd
}

func parseSize(s string) (int64, error) {
	mult := int64(1)
	switch {
	case strings.HasSuffix(s, "G"):
		mult, s = 1<<30, strings.TrimSuffix(s, "G")
	case strings.HasSuffix(s, "M"):
		mult, s = 1<<20, strings.TrimSuffix(s, "M")
	case strings.HasSuffix(s, "K"):
		mult, s = 1<<10, strings.TrimSuffix(s, "K")
	}
	var n int64
	if _, err := fmt.Sscanf(s, "%d", &n); err != nil || n <= 0 || fmt.Sprint(n) != s {
		return 0, fmt.Errorf("bad size %q (use e.g. 512M or 2G)", s)
	}
	if n > (1<<50)/mult {
		return 0, fmt.Errorf("size %q too large", s)
	}
	n *= mult
	if n%4096 != 0 {
		return 0, fmt.Errorf("size %q is not a multiple of 4 KiB", s)
	}
	return n, nil
}
