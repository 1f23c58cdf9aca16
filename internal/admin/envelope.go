package admin

// Envelope is what an admin sends an agent: a signed request and, for
// operations that need a quorum, the other admins' approvals of it. The
// management server carries it unchanged; it can neither make nor alter one.
type Envelope struct {
	Request   SignedRequest `json:"request"`
	Approvals []*Approval   `json:"approvals,omitempty"`
}
