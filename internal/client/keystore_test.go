package client

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmbond/vmbond/internal/proto"
)

func TestKeystore(t *testing.T) {
	ks := &Keystore{Dir: filepath.Join(t.TempDir(), "home")}
	if _, err := ks.LoadConfig(); err == nil || !strings.Contains(err.Error(), "vmbond login") {
		t.Fatalf("missing config: %v", err)
	}
	k := &VMKey{ID: "vm-1", Name: "web", Tenant: "alice", Host: "h1", DiskKey: []byte("secret")}
	if err := ks.SaveKey(k); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{ks.Dir, filepath.Join(ks.Dir, "keys", "vm-1.json")} {
		st, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm()&0o077 != 0 {
			t.Fatalf("%s is readable by others: %v", p, st.Mode().Perm())
		}
	}
	got, err := ks.Key("web")
	if err != nil || string(got.DiskKey) != "secret" {
		t.Fatalf("key by name: %v", err)
	}
	if _, err := ks.Key("db"); err == nil || !strings.Contains(err.Error(), "key import") {
		t.Fatalf("missing key: %v", err)
	}

	other := &Keystore{Dir: t.TempDir()}
	keys, _ := ks.Keys()
	n, err := other.Import(&Backup{Version: proto.Version, Keys: keys})
	if err != nil || n != 1 {
		t.Fatalf("import: %d %v", n, err)
	}
	if n, err := other.Import(&Backup{Version: proto.Version, Keys: keys}); err != nil || n != 0 {
		t.Fatalf("re-import of the same key: %d %v", n, err)
	}
	clash := *k
	clash.DiskKey = []byte("different")
	if _, err := other.Import(&Backup{Version: proto.Version, Keys: []*VMKey{&clash}}); err == nil || !strings.Contains(err.Error(), "refusing to overwrite") {
		t.Fatalf("conflicting import: %v", err)
	}
	if _, err := other.Import(&Backup{Version: "v0"}); err == nil {
		t.Fatal("imported a backup of another version")
	}
	bad := &VMKey{ID: "../../etc/x", DiskKey: []byte("k")}
	if _, err := other.Import(&Backup{Version: proto.Version, Keys: []*VMKey{bad}}); err == nil {
		t.Fatal("imported a key with a path in its ID")
	}
}
