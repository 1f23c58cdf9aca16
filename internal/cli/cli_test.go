package cli

import (
	"bytes"
	"context"
	"crypto/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/cobra"
)

func runCLI(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(context.Background(), args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestBadArguments(t *testing.T) {
	home := t.TempDir()
	tests := []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"--home", home, "vm", "create"}, exitUsage, "takes the VM name"},
		{[]string{"--home", home, "vm", "create", "web"}, exitUsage, "--image FILE or --size SIZE"},
		{[]string{"--home", home, "vm", "create", "web", "--size", "12X"}, exitUsage, "bad size"},
		{[]string{"--home", home, "vm", "create", "web", "--size", "1000"}, exitUsage, "not a multiple of 4 KiB"},
		{[]string{"--home", home, "vm", "create", "web", "--memory", "lots"}, exitUsage, "invalid argument"},
		{[]string{"--home", home, "vm", "start", "web"}, exitError, "vmbond login"},
		{[]string{"--home", home, "vm", "start"}, exitUsage, "takes the VM name"},
		{[]string{"--home", home, "frobnicate"}, exitUsage, "unknown command"},
		{[]string{"--home", home, "disk", "serve", "x.img"}, exitUsage, "--socket"},
		{[]string{"--home", home, "disk", "serve", "x.img", "--socket", "s"}, exitUsage, "--key-file"},
		{[]string{"--home", home, "ca", "sign-host", "--ca", home, filepath.Join(home, "missing.json")}, exitError, "no such file"},
		{[]string{"--home", home, "login", "--server", "http://x"}, exitUsage, "--token"},
		{[]string{"--home", home, "key", "export"}, exitUsage, "--out"},
		{[]string{"--home", home, "-o", "yaml", "agent", "init", "--data", home, "--host-id", "h1"}, exitUsage, "unknown output format"},
		{[]string{"--home", home, "agent", "init", "--data", home, "--host-id", "Bad_Host"}, exitError, "invalid host"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args[2:], " "), func(t *testing.T) {
			code, _, stderr := runCLI(t, tt.args...)
			if code != tt.code || !strings.Contains(stderr, tt.msg) {
				t.Fatalf("exit %d, stderr %q; want exit %d mentioning %q", code, stderr, tt.code, tt.msg)
			}
		})
	}
}

func TestHelpExplainsEveryVerb(t *testing.T) {
	a := &app{}
	root := a.rootCmd()
	var check func(prefix string, cmds []*cobra.Command)
	check = func(prefix string, cmds []*cobra.Command) {
		for _, c := range cmds {
			if c.Short == "" {
				t.Errorf("%s %s has no help text", prefix, c.Name())
			}
			check(prefix+" "+c.Name(), c.Commands())
		}
	}
	check("vmbond", root.Commands())
}

// TestDiskConvertRoundTrip encrypts a raw image into LUKS and decrypts it back.
func TestDiskConvertRoundTrip(t *testing.T) {
	dir := t.TempDir()
	raw, enc, back, key := filepath.Join(dir, "a.raw"), filepath.Join(dir, "a.img"), filepath.Join(dir, "b.raw"), filepath.Join(dir, "k")
	data := make([]byte, 1<<20)
	rand.Read(data[:300<<10])
	os.WriteFile(raw, data, 0o600)
	os.WriteFile(key, []byte("0123456789abcdef0123456789abcdef"), 0o600)
	if code, _, stderr := runCLI(t, "disk", "convert", raw, enc, "--key-file", key); code != 0 {
		t.Fatalf("convert: %s", stderr)
	}
	ct, _ := os.ReadFile(enc)
	if bytes.Contains(ct, data[:4096]) {
		t.Fatal("plaintext in the encrypted image")
	}
	os.WriteFile(filepath.Join(dir, "wrong"), []byte("wrong"), 0o600)
	if code, _, stderr := runCLI(t, "disk", "convert", "--decrypt", enc, back, "--key-file", filepath.Join(dir, "wrong")); code == 0 || !strings.Contains(stderr, "unlock") {
		t.Fatalf("wrong key: exit %d %s", code, stderr)
	}
	if code, _, stderr := runCLI(t, "disk", "convert", "--decrypt", enc, back, "--key-file", key); code != 0 {
		t.Fatalf("decrypt: %s", stderr)
	}
	got, _ := os.ReadFile(back)
	if !bytes.Equal(got, data) {
		t.Fatal("round trip changed the data")
	}
}
