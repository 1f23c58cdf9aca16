package luks

import (
	"bytes"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/hex"
	"errors"
	"hash"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmbond/vmbond/internal/xts"
)

// needTool skips the test if an external tool is missing, or fails it when
// CI is set: interoperability is the point of this package.
func needTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s not installed: %v", name, err)
		}
		t.Skipf("%s not installed: %v", name, err)
	}
	return p
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// randPass returns a random passphrase in hex: qemu wants UTF-8 secrets.
func randPass(t testing.TB) []byte {
	return []byte(hex.EncodeToString(randBytes(t, 32)))
}

func randBytes(t testing.TB, n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// newImage writes a LUKS header to a file and extends it by payload bytes.
func newImage(t *testing.T, key, pass []byte, payload int64, opts ...Option) (string, *Header) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.luks")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h, err := Create(f, key, pass, opts...)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(h.PayloadOffset() + payload); err != nil {
		t.Fatal(err)
	}
	return path, h
}

func writeKeyFile(t *testing.T, pass []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "key")
	if err := os.WriteFile(p, pass, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestRoundTrip(t *testing.T) {
	key := randBytes(t, 64)
	pass := []byte("correct horse battery staple")
	path, want := newImage(t, key, pass, 0, WithUUID("0b6c3b3e-9d0f-4c57-8a52-3f7d0f3c2a11"), WithSlotIterations(2000))
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got, err := ReadHeader(f)
	if err != nil {
		t.Fatal(err)
	}
	if *got != *want {
		t.Fatalf("header round trip:\n got %+v\nwant %+v", got, want)
	}
	if got.CipherName != "aes" || got.CipherMode != "xts-plain64" || got.HashSpec != "sha256" ||
		got.KeyBytes != 64 || got.PayloadOffset() != 2<<20 || got.UUID != "0b6c3b3e-9d0f-4c57-8a52-3f7d0f3c2a11" ||
		got.MKDigestIter != DefaultDigestIterations || got.Slots[0].Iterations != 2000 {
		t.Errorf("unexpected header fields: %+v", got)
	}
	for i, s := range got.Slots {
		if s.Active != (i == 0) || s.Stripes != 4000 {
			t.Errorf("slot %d: %+v", i, s)
		}
	}
	if err := got.VerifyVolumeKey(key); err != nil {
		t.Errorf("VerifyVolumeKey(right key): %v", err)
	}
	bad := bytes.Clone(key)
	bad[0] ^= 1
	if err := got.VerifyVolumeKey(bad); !errors.Is(err, ErrWrongKey) {
		t.Errorf("VerifyVolumeKey(wrong key) = %v, want ErrWrongKey", err)
	}
	if err := got.VerifyVolumeKey(key[:32]); !errors.Is(err, ErrWrongKey) {
		t.Errorf("VerifyVolumeKey(short key) = %v, want ErrWrongKey", err)
	}
	k, err := got.Unlock(f, pass)
	if err != nil {
		t.Fatalf("Unlock: %v", err)
	}
	if !bytes.Equal(k, key) {
		t.Fatal("Unlock returned a different key")
	}
	if _, err := got.Unlock(f, []byte("wrong")); !errors.Is(err, ErrWrongKey) {
		t.Fatalf("Unlock(wrong passphrase) = %v, want ErrWrongKey", err)
	}
}

func TestCreateRejects(t *testing.T) {
	var buf writerAt
	if _, err := Create(&buf, make([]byte, 32), []byte("p")); err == nil {
		t.Error("Create accepted a 32-byte key")
	}
	if _, err := Create(&buf, make([]byte, 64), []byte("p"), WithSlotIterations(10)); err == nil {
		t.Error("Create accepted 10 slot iterations")
	}
	if _, err := Create(&buf, make([]byte, 64), []byte{0xff, 0xfe}); err == nil {
		t.Error("Create accepted a non-UTF-8 passphrase")
	}
	if _, err := Create(&buf, make([]byte, 64), []byte("p"), WithUUID(strings.Repeat("x", 40))); err == nil {
		t.Error("Create accepted a 40-byte UUID")
	}
}

type writerAt struct{ b []byte }

func (w *writerAt) WriteAt(p []byte, off int64) (int, error) {
	if end := int(off) + len(p); end > len(w.b) {
		w.b = append(w.b, make([]byte, end-len(w.b))...)
	}
	return copy(w.b[off:], p), nil
}

func TestAFSplitMerge(t *testing.T) {
	for _, hf := range []func() hash.Hash{sha1.New, sha256.New, sha512.New} {
		for _, n := range []int{16, 32, 33, 64} {
			for _, stripes := range []int{1, 2, 7, 4000} {
				key := randBytes(t, n)
				m, err := afSplit(key, stripes, hf, rand.Reader)
				if err != nil {
					t.Fatal(err)
				}
				if got := afMerge(m, n, stripes, hf); !bytes.Equal(got, key) {
					t.Fatalf("hash %T n=%d stripes=%d: merge != key", hf(), n, stripes)
				}
			}
		}
	}
}

func TestReadHeaderRejects(t *testing.T) {
	var w writerAt
	if _, err := Create(&w, randBytes(t, 64), []byte("p")); err != nil {
		t.Fatal(err)
	}
	good := w.b[:HeaderSize]
	if _, err := ReadHeader(bytes.NewReader(good)); err != nil {
		t.Fatalf("valid header: %v", err)
	}
	put32 := func(b []byte, off int, v uint32) {
		b[off], b[off+1], b[off+2], b[off+3] = byte(v>>24), byte(v>>16), byte(v>>8), byte(v)
	}
	tests := []struct {
		name string
		mod  func(b []byte)
	}{
		{"short", nil},
		{"magic", func(b []byte) { b[0] = 'X' }},
		{"version", func(b []byte) { b[7] = 2 }},
		{"cipher not terminated", func(b []byte) { copy(b[8:40], strings.Repeat("a", 32)) }},
		{"uuid not terminated", func(b []byte) { copy(b[168:208], strings.Repeat("a", 40)) }},
		{"key bytes 0", func(b []byte) { put32(b, 108, 0) }},
		{"key bytes huge", func(b []byte) { put32(b, 108, 1<<30) }},
		{"digest iter 0", func(b []byte) { put32(b, 164, 0) }},
		{"payload 0", func(b []byte) { put32(b, 104, 0) }},
		{"payload before slot", func(b []byte) { put32(b, 104, 100) }},
		{"slot state", func(b []byte) { put32(b, 208, 1) }},
		{"slot stripes 0", func(b []byte) { put32(b, 208+44, 0) }},
		{"slot stripes huge", func(b []byte) { put32(b, 208+44, 1<<31) }},
		{"slot iter huge", func(b []byte) { put32(b, 208+4, 1<<31) }},
		{"slot in header", func(b []byte) { put32(b, 208+40, 1) }},
		{"slot offset huge", func(b []byte) { put32(b, 208+40, 0xffffffff) }},
		{"slots overlap", func(b []byte) {
			put32(b, 208+48, slotActive)
			put32(b, 208+48+4, 1000)
			put32(b, 208+48+40, 10)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := bytes.Clone(good)
			if tt.mod == nil {
				b = b[:HeaderSize-1]
			} else {
				tt.mod(b)
			}
			if h, err := ReadHeader(bytes.NewReader(b)); err == nil {
				t.Fatalf("ReadHeader accepted %s: %+v", tt.name, h)
			}
		})
	}
}

func FuzzReadHeader(f *testing.F) {
	var w writerAt
	if _, err := Create(&w, make([]byte, 64), []byte("p"), WithRand(bytes.NewReader(make([]byte, 1<<20)))); err != nil {
		f.Fatal(err)
	}
	f.Add(w.b[:HeaderSize])
	f.Add([]byte("LUKS\xba\xbe\x00\x01"))
	f.Fuzz(func(t *testing.T, data []byte) {
		h, err := ReadHeader(bytes.NewReader(data))
		if err != nil {
			return
		}
		// A header we accept must survive re-encoding unchanged.
		h2, err := parseHeader(h.marshal())
		if err != nil {
			t.Fatalf("re-parse of accepted header: %v", err)
		}
		if *h != *h2 {
			t.Fatalf("re-encoding changed header:\n%+v\n%+v", h, h2)
		}
	})
}

func TestCryptsetupLuksDump(t *testing.T) {
	cs := needTool(t, "cryptsetup")
	key := randBytes(t, 64)
	path, h := newImage(t, key, []byte("pass"), 1<<20)
	out := run(t, cs, "luksDump", path)
	for _, want := range []string{
		"Version:", "1",
		"Cipher name:", "aes",
		"Cipher mode:", "xts-plain64",
		"Hash spec:", "sha256",
		"Payload offset:", "4096",
		"MK bits:", "512",
		"MK iterations:", "1000",
		"UUID:", h.UUID,
		"Key Slot 0: ENABLED",
		"Iterations:", "10000",
		"Key material offset:", "8",
		"AF stripes:", "4000",
		"Key Slot 1: DISABLED",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("luksDump output lacks %q:\n%s", want, out)
		}
	}
}

