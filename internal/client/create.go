package client

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"

	"github.com/vmbond/vmbond/internal/bond"
	"github.com/vmbond/vmbond/internal/disk"
	"github.com/vmbond/vmbond/internal/fsutil"
	"github.com/vmbond/vmbond/internal/proto"
)

// CreateOptions describe a new VM.
type CreateOptions struct {
	Name string
	// Image is a local raw or qcow2 image to encrypt and upload; empty
	// means a blank disk of DiskSize.
	Image string
	// DiskSize is the disk size in bytes; with an image, 0 means the
	// image's size (rounded up to 4 KiB).
	DiskSize  int64
	MemoryMiB int
	CPUs      int
	// AdminAllowed lists what admins may run without the tenant.
	AdminAllowed []string
	// Host picks a host; empty lets the server place the VM.
	Host string
	// Kernel boot (optional): the files are pinned by hash in the spec.
	Kernel, Initrd, Cmdline string
}

// Create makes a VM: it encrypts the image on this machine, seals a fresh
// disk key to a host the pinned CA certified, registers the VM through the
// server, and checks the agent's sealed answer and its key verification.
func (c *Client) Create(ctx context.Context, o CreateOptions) (*VMKey, error) {
	if err := proto.ValidID("VM name", o.Name); err != nil {
		return nil, err
	}
	if o.MemoryMiB == 0 {
		o.MemoryMiB = 256
	}
	if o.CPUs == 0 {
		o.CPUs = 1
	}
	if o.AdminAllowed == nil {
		o.AdminAllowed = []string{proto.OpStatus}
	}
	host, hostBody, err := c.chooseHost(ctx, o)
	if err != nil {
		return nil, err
	}
	id := randomID("vm-")
	key := bond.NewDiskKey()
	keys, err := bond.Derive(key, c.Config.Tenant, id)
	if err != nil {
		return nil, err
	}

	spec := proto.VMSpec{
		Version: proto.Version, Tenant: c.Config.Tenant, VM: id, Name: o.Name, Host: host.ID,
		MemoryMiB: o.MemoryMiB, CPUs: o.CPUs, DiskSize: o.DiskSize, Boot: proto.BootSpec{Mode: proto.BootDisk},
		AdminAllowed: o.AdminAllowed, Created: c.now().UTC(),
	}
	var uploads []upload
	if o.Kernel != "" {
		spec.Boot = proto.BootSpec{Mode: proto.BootKernel, Cmdline: o.Cmdline}
		if spec.Boot.KernelSHA256, err = fsutil.SHA256File(o.Kernel); err != nil {
			return nil, err
		}
		uploads = append(uploads, upload{"/v1/vms/" + id + "/boot/kernel", o.Kernel})
		if o.Initrd != "" {
			if spec.Boot.InitrdSHA256, err = fsutil.SHA256File(o.Initrd); err != nil {
				return nil, err
			}
			uploads = append(uploads, upload{"/v1/vms/" + id + "/boot/initrd", o.Initrd})
		}
	}

	tmp, err := os.MkdirTemp(c.Store.Dir, ".create-")
	if err != nil {
		return nil, fmt.Errorf("create VM %s: %w", o.Name, err)
	}
	defer os.RemoveAll(tmp)
	if o.Image != "" {
		enc := filepath.Join(tmp, "disk.img")
		size, err := encryptImage(ctx, o.Image, enc, tmp, o.DiskSize, key, keys.LUKSPassphrase())
		if err != nil {
			return nil, fmt.Errorf("encrypt image %s: %w", o.Image, err)
		}
		spec.DiskSize = size
		uploads = append([]upload{{"/v1/vms/" + id + "/disk", enc}}, uploads...)
	} else if spec.DiskSize == 0 {
		return nil, errors.New("a blank disk needs a size (--size)")
	}

	specBytes, err := json.Marshal(spec)
	if err != nil {
		return nil, err
	}
	if err := spec.Check(); err != nil {
		return nil, err
	}
	sealed, err := bond.SealDiskKey(hostBody.Identity.SealKey, key, bond.Binding{Tenant: spec.Tenant, VM: id, Host: host.ID, Spec: specBytes})
	if err != nil {
		return nil, err
	}
	vk := &VMKey{ID: id, Name: o.Name, Tenant: spec.Tenant, Host: host.ID, HostSign: hostBody.Identity.SigningKey, DiskKey: key, Spec: specBytes}
	if err := c.Store.SaveKey(vk); err != nil {
		return nil, fmt.Errorf("save disk key before registering (nothing was sent): %w", err)
	}
	for _, u := range uploads {
		if err := c.putFile(ctx, u.path, u.file); err != nil {
			return vk, err
		}
	}
	reqBody, _ := json.Marshal(proto.CreateVMRequest{Registration: proto.Registration{Spec: specBytes, SpecMAC: keys.SpecMAC(specBytes), SealedKey: sealed}})
	status, b, err := c.roundTrip(ctx, "POST", "/v1/vms", bytes.NewReader(reqBody), int64(len(reqBody)))
	if err != nil {
		return vk, err
	}
	regBytes, _ := json.Marshal(proto.Registration{Spec: specBytes, SpecMAC: keys.SpecMAC(specBytes), SealedKey: sealed})
	if _, err := c.openReply(vk, keys, status, b, "register", regBytes); err != nil {
		return vk, fmt.Errorf("register %s: %w", o.Name, err)
	}
	if err := c.Verify(ctx, id); err != nil {
		return vk, err
	}
	return vk, nil
}

