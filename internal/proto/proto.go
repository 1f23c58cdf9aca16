// Package proto owns vmbond's wire format: the JSON messages that travel
// between the tenant's client, the untrusted management server and the trusted
// host agent. Everything here is public data, ciphertext or signed bytes; the
// server links this package and nothing that can open a disk key.
//
// Messages that are signed or MACed travel as exact bytes (a Body field that
// JSON encodes as base64) so that no re-encoding by a relay can change what was
// authenticated.
package proto

import (
	"fmt"
	"regexp"
	"time"
)

// Version is the protocol version carried in every authenticated body.
const Version = "vmbond/v1"

// Operation names of the command automata. The agent runs only these.
const (
	OpStart    = "start"
	OpStatus   = "status"
	OpPause    = "pause"
	OpResume   = "resume"
	OpStop     = "stop"
	OpShutdown = "shutdown"
	OpReset    = "reset"
	OpConsole  = "console"
	OpDelete   = "delete"
	OpRestore  = "restore" // tenant: undo a delete within retention
	OpPurge    = "purge"   // destroy a deleted VM's key and disk now
)

// Operations lists every operation a command may name, in display order.
func Operations() []string {
	return []string{OpStart, OpStatus, OpPause, OpResume, OpStop, OpShutdown, OpReset, OpConsole, OpDelete, OpRestore, OpPurge}
}

// IsOperation reports whether op is one of Operations.
func IsOperation(op string) bool {
	for _, o := range Operations() {
		if o == op {
			return true
		}
	}
	return false
}

// Boot modes of a VM spec.
const (
	// BootDisk: the host firmware boots the bootloader from the tenant's
	// encrypted disk; the operator supplies nothing the guest executes.
	BootDisk = "disk"
	// BootKernel: direct kernel boot; kernel and initrd are pinned by SHA-256
	// and the command line is part of the authenticated spec.
	BootKernel = "kernel"
)

var idPattern = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)

// ValidID checks a tenant, VM or host identifier: lower-case letters, digits
// and dashes, 1 to 63 characters. Identifiers end up in file names and in
// HPKE info strings, so the alphabet is narrow on purpose.
func ValidID(kind, id string) error {
	if !idPattern.MatchString(id) {
		return fmt.Errorf("invalid %s %q: use 1-63 lower-case letters, digits and dashes, starting with a letter or digit", kind, id)
	}
	return nil
}

// HostIdentity is what an agent publishes about itself before certification.
type HostIdentity struct {
	HostID     string `json:"host_id"`
	SigningKey []byte `json:"signing_key"` // Ed25519 public key
	KEM        uint16 `json:"kem"`         // HPKE KEM identifier of SealKey
	SealKey    []byte `json:"seal_key"`    // HPKE public key (ML-KEM768+X25519)
}

// HostCertBody is what the host CA signs.
type HostCertBody struct {
	Version   string       `json:"version"`
	Identity  HostIdentity `json:"identity"`
	Contexts  []string     `json:"contexts,omitempty"`
	Serial    string       `json:"serial"`
	NotBefore time.Time    `json:"not_before"`
	NotAfter  time.Time    `json:"not_after"`
}

// HostCert is a host certificate: the exact body bytes and the CA's Ed25519
// signature over them.
type HostCert struct {
	Body []byte `json:"body"`
	Sig  []byte `json:"sig"`
}

// BootSpec says what the VM executes and how it is pinned.
type BootSpec struct {
	Mode         string `json:"mode"`                    // BootDisk or BootKernel
	KernelSHA256 string `json:"kernel_sha256,omitempty"` // hex, BootKernel only
	InitrdSHA256 string `json:"initrd_sha256,omitempty"` // hex, BootKernel only
	Cmdline      string `json:"cmdline,omitempty"`       // BootKernel only
}

