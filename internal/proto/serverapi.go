package proto

// Messages of the management server's own API (client <-> server). The
// agent's API is described in docs/protocol.md; its bodies are the types in
// proto.go.

// CreateTenantRequest asks the server (as admin) for a tenant account.
type CreateTenantRequest struct {
	Name string `json:"name"`
}

// TenantCredential is the server's answer: the bearer token for its API.
// It authenticates to the server only; it protects nothing on the agents.
type TenantCredential struct {
	Name  string `json:"name"`
	Token string `json:"token"`
}

// AddHostRequest asks the server (as admin) to enrol an agent by URL.
type AddHostRequest struct {
	URL string `json:"url"`
}

// HostInfo is the server's record of a host. The certificate is carried as
// the agent gave it; the server does not vouch for it, the client verifies it.
type HostInfo struct {
	ID   string   `json:"id"`
	URL  string   `json:"url"`
	Cert HostCert `json:"cert"`
	VMs  int      `json:"vms"`
}

// PlacementRequest asks the server to choose a host for a new VM.
type PlacementRequest struct {
	MemoryMiB int `json:"memory_mib"`
	CPUs      int `json:"cpus"`
}

// CreateVMRequest registers a VM: the server records it and forwards the
// uploaded image, boot files and the registration to the spec's host.
type CreateVMRequest struct {
	Registration Registration `json:"registration"`
}

// VMInfo is the server's inventory record of a VM.
type VMInfo struct {
	ID      string `json:"id"`
	Name    string `json:"name"`
	Tenant  string `json:"tenant"`
	Host    string `json:"host"`
	State   string `json:"state"`
	Created string `json:"created"`
}
