package cli

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"

	"github.com/spf13/cobra"

	"github.com/vmbond/vmbond/internal/bond"
	"github.com/vmbond/vmbond/internal/client"
	"github.com/vmbond/vmbond/internal/disk"
	"github.com/vmbond/vmbond/internal/luks"
	"github.com/vmbond/vmbond/internal/nbd"
	"github.com/vmbond/vmbond/internal/proto"
)

func (a *app) keyCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "key",
		Short: "Back up and restore your disk keys",
		Long: `Your disk keys exist only in your keystore (and, sealed, on the hosts that
run your VMs). A lost key is a lost disk: export a backup and keep it safe.`,
	}
	var out string
	export := &cobra.Command{
		Use:   "export [NAME...]",
		Short: "Write a backup of your disk keys (all, or the named VMs)",
		RunE: func(c *cobra.Command, args []string) error {
			ks := &client.Keystore{Dir: a.home}
			all, err := ks.Keys()
			if err != nil {
				return err
			}
			b := client.Backup{Version: proto.Version}
			if len(args) == 0 {
				b.Keys = all
			}
			for _, n := range args {
				k, err := ks.Key(n)
				if err != nil {
					return err
				}
				b.Keys = append(b.Keys, k)
			}
			data, _ := jsonMarshal(b)
			if out == "" {
				return usageError{errors.New("key export needs --out FILE (the backup holds secret keys)")}
			}
			f, err := os.OpenFile(out, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
			if err != nil {
				return fmt.Errorf("write backup: %w", err)
			}
			if _, err := f.Write(data); err != nil {
				f.Close()
				return err
			}
			if err := f.Close(); err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "%d keys written to %s (mode 0600); anyone with this file can read those disks\n", len(b.Keys), out)
			return nil
		},
	}
	export.Flags().StringVar(&out, "out", "", "backup file to create")
	imp := &cobra.Command{
		Use:   "import BACKUP",
		Short: "Restore keys from a backup",
		Args:  exactArgs(1, "the backup file"),
		RunE: func(c *cobra.Command, args []string) error {
			data, err := os.ReadFile(args[0])
			if err != nil {
				return err
			}
			var b client.Backup
			if err := json.Unmarshal(data, &b); err != nil {
				return fmt.Errorf("read backup %s: %w", args[0], err)
			}
			n, err := (&client.Keystore{Dir: a.home}).Import(&b)
			if err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "%d keys imported\n", n)
			return nil
		},
	}
	cmd.AddCommand(export, imp)
	return cmd
}