// VMSpec is the tenant's authenticated description of a VM. The agent runs
// the VM exactly as described here and refuses anything else.
type VMSpec struct {
	Version   string   `json:"version"`
	Tenant    string   `json:"tenant"`
	VM        string   `json:"vm"` // VM identifier, unique per tenant
	Name      string   `json:"name"`
	Host      string   `json:"host"`
	MemoryMiB int      `json:"memory_mib"`
	CPUs      int      `json:"cpus"`
	DiskSize  int64    `json:"disk_size"` // bytes of plaintext payload
	Boot      BootSpec `json:"boot"`
	// AdminAllowed lists the operations an admin may run without the tenant.
	AdminAllowed []string  `json:"admin_allowed"`
	Created      time.Time `json:"created"`
}

// Check validates a spec's fields. It does not authenticate anything.
func (s *VMSpec) Check() error {
	if s.Version != Version {
		return fmt.Errorf("spec version %q, want %q", s.Version, Version)
	}
	for _, f := range []struct{ kind, v string }{{"tenant", s.Tenant}, {"vm", s.VM}, {"host", s.Host}} {
		if err := ValidID(f.kind, f.v); err != nil {
			return err
		}
	}
	if s.MemoryMiB < 16 || s.MemoryMiB > 1<<20 {
		return fmt.Errorf("memory %d MiB out of range 16..1048576", s.MemoryMiB)
	}
	if s.CPUs < 1 || s.CPUs > 256 {
		return fmt.Errorf("cpus %d out of range 1..256", s.CPUs)
	}
	if s.DiskSize <= 0 || s.DiskSize%4096 != 0 {
		return fmt.Errorf("disk size %d is not a positive multiple of 4096", s.DiskSize)
	}
	switch s.Boot.Mode {
	case BootDisk:
		if s.Boot.KernelSHA256 != "" || s.Boot.InitrdSHA256 != "" || s.Boot.Cmdline != "" {
			return fmt.Errorf("disk boot takes no kernel, initrd or command line")
		}
	case BootKernel:
		if len(s.Boot.KernelSHA256) != 64 || (s.Boot.InitrdSHA256 != "" && len(s.Boot.InitrdSHA256) != 64) {
			return fmt.Errorf("kernel boot needs a SHA-256 (64 hex digits) for the kernel and, if any, the initrd")
		}
	default:
		return fmt.Errorf("unknown boot mode %q (want %q or %q)", s.Boot.Mode, BootDisk, BootKernel)
	}
	for _, op := range s.AdminAllowed {
		if !IsOperation(op) {
			return fmt.Errorf("admin policy names unknown operation %q", op)
		}
	}
	return nil
}

// Registration carries a VM to its agent: the spec bytes, their MAC under a
// key derived from the disk key, and the disk key sealed to the host.
type Registration struct {
	Spec      []byte `json:"spec"`       // JSON of VMSpec, exact bytes
	SpecMAC   []byte `json:"spec_mac"`   // HMAC-SHA256 under the spec key
	SealedKey []byte `json:"sealed_key"` // bond sealed blob
}

// DecodeSpec parses and checks the spec bytes of a registration.
func (r *Registration) DecodeSpec() (*VMSpec, error) {
	var s VMSpec
	if err := DecodeStrict(r.Spec, &s); err != nil {
		return nil, fmt.Errorf("decode spec: %w", err)
	}
	if err := s.Check(); err != nil {
		return nil, fmt.Errorf("check spec: %w", err)
	}
	return &s, nil
}

// DescriptorBox is a VM descriptor sealed under the descriptor key: anyone
// may carry it, only the disk key holder can open it.
type DescriptorBox struct {
	VM    string `json:"vm"`
	Host  string `json:"host"`
	Nonce []byte `json:"nonce"`
	Box   []byte `json:"box"`
}

// Descriptor is the opened content of a DescriptorBox.
type Descriptor struct {
	ID     []byte    `json:"id"` // 32 random bytes
	VM     string    `json:"vm"`
	Host   string    `json:"host"`
	Epoch  uint64    `json:"epoch"` // bumps at registration and at every boot
	Issued time.Time `json:"issued"`
}

