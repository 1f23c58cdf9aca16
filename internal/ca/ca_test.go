package ca

import (
	"crypto/ed25519"
	"crypto/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmbond/vmbond/internal/proto"
)

func TestHostCertificates(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	if err := Init(dir); err != nil {
		t.Fatal(err)
	}
	if err := Init(dir); err == nil || !strings.Contains(err.Error(), "refusing to overwrite") {
		t.Fatalf("second init: %v", err)
	}
	if st, _ := os.Stat(filepath.Join(dir, HostKeyFile)); st.Mode().Perm() != 0o600 {
		t.Fatalf("CA key mode %v", st.Mode().Perm())
	}
	pubPEM, _ := os.ReadFile(filepath.Join(dir, HostPubFile))
	caPub, err := ParsePublicKey(pubPEM)
	if err != nil {
		t.Fatal(err)
	}
	sk, _, _ := ed25519.GenerateKey(rand.Reader)
	id := proto.HostIdentity{HostID: "host1", SigningKey: sk, KEM: 1, SealKey: []byte{1, 2, 3}}
	now := time.Now()
	cert, err := SignHost(dir, id, []string{"production"}, time.Hour, now)
	if err != nil {
		t.Fatal(err)
	}
	other := filepath.Join(t.TempDir(), "other")
	Init(other)
	otherPEM, _ := os.ReadFile(filepath.Join(other, HostPubFile))
	otherPub, _ := ParsePublicKey(otherPEM)
	tampered := *cert
	tampered.Body = []byte(strings.Replace(string(cert.Body), "host1", "host2", 1))

	tests := []struct {
		name string
		ca   ed25519.PublicKey
		cert *proto.HostCert
		at   time.Time
		want string
	}{
		{"valid", caPub, cert, now, ""},
		{"other CA", otherPub, cert, now, "not signed by the pinned host CA"},
		{"tampered", caPub, &tampered, now, "not signed by the pinned host CA"},
		{"expired", caPub, cert, now.Add(2 * time.Hour), "not now"},
		{"nil", caPub, nil, now, "not signed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, err := VerifyHost(tt.ca, tt.cert, tt.at)
			if tt.want == "" {
				if err != nil || b.Identity.HostID != "host1" || b.Contexts[0] != "production" {
					t.Fatalf("valid cert refused: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v, want %q", err, tt.want)
			}
		})
	}
	if _, err := SignHost(dir, proto.HostIdentity{HostID: "Bad Host"}, nil, time.Hour, now); err == nil {
		t.Fatal("signed a bad host ID")
	}
	if _, err := ParsePublicKey([]byte("junk")); err == nil {
		t.Fatal("parsed junk as a key")
	}
}