func (a *app) diskCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "disk",
		Short: "Work with encrypted disk images outside any VM",
		Long: `Work with vmbond disk images directly. They are standard LUKS1 containers
(aes-xts-plain64, sha256): the key file these commands use is the LUKS
passphrase, so qemu-img and cryptsetup open them too.`,
	}
	var keyFile string
	var out string
	exportKey := &cobra.Command{
		Use:   "export-key NAME",
		Short: "Write a VM's LUKS key file (for qemu-img, cryptsetup or vmbond disk)",
		Args:  exactArgs(1, "the VM name or ID"),
		RunE: func(c *cobra.Command, args []string) error {
			k, err := (&client.Keystore{Dir: a.home}).Key(args[0])
			if err != nil {
				return err
			}
			keys, err := bond.Derive(k.DiskKey, k.Tenant, k.ID)
			if err != nil {
				return err
			}
			if out == "" {
				return usageError{errors.New("export-key needs --out FILE")}
			}
			if err := writeSecret(out, keys.LUKSPassphrase()); err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "LUKS key file for %s written to %s\n", k.Name, out)
			return nil
		},
	}
	exportKey.Flags().StringVar(&out, "out", "", "key file to create")

	var size string
	create := &cobra.Command{
		Use:   "create IMAGE",
		Short: "Create a blank encrypted image and a new key file",
		Args:  exactArgs(1, "the image path"),
		RunE: func(c *cobra.Command, args []string) error {
			n, err := parseSize(size)
			if err != nil {
				return usageError{err}
			}
			if keyFile == "" {
				return usageError{errors.New("create needs --key-file FILE (created, must not exist)")}
			}
			pass := make([]byte, 32)
			rand.Read(pass)
			passHex := []byte(hex.EncodeToString(pass))
			if err := writeSecret(keyFile, passHex); err != nil {
				return err
			}
			if err := disk.Create(args[0], bond.NewDiskKey(), passHex, n); err != nil {
				os.Remove(keyFile)
				return err
			}
			fmt.Fprintf(a.stdout, "created %s (%d bytes, sparse) with key file %s\n", args[0], n, keyFile)
			return nil
		},
	}
	create.Flags().StringVar(&size, "size", "", "payload size, e.g. 1G")
	create.Flags().StringVar(&keyFile, "key-file", "", "key file (LUKS passphrase) to create")

	var socket string
	var plain, readOnly bool
	serve := &cobra.Command{
		Use:   "serve IMAGE",
		Short: "Serve an image over NBD on a unix socket (like qemu-nbd)",
		Long: `Serve one image over NBD on a unix socket, outside any VM, for recovery,
inspection and benchmarks. Any NBD client works: qemu-img, qemu-io, nbdinfo,
nbdcopy, fio's nbd engine (nbd+unix:///?socket=PATH).`,
		Args: exactArgs(1, "the image path"),
		RunE: func(c *cobra.Command, args []string) error {
			if socket == "" {
				return usageError{errors.New("serve needs --socket PATH")}
			}
			var backend interface {
				nbd.Backend
				io.Closer
			}
			if plain {
				p, err := disk.OpenPlain(args[0])
				if err != nil {
					return err
				}
				backend = p
			} else {
				key, err := unlockImage(args[0], keyFile)
				if err != nil {
					return err
				}
				d, err := disk.Open(args[0], key)
				if err != nil {
					return err
				}
				backend = d
			}
			defer backend.Close()
			os.Remove(socket)
			l, err := net.Listen("unix", socket)
			if err != nil {
				return err
			}
			defer os.Remove(socket)
			fmt.Fprintf(a.stderr, "serving %s (%d bytes) on nbd+unix:///?socket=%s\n", args[0], backend.Size(), socket)
			srv := &nbd.Server{Backend: backend, ReadOnly: readOnly, Logger: a.logger()}
			if err := srv.Serve(c.Context(), l); err != nil && !errors.Is(err, context.Canceled) {
				return err
			}
			return nil
		},
	}
	serve.Flags().StringVar(&socket, "socket", "", "unix socket to listen on")
	serve.Flags().StringVar(&keyFile, "key-file", "", "the image's key file (LUKS passphrase)")
	serve.Flags().BoolVar(&plain, "plain", false, "serve a raw image without encryption (for comparison)")
	serve.Flags().BoolVar(&readOnly, "read-only", false, "refuse writes")

	var decrypt bool
	convert := &cobra.Command{
		Use:   "convert SRC DST",
		Short: "Encrypt a raw image into a new LUKS image, or --decrypt one back to raw",
		Args:  exactArgs(2, "source and destination paths"),
		RunE: func(c *cobra.Command, args []string) error {
			if keyFile == "" {
				return usageError{errors.New("convert needs --key-file FILE")}
			}
			if decrypt {
				key, err := unlockImage(args[0], keyFile)
				if err != nil {
					return err
				}
				f, err := os.OpenFile(args[1], os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
				if err != nil {
					return err
				}
				if err := disk.ExportPlain(args[0], key, f); err != nil {
					f.Close()
					os.Remove(args[1])
					return err
				}
				return f.Close()
			}
			pass, err := os.ReadFile(keyFile)
			if err != nil {
				return err
			}
			src, err := os.Open(args[0])
			if err != nil {
				return err
			}
			defer src.Close()
			st, err := src.Stat()
			if err != nil {
				return err
			}
			if st.Size()%512 != 0 {
				return fmt.Errorf("%s is %d bytes, not a whole number of 512-byte sectors", args[0], st.Size())
			}
			return disk.CreateFrom(args[1], src, st.Size(), bond.NewDiskKey(), pass)
		},
	}
	convert.Flags().StringVar(&keyFile, "key-file", "", "key file (LUKS passphrase)")
	convert.Flags().BoolVar(&decrypt, "decrypt", false, "decrypt SRC (LUKS) into a raw DST")
	cmd.AddCommand(exportKey, create, serve, convert)
	return cmd
}

func unlockImage(path, keyFile string) ([]byte, error) {
	if keyFile == "" {
		return nil, usageError{errors.New("an encrypted image needs --key-file FILE (or --plain)")}
	}
	pass, err := os.ReadFile(keyFile)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	h, err := luks.ReadHeader(f)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	key, err := h.Unlock(f, pass)
	if err != nil {
		return nil, fmt.Errorf("unlock %s: %w", path, err)
	}
	return key, nil
}

func writeSecret(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