// CommandBody is a tenant's command, authenticated by Envelope.MAC.
type CommandBody struct {
	Version string            `json:"version"`
	Tenant  string            `json:"tenant"`
	VM      string            `json:"vm"`
	Host    string            `json:"host"`
	Op      string            `json:"op"`
	Args    map[string]string `json:"args,omitempty"`
	Nonce   []byte            `json:"nonce"` // 16 random bytes
	Time    time.Time         `json:"time"`
}

// Envelope carries authenticated bytes.
type Envelope struct {
	Body []byte `json:"body"`
	MAC  []byte `json:"mac"`
}

// DecodeCommand parses an envelope's body as a CommandBody.
func (e *Envelope) DecodeCommand() (*CommandBody, error) {
	var c CommandBody
	if err := DecodeStrict(e.Body, &c); err != nil {
		return nil, fmt.Errorf("decode command: %w", err)
	}
	if c.Version != Version {
		return nil, fmt.Errorf("command version %q, want %q", c.Version, Version)
	}
	return &c, nil
}

// SealedReply is the agent's answer to a tenant, sealed under the reply key
// and bound to the request it answers.
type SealedReply struct {
	VM    string `json:"vm"`
	Host  string `json:"host"`
	Nonce []byte `json:"nonce"`
	Box   []byte `json:"box"`
}

// ReplyBody is the opened content of a SealedReply.
type ReplyBody struct {
	Version string    `json:"version"`
	VM      string    `json:"vm"`
	Host    string    `json:"host"`
	Op      string    `json:"op"`
	Request []byte    `json:"request"` // SHA-256 of the request body
	OK      bool      `json:"ok"`
	Error   string    `json:"error,omitempty"`
	State   string    `json:"state,omitempty"`
	Output  string    `json:"output,omitempty"`
	Time    time.Time `json:"time"`
}

// VerifyRequest asks an agent to prove it holds a VM's disk key.
type VerifyRequest struct {
	Challenge []byte `json:"challenge"` // 32 random bytes from the client
}

// VerifyBody is what the agent signs with its host key in answer.
type VerifyBody struct {
	Version   string `json:"version"`
	Tenant    string `json:"tenant"`
	VM        string `json:"vm"`
	Host      string `json:"host"`
	Challenge []byte `json:"challenge"`
	Proof     []byte `json:"proof"` // HMAC under the verify key
}

// VerifyReply is the signed answer.
type VerifyReply struct {
	Body []byte `json:"body"`
	Sig  []byte `json:"sig"` // Ed25519 by the host signing key
}

// AdminReply is the agent's plain answer to an admin.
type AdminReply struct {
	VM    string `json:"vm,omitempty"`
	Host  string `json:"host"`
	Op    string `json:"op"`
	State string `json:"state,omitempty"`
	Note  string `json:"note,omitempty"`
}

// VMState is the public inventory an agent keeps for each VM.
type VMState struct {
	VM     string `json:"vm"`
	Tenant string `json:"tenant"`
	Name   string `json:"name"`
	State  string `json:"state"` // registered, running, paused, stopped
	PID    int    `json:"pid,omitempty"`
}

// Error is the body of every non-2xx answer, from agent and server alike.
type Error struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

func (e *Error) Error() string { return e.Code + ": " + e.Message }

// Error codes.
const (
	CodeBadRequest   = "bad_request"
	CodeUnauthorized = "unauthorized"
	CodeForbidden    = "forbidden"
	CodeNotFound     = "not_found"
	CodeConflict     = "conflict"
	CodeAuthFailed   = "auth_failed" // a MAC, seal or signature did not verify
	CodeReplay       = "replay"
	CodeRefused      = "refused"
	CodeInternal     = "internal"
	CodeUnavailable  = "unavailable"
)