type upload struct{ path, file string }

func (c *Client) putFile(ctx context.Context, path, file string) error {
	f, err := os.Open(file)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	status, b, err := c.roundTrip(ctx, "PUT", path, f, st.Size())
	if err != nil {
		return err
	}
	if status/100 != 2 {
		return fmt.Errorf("upload %s: %w", filepath.Base(file), apiError(status, b))
	}
	return nil
}

// chooseHost asks for a host and verifies its certificate against the pinned
// host CA: a disk key is sealed only to a key the CA certified.
func (c *Client) chooseHost(ctx context.Context, o CreateOptions) (*proto.HostInfo, *proto.HostCertBody, error) {
	var h proto.HostInfo
	if o.Host != "" {
		hosts, err := c.Hosts(ctx)
		if err != nil {
			return nil, nil, err
		}
		i := slices.IndexFunc(hosts, func(h proto.HostInfo) bool { return h.ID == o.Host })
		if i < 0 {
			return nil, nil, fmt.Errorf("the server knows no host %q", o.Host)
		}
		h = hosts[i]
	} else if err := c.call(ctx, "POST", "/v1/placements", proto.PlacementRequest{MemoryMiB: o.MemoryMiB, CPUs: o.CPUs}, &h); err != nil {
		return nil, nil, fmt.Errorf("place VM: %w", err)
	}
	body, err := c.verifyHost(&h)
	if err != nil {
		return nil, nil, err
	}
	return &h, body, nil
}

// encryptImage turns a local raw or qcow2 image into an encrypted LUKS image
// at dst, on this machine, and returns the plaintext size. qcow2 is first
// converted to raw with qemu-img inside tmp, which is in the tenant's
// keystore.
func encryptImage(ctx context.Context, src, dst, tmp string, want int64, key, pass []byte) (int64, error) {
	f, err := os.Open(src)
	if err != nil {
		return 0, err
	}
	magic := make([]byte, 4)
	io.ReadFull(f, magic)
	f.Close()
	raw := src
	if string(magic) == "QFI\xfb" {
		raw = filepath.Join(tmp, "plain.raw")
		out, err := exec.CommandContext(ctx, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", src, raw).CombinedOutput()
		if err != nil {
			return 0, fmt.Errorf("convert qcow2 to raw: %v: %s", err, bytes.TrimSpace(out))
		}
	}
	r, err := os.Open(raw)
	if err != nil {
		return 0, err
	}
	defer r.Close()
	st, err := r.Stat()
	if err != nil {
		return 0, err
	}
	size := (st.Size() + 4095) &^ 4095
	if want != 0 {
		if want < size {
			return 0, fmt.Errorf("--size %d is smaller than the image (%d bytes)", want, st.Size())
		}
		size = want
	}
	src2 := io.MultiReader(r, zeroReader{})
	if err := disk.CreateFrom(dst, io.LimitReader(src2, size), size, key, pass); err != nil {
		return 0, err
	}
	return size, nil
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}