func TestCryptsetupTestPassphrase(t *testing.T) {
	cs := needTool(t, "cryptsetup")
	pass := randPass(t)
	path, _ := newImage(t, randBytes(t, 64), pass, 1<<20)
	run(t, cs, "open", "--test-passphrase", "--key-file", writeKeyFile(t, pass), path)
	out, err := exec.Command(cs, "open", "--test-passphrase", "--key-file", writeKeyFile(t, []byte("wrong")), path).CombinedOutput()
	if err == nil {
		t.Fatalf("cryptsetup accepted a wrong passphrase:\n%s", out)
	}
}

// TestQemuImgConvert encrypts a payload ourselves and checks that qemu's
// LUKS driver decrypts it to the same plaintext.
func TestQemuImgConvert(t *testing.T) {
	qi := needTool(t, "qemu-img")
	key := randBytes(t, 64)
	pass := randPass(t)
	const size = 1 << 20
	path, h := newImage(t, key, pass, size)
	plain := randBytes(t, size)
	c, err := xts.New(key)
	if err != nil {
		t.Fatal(err)
	}
	ct := make([]byte, size)
	c.Encrypt(ct, plain, 0) // plain64 counts from the payload start
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(ct, h.PayloadOffset()); err != nil {
		t.Fatal(err)
	}
	f.Close()

	out := filepath.Join(t.TempDir(), "out.raw")
	run(t, qi, "convert", "--object", "secret,id=sec0,file="+writeKeyFile(t, pass),
		"--image-opts", "driver=luks,file.filename="+path+",key-secret=sec0", "-O", "raw", out)
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, plain) {
		t.Fatalf("qemu-img decrypted %d bytes that differ from our plaintext", len(got))
	}
}

