package bond

import (
	"bytes"
	"testing"
	"time"

	"github.com/vmbond/vmbond/internal/proto"
)

func TestSealBinding(t *testing.T) {
	host, err := GenerateHostKey()
	if err != nil {
		t.Fatal(err)
	}
	other, _ := GenerateHostKey()
	key := NewDiskKey()
	b := Binding{Tenant: "alice", VM: "web", Host: "h1", Spec: []byte(`{"x":1}`)}
	blob, err := SealDiskKey(host.PublicKey().Bytes(), key, b)
	if err != nil {
		t.Fatal(err)
	}
	got, err := OpenDiskKey(host, blob, b)
	if err != nil || !bytes.Equal(got, key) {
		t.Fatalf("open with right binding: %v", err)
	}
	tests := []struct {
		name string
		priv interface{}
		b    Binding
	}{
		{"other tenant", host, Binding{"mallory", "web", "h1", b.Spec}},
		{"other vm", host, Binding{"alice", "db", "h1", b.Spec}},
		{"other host id", host, Binding{"alice", "web", "h2", b.Spec}},
		{"altered spec", host, Binding{"alice", "web", "h1", []byte(`{"x":2}`)}},
		{"other host key", other, b},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			priv := host
			if tt.name == "other host key" {
				priv = other
			}
			if _, err := OpenDiskKey(priv, blob, tt.b); err == nil {
				t.Fatal("opened a blob under the wrong binding")
			}
		})
	}
}

func TestParseBlobRejects(t *testing.T) {
	host, _ := GenerateHostKey()
	b := Binding{Tenant: "a", VM: "v", Host: "h"}
	blob, _ := SealDiskKey(host.PublicKey().Bytes(), NewDiskKey(), b)
	bad := map[string][]byte{
		"empty":     nil,
		"magic":     append([]byte("XXXX"), blob[4:]...),
		"version":   append(append([]byte{}, blob[:4]...), append([]byte{9}, blob[5:]...)...),
		"truncated": blob[:20],
		"huge":      make([]byte, maxBlob+1),
	}
	for name, in := range bad {
		if _, err := ParseBlob(in); err == nil {
			t.Errorf("%s: ParseBlob accepted it", name)
		}
	}
	flipped := append([]byte{}, blob...)
	flipped[len(flipped)-1] ^= 1
	if _, err := OpenDiskKey(host, flipped, b); err == nil {
		t.Error("opened a blob with a flipped ciphertext bit")
	}
}

func FuzzParseBlob(f *testing.F) {
	host, _ := GenerateHostKey()
	blob, _ := SealDiskKey(host.PublicKey().Bytes(), NewDiskKey(), Binding{Tenant: "a", VM: "v", Host: "h"})
	f.Add(blob)
	f.Add([]byte("VMBK\x01"))
	f.Fuzz(func(t *testing.T, in []byte) {
		p, err := ParseBlob(in)
		if err == nil && len(p.Enc)+len(p.Ciphertext)+blobHeader != len(in) {
			t.Fatalf("parts do not add up to the blob")
		}
		OpenDiskKey(host, in, Binding{Tenant: "a", VM: "v", Host: "h"})
	})
}

func TestDerivedKeysAreBound(t *testing.T) {
	key := NewDiskKey()
	a, _ := Derive(key, "alice", "web")
	b, _ := Derive(key, "alice", "db")
	if bytes.Equal(a.CommandMAC(nil, []byte("x")), b.CommandMAC(nil, []byte("x"))) {
		t.Fatal("two VMs derived the same command key")
	}
	if _, err := Derive(key[:32], "alice", "web"); err == nil {
		t.Fatal("short disk key accepted")
	}
	if !a.CheckSpecMAC([]byte("s"), a.SpecMAC([]byte("s"))) || a.CheckSpecMAC([]byte("t"), a.SpecMAC([]byte("s"))) {
		t.Fatal("spec MAC check wrong")
	}
	d := bytes.Repeat([]byte{1}, 32)
	if a.CheckCommandMAC(bytes.Repeat([]byte{2}, 32), []byte("b"), a.CommandMAC(d, []byte("b"))) {
		t.Fatal("command MAC verified under another descriptor")
	}
}

func TestDescriptorAndReply(t *testing.T) {
	k, _ := Derive(NewDiskKey(), "alice", "web")
	other, _ := Derive(NewDiskKey(), "alice", "web")
	d := &proto.Descriptor{ID: bytes.Repeat([]byte{7}, 32), VM: "web", Host: "h1", Epoch: 3, Issued: time.Now().UTC()}
	box, err := k.SealDescriptor(d)
	if err != nil {
		t.Fatal(err)
	}
	got, err := k.OpenDescriptor(box)
	if err != nil || !bytes.Equal(got.ID, d.ID) || got.Epoch != 3 {
		t.Fatalf("open descriptor: %v", err)
	}
	if _, err := other.OpenDescriptor(box); err == nil {
		t.Fatal("descriptor opened with another disk key")
	}
	moved := *box
	moved.Host = "h2"
	if _, err := k.OpenDescriptor(&moved); err == nil {
		t.Fatal("descriptor relabelled to another host opened")
	}
	r, err := k.SealReply(&proto.ReplyBody{Version: proto.Version, VM: "web", Host: "h1", OK: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := k.OpenReply(r); err != nil {
		t.Fatal(err)
	}
	r.VM = "db"
	if _, err := k.OpenReply(r); err == nil {
		t.Fatal("reply relabelled to another VM opened")
	}
}
