package audit

// Bundle is how an agent hands out its log: the raw lines and a head signed
// at the last of them. The server stores bundles as they come; whoever
// verifies one needs only the host's signing key.
type Bundle struct {
	Head Head   `json:"head"`
	Log  []byte `json:"log"`
}
