package proto

// Additions to the management server's API (serverapi.go), kept in their own
// file so that the existing wire types stay untouched.

// TenantInfo is the server's record of a tenant, as listed to the admin by
// GET /v1/tenants. It never carries the token (the server keeps only its
// SHA-256).
type TenantInfo struct {
	Name    string `json:"name"`
	Created string `json:"created"` // RFC 3339
	VMs     int    `json:"vms"`     // VMs not deleted
}