// checkForeign unlocks an image another tool created, into which qemu-io
// wrote 64 KiB of 0x5a at offset 0, and decrypts that data.
func checkForeign(t *testing.T, path string, pass []byte) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h, err := ReadHeader(f)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.Unlock(f, []byte("wrong")); !errors.Is(err, ErrWrongKey) {
		t.Fatalf("Unlock(wrong) = %v, want ErrWrongKey", err)
	}
	key, err := h.Unlock(f, pass)
	if err != nil {
		t.Fatalf("Unlock: %v", err)
	}
	if err := h.VerifyVolumeKey(key); err != nil {
		t.Fatal(err)
	}
	c, err := xts.New(key)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64<<10+xts.SectorSize)
	if _, err := f.ReadAt(buf, h.PayloadOffset()); err != nil {
		t.Fatal(err)
	}
	c.Decrypt(buf, buf, 0)
	if want := bytes.Repeat([]byte{0x5a}, 64<<10); !bytes.Equal(buf[:64<<10], want) {
		t.Fatalf("decrypted data is not 0x5a: % x...", buf[:32])
	}
	if bytes.Equal(buf[64<<10:], bytes.Repeat([]byte{0x5a}, xts.SectorSize)) {
		t.Fatal("sector after the written range decrypted to 0x5a too")
	}
}

func qemuWrite(t *testing.T, path, keyFile string) {
	qio := needTool(t, "qemu-io")
	run(t, qio, "--object", "secret,id=sec0,file="+keyFile,
		"--image-opts", "driver=luks,file.filename="+path+",key-secret=sec0",
		"-c", "write -P 0x5a 0 64k")
}

func TestUnlockQemuImgCreated(t *testing.T) {
	qi := needTool(t, "qemu-img")
	pass := randPass(t)
	kf := writeKeyFile(t, pass)
	path := filepath.Join(t.TempDir(), "q.luks")
	qemuCreate(t, qi, path, kf, "4M")
	qemuWrite(t, path, kf)
	checkForeign(t, path, pass)
}

func TestUnlockCryptsetupFormatted(t *testing.T) {
	cs := needTool(t, "cryptsetup")
	pass := randPass(t)
	kf := writeKeyFile(t, pass)
	path := filepath.Join(t.TempDir(), "c.luks")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, 4<<20); err != nil {
		t.Fatal(err)
	}
	run(t, cs, "luksFormat", "--batch-mode", "--type", "luks1", "-c", "aes-xts-plain64", "-s", "512",
		"--hash", "sha256", "--pbkdf-force-iterations", "1000", "--key-file", kf, path)
	qemuWrite(t, path, kf)
	checkForeign(t, path, pass)
}

// qemuCreate runs qemu-img create -f luks. qemu calibrates PBKDF2 with
// getrusage and gives up with "Unable to get accurate CPU usage" when the
// machine is busy (as under go test -race of several packages), so retry.
func qemuCreate(t *testing.T, qi, path, keyFile, size string) {
	t.Helper()
	args := []string{"create", "-f", "luks", "--object", "secret,id=sec0,file=" + keyFile,
		"-o", "key-secret=sec0,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha256,iter-time=10",
		path, size}
	for try := 0; ; try++ {
		out, err := exec.Command(qi, args...).CombinedOutput()
		if err == nil {
			return
		}
		if try < 5 && strings.Contains(string(out), "Unable to get accurate CPU usage") {
			os.Remove(path)
			continue
		}
		t.Fatalf("%s %s: %v\n%s", qi, strings.Join(args, " "), err, out)
	}
}
